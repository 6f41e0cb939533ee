"""The operator's side: `make run` (services.local) and its ports, its children's lives, its output; the client's
explanations of what went wrong; the CLIs' --help and --version; the Makefile's Docker project.

Everything real: services.local as `make run` runs it, its services and renewer as processes, a plain-HTTP
server, a revoked certificate against a service that holds the CRL. Nothing leaves 127.0.0.1: the name that does
not resolve is a `.invalid` one (RFC 6761), refused before any query could go out.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from client.__main__ import call, default_server_id
from client.__main__ import main as client_main
from pki import init
from pki.__main__ import main as pki_main
from pki.revocation import CRL_VALIDITY, revoke_serial
from services.__main__ import CannotStart, load_config
from services.__main__ import main as services_main
from services.local import busy_ports, chain_environments, free_ports, running
from services.local import main as local_main
from shared.authz import authorize_id
from shared.layout import Layout
from shared.outbound import callee_check
from shared.x509 import load_certificates
from tests.support import once_for_both_modes, start_services, wait_until

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def start_mesh_command(ports: list[int], pki: Path) -> list[str]:
    """What `make run` executes (`.venv/bin/mesh-local`, exec'd by make's shell), with this test's PKI."""
    return [sys.executable, "-m", "services.local", "--ports", ",".join(map(str, ports)), "--pki-dir", str(pki)]


class LocalMesh:
    """`python -m services.local` as `make run` starts it, in a process group of its own as a terminal's foreground
    job is; its output collected line by line."""

    def __init__(self, ports: list[int], pki: Path, env: dict[str, str] | None = None) -> None:
        self.ports = ports
        self.process = subprocess.Popen(
            start_mesh_command(ports, pki),
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "MESH_RELOAD_INTERVAL": "0.2", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_up(self) -> None:
        wait_until(lambda: "mesh up" in self.output or self.process.poll() is not None, timeout=60)
        assert "mesh up" in self.output, self.output

    def children(self) -> list[int]:
        """The services and the renewer: every process whose parent is services.local."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                found.append(int(stat.parent.name))
        return found

    def ended(self, timeout: float = 20) -> str:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        return self.output


@contextmanager
def local_mesh(ports: list[int], pki: Path, env: dict[str, str] | None = None) -> Iterator[LocalMesh]:
    mesh = LocalMesh(ports, pki, env)
    children: list[int] = []
    try:
        mesh.wait_up()
        children = mesh.children()
        yield mesh
    finally:  # whatever the test did (or a mutation broke), nothing it started outlives it
        for pid in [mesh.process.pid, *children, *mesh.children()]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mesh.process.wait(timeout=10)


def ports_free(ports: list[int]) -> bool:
    return busy_ports(ports) == []


# ── item 4: one place to set ports; item 7: logs for a person ────────────────────────────────────────────────


def test_make_run_prints_commands_for_its_ports_and_stops_clean_on_ctrl_c(layout: Layout) -> None:
    """The commands `make run PORTS=…` prints work as printed (the token URL follows the ports); in text format its
    logs are lines for a person, a refusal a WARNING; /metrics prints as text; Ctrl-C (SIGINT to the whole
    foreground group, as a terminal sends it) stops everything without a traceback and frees every port."""
    once_for_both_modes(layout)
    ports = free_ports(4)
    with local_mesh(ports, layout.out, {"MESH_LOG_FORMAT": "text"}) as mesh:
        up = next(line for line in mesh.lines if line.startswith("mesh up"))
        joined = ",".join(map(str, ports))
        assert f"make call PORTS={joined}" in mesh.output
        [printed] = [line.strip() for line in mesh.lines if "mesh-client --user alice" in line]
        assert f"MESH_CLIENT_URL=https://127.0.0.1:{ports[0]}/chain" in printed, up
        assert f"MESH_TOKEN_URL=https://127.0.0.1:{ports[3]}" in printed
        # The printed command, as a user pastes it (but with this test's PKI): on behalf of alice, so the token
        # service is reached at the port it printed.
        command = printed.replace(".venv/bin/mesh-client", f"{sys.executable} -m client")
        result = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env={**os.environ, "MESH_PKI_DIR": str(layout.out)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "on behalf of alice" in result.stdout

        # A refusal (the client skipping a hop) is a WARNING line; an allowed request an INFO line.
        material = layout.material("client")
        skip = call(f"https://127.0.0.1:{ports[1]}/chain", "service-b", material,
                    callee_check(authorize_id(default_server_id("service-b", material.cert))))  # fmt: skip
        assert skip.status == 403
        wait_until(
            lambda: re.search(r"\| \S+ WARNING service-b authz .*decision=deny", mesh.output) is not None,
            describe=lambda: mesh.output,
        )
        assert re.search(r"\| \S+ INFO +service-a authz .*decision=allow", mesh.output), mesh.output
        assert '{"ts"' not in mesh.output

        operator = layout.material("operator")
        metrics = call(f"https://127.0.0.1:{ports[0]}/metrics", "service-a", operator,
                       callee_check(authorize_id(default_server_id("service-a", operator.cert))))  # fmt: skip
        assert metrics.status == 200 and metrics.text.startswith("# ") and "\nmesh_" in metrics.text

        os.killpg(mesh.process.pid, signal.SIGINT)
        output = mesh.ended()
        assert mesh.process.returncode == 0, output
        assert "mesh stopped" in output
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
        assert ports_free(ports)


# ── item 6: children die with their parent, however it ends ─────────────────────────────────────────────────


def test_sigkill_of_make_run_leaves_no_port_bound(layout: Layout, tmp_path: Path) -> None:
    """SIGKILL to services.local (what `make run` runs): no service, no renewer keeps running or holds a port.
    Then SIGKILL to `make` itself (a stand-in parent that runs services.local and waits): the same."""
    once_for_both_modes(layout)
    ports = free_ports(4)
    with local_mesh(ports, layout.out) as mesh:
        children = mesh.children()
        assert len(children) == 5  # four services, one renewer
        os.kill(mesh.process.pid, signal.SIGKILL)
        wait_until(lambda: ports_free(ports), timeout=20)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=20)

    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
         *start_mesh_command(ports, layout.out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        for line in parent.stdout:  # until the mesh is up
            if line.startswith(b"mesh up"):
                break
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: ports_free(ports), timeout=20)
    finally:
        if not ports_free(ports):  # the mutation's leftovers: services.local is now some other process's child
            subprocess.run(["pkill", "-KILL", "-s", str(parent.pid)], check=False)


# ── item 6 and 4: a second `make run`, and ports that are not ports ─────────────────────────────────────────


def test_second_make_run_on_busy_ports_says_so_and_starts_nothing(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    once_for_both_modes(layout)
    ports = free_ports(4)
    with socket.socket() as holder:  # another mesh's service-b, as far as anyone can tell
        holder.bind(("127.0.0.1", ports[1]))
        holder.listen()
        started = time.monotonic()
        assert local_main(["--ports", ",".join(map(str, ports)), "--pki-dir", str(layout.out)]) == 1
        out, err = capsys.readouterr()
        assert "mesh up" not in out
        assert f"127.0.0.1:{ports[1]} already in use" in err and "PORTS=" in err
        assert time.monotonic() - started < 5  # refused before starting anything
        assert busy_ports(ports) == [ports[1]]  # and nothing of ours listens on the others

        from client.demo import main as demo_main

        assert demo_main(["--ports", ",".join(map(str, ports))]) == 1  # make demo PORTS=…: its ports, not 8443
        assert f"127.0.0.1:{ports[1]} is already in use" in capsys.readouterr().err


def test_ports_and_settings_that_are_wrong_are_sentences(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exit_:
        local_main(["--ports", "8443,84x4,8445,8446"])
    assert exit_.value.code == 2
    assert "'84x4' is not a port (a number from 1 to 65535)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        local_main(["--ports", "9443,9444,9445"])
    assert "give 4 ports, for A, B, C and the token service" in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", ["python -m services", "--help"])  # as `python -m services --help` runs it
    with pytest.raises(SystemExit) as exit_:
        services_main()
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "MESH_NAME" in shown and "MESH_PORT" in shown and "Field required" not in shown

    monkeypatch.delenv("MESH_NAME", raising=False)
    with pytest.raises(CannotStart, match=r"MESH_NAME is not set \(which service is this\?"):
        load_config()
    monkeypatch.setenv("MESH_NAME", "service-a")
    monkeypatch.setenv("MESH_PORT", "84x3")
    with pytest.raises(CannotStart, match=r"MESH_PORT='84x3' is not a whole number"):
        load_config()

    with pytest.raises(SystemExit):
        client_main(["--help"])
    shown = capsys.readouterr().out
    assert "MESH_CLIENT_URL" in shown and "MESH_TOKEN_URL" in shown


# ── item 6: this checkout's Docker stack only ───────────────────────────────────────────────────────────────


def test_make_acts_on_this_checkouts_compose_project_only(tmp_path: Path) -> None:
    """`make -n` (prints, runs nothing): every compose call names a project derived from the checkout's
    directory; another checkout gets another; COMPOSE_PROJECT_NAME (the walkthrough's) wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMPOSE_PROJECT_NAME", "MAKEFLAGS", "MAKELEVEL")}

    def compose_calls(directory: Path, **extra: str) -> list[str]:
        result = subprocess.run(["make", "-n", "clean", "deploy-if-up", "down"], cwd=directory,
                                env={**env, **extra}, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if "docker compose" in line]

    here = compose_calls(ROOT)
    assert len(here) == 4
    names = {re.search(r"docker compose --project-name (\S+)", line).group(1) for line in here}  # type: ignore[union-attr]
    [name] = names
    assert name.startswith(f"mtls-mesh-{ROOT.name.lower()}-")
    other = tmp_path / ROOT.name  # another checkout, with the same directory name
    other.mkdir()
    (other / "Makefile").write_bytes((ROOT / "Makefile").read_bytes())
    elsewhere = compose_calls(other)
    assert elsewhere and all(name not in line and "--project-name mtls-mesh-" in line for line in elsewhere)
    assert all("--project-name mine " in line for line in compose_calls(ROOT, COMPOSE_PROJECT_NAME="mine"))


# ── item 5: errors that name the real cause ─────────────────────────────────────────────────────────────────


def test_client_names_a_dns_failure_and_a_plain_http_server(
    layout: Layout, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    once_for_both_modes(layout)
    pki = ["--pki-dir", str(layout.out)]
    real = socket.getaddrinfo

    def local_only(host: object, *args: object, **kwargs: object) -> object:
        # RFC 6761: `.invalid` never resolves. Refused here, so that not even a DNS query leaves the machine.
        if isinstance(host, str) and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    assert client_main(["https://service-a.mesh.invalid:8443/chain", *pki]) == 1
    said = capsys.readouterr().out
    assert "the name service-a.mesh.invalid does not resolve (DNS)" in said and "client certificate" not in said
    assert said.startswith("failed before HTTP: ")  # not "refused": nobody refused anything

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert client_main([f"https://127.0.0.1:{port}/chain", *pki]) == 1
        said = capsys.readouterr().out
        assert "does not speak TLS (plain HTTP?)" in said and "client certificate" not in said, said
        assert said.startswith("failed before HTTP: ")
        # …and an http:// URL is refused before anything is sent in the clear.
        assert client_main([f"http://127.0.0.1:{port}/chain", *pki]) == 2
        assert "not an https:// URL" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()


def test_client_with_a_missing_cert_is_not_told_to_run_make_pki(
    layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    once_for_both_modes(layout)
    missing = tmp_path / "alice.crt"
    assert client_main(["--cert", str(missing), "--key", str(layout.key("client")), "--pki-dir", str(layout.out)]) == 2
    said = capsys.readouterr().err
    assert f"--cert {missing}: no such file" in said and "make pki" not in said


def test_pki_inspect_of_a_key_says_it_is_a_key(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    once_for_both_modes(layout)
    assert pki_main(["--out", str(layout.out), "inspect", str(layout.ca_key)]) != 0
    said = capsys.readouterr()
    assert "this is a private key, not a certificate" in said.out + said.err
    assert "regenerate" not in said.out + said.err


def test_revoked_client_is_told_its_certificate_is_revoked(tmp_path: Path) -> None:
    """A PKI of its own (this test revokes): the client's certificate revoked for key-compromise, then service-a
    started with that CRL; the client, holding the same crl.pem, says which certificate and why."""
    layout = Layout(tmp_path / "pki")
    init(layout)
    serial = load_certificates(layout.cert("client"))[0].serial_number
    revoke_serial(layout, serial, "key-compromise", lifetime=CRL_VALIDITY)
    [service] = start_services(chain_environments(free_ports(1), layout.out, names=["service-a"]), tmp_path)
    material = layout.material("client")
    with running([service]):
        check = callee_check(authorize_id(default_server_id("service-a", material.cert)))
        outcome = call(f"https://127.0.0.1:{service.port}/chain", "service-a", material, check)
    assert not outcome.ok and outcome.status is None
    assert f"your certificate {layout.cert('client')} (serial {serial:x}) is revoked (reason key-compromise" in (
        outcome.text
    ), outcome.text
    assert "make rotate NAME=client" in outcome.text and "pki/out" in outcome.text
    assert "tls_refused" in service.output() and "certificate revoked" in service.output()


# ── item 8 ──────────────────────────────────────────────────────────────────────────────────────────────────


def test_every_cli_has_version_and_a_console_script(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.demo import main as demo_main
    from cockpit.__main__ import main as cockpit_main
    from view.__main__ import main as view_main

    def service_main(argv: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["python -m services", *argv])
        return services_main()

    version = importlib.metadata.version("mtls-mesh")
    for cli in (pki_main, client_main, local_main, demo_main, service_main, cockpit_main, view_main):
        with pytest.raises(SystemExit) as exit_:
            cli(["--version"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip().endswith(version)
    scripts = {
        e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("mesh-")
    }
    assert set(scripts) >= {
        "mesh-pki",
        "mesh-client",
        "mesh-demo",
        "mesh-service",
        "mesh-local",
        "mesh-cockpit",
        "mesh-view",
    }
    assert [scripts[name].load() for name in ("mesh-pki", "mesh-client", "mesh-cockpit", "mesh-view")] == [
        pki_main,
        client_main,
        cockpit_main,
        view_main,
    ]
