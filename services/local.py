"""`python -m services.local`: the chain A → B → C, and the token service, as uvicorn processes on 127.0.0.1
(`make run`).

Each service is `python -m services` with its own `MESH_*` environment: the services differ by
configuration only. The tests and `make demo` start the chain with the same code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from services.children import child_options, die_with_parent
from shared.cli import add_version
from shared.layout import DEFAULT_OUT
from shared.tokens import TOKEN_SERVICE

CHAIN = ("service-a", "service-b", "service-c")
DEFAULT_PORTS = (8443, 8444, 8445, 8446)  # A, B, C, the token service


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now, on 127.0.0.1 (for tests, benchmarks, and to suggest when ours are taken)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def busy_ports(ports: Sequence[int]) -> list[int]:
    """Those of `ports` that something on 127.0.0.1 holds already (another `make run`, say)."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            # As uvicorn binds: connections of a mesh just stopped (TIME_WAIT) do not hold a port, a listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def parse_ports(text: str, count: int = 4) -> list[int]:
    """`8443,8444,8445,8446` as numbers, or ValueError with the sentence that says what is wrong."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != count:
        raise ValueError(f"{text!r}: give {count} ports, for A, B, C and the token service, e.g. 9443,9444,9445,9446")
    for part in parts:
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ValueError(f"{text!r}: {part!r} is not a port (a number from 1 to 65535)")
    return [int(part) for part in parts]


def chain_environments(
    ports: Sequence[int],
    pki_dir: Path = DEFAULT_OUT,
    names: Sequence[str] = CHAIN,
    token_port: int | None = None,
    **extra: str,
) -> list[dict[str, str]]:
    """One `MESH_*` environment per service; each calls the next one in `names`, the last calls nobody.
    With `token_port`, each also knows the token service there (see `token_environment`)."""
    environments = []
    tokens = {"MESH_TOKEN_SERVICE_URL": f"https://127.0.0.1:{token_port}"} if token_port else {}
    for i, (name, port) in enumerate(zip(names, ports, strict=True)):
        env = {"MESH_NAME": name, "MESH_PORT": str(port), "MESH_PKI_DIR": str(pki_dir), **tokens, **extra}
        if i + 1 < len(names):
            env |= {
                "MESH_DOWNSTREAM_URL": f"https://127.0.0.1:{ports[i + 1]}",
                "MESH_DOWNSTREAM_NAME": names[i + 1],
            }
        environments.append(env)
    return environments


def token_environment(port: int, pki_dir: Path = DEFAULT_OUT, **extra: str) -> dict[str, str]:
    """The token service's `MESH_*` environment: a service like the others, run as `services.token_service`."""
    env = {"MESH_NAME": TOKEN_SERVICE, "MESH_PORT": str(port), "MESH_PKI_DIR": str(pki_dir), **extra}
    # MESH_REQUIRE_USER_TOKEN=true in our environment is for the chain: the token service is where user
    # tokens come from, and it checks the one it is given in the request body itself.
    return {"MESH_REQUIRE_USER_TOKEN": "false", **env}


class ServiceProcess:
    """One service as a real process. Its output goes to `log_path`, or is printed with a name prefix."""

    def __init__(self, env: dict[str, str], log_path: Path | None = None, module: str = "services") -> None:
        self.env = env
        self.module = module
        self.name, self.port = env["MESH_NAME"], int(env["MESH_PORT"])
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        if self.log_path is not None:
            self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=self._log_file or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **child_options(),
        )
        if self._log_file is None:
            threading.Thread(target=self._relay, daemon=True).start()
        return self

    def _relay(self) -> None:
        assert self.process is not None
        relay(self.name, self.process)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the port accepts connections; raise with the service's own words if it exits instead."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on 127.0.0.1:{self.port} within {timeout:g} s")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace").strip() if self.log_path else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def relay(name: str, process: subprocess.Popen[bytes]) -> None:
    """Print `process`'s output line by line, each prefixed with `name`."""
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(f"{name:<9} | {line.decode(errors='replace')}")
        sys.stdout.flush()


@contextmanager
def renewing(pki_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m pki renew --watch` beside the services: certificates renewed at half their life."""
    renewer = subprocess.Popen(
        [sys.executable, "-m", "pki", "--out", str(pki_dir), "renew", "--watch"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        **child_options(),
    )
    threading.Thread(target=relay, args=("renewer", renewer), daemon=True).start()
    try:
        yield renewer
    finally:
        renewer.terminate()
        try:
            renewer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            renewer.kill()
            renewer.wait()


@contextmanager
def running(processes: Sequence[ServiceProcess]) -> Iterator[Sequence[ServiceProcess]]:
    """Start every process (callee first), wait until all listen, and stop them all on the way out."""
    try:
        for process in reversed(processes):
            process.start()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()


def client_commands(ports: Sequence[int]) -> list[str]:
    """How to call the chain on these ports from another terminal: the exact commands, the ports spelled out."""
    if list(ports) == list(DEFAULT_PORTS):
        return ["make call", ".venv/bin/mesh-client --user alice"]
    urls = f"MESH_CLIENT_URL=https://127.0.0.1:{ports[0]}/chain MESH_TOKEN_URL=https://127.0.0.1:{ports[3]}"
    return [f"make call PORTS={','.join(map(str, ports))}", f"{urls} .venv/bin/mesh-client --user alice"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.local", description=__doc__)
    add_version(parser)
    parser.add_argument(
        "--ports",
        default=",".join(map(str, DEFAULT_PORTS)),
        help="ports of A,B,C and the token service (default: 8443,8444,8445,8446)",
    )
    parser.add_argument("--pki-dir", type=Path, default=DEFAULT_OUT, help="PKI directory (default: pki/out)")
    args = parser.parse_args(argv)
    try:
        ports = parse_ports(args.ports)
    except ValueError as e:
        parser.error(f"--ports {e}")
    if busy := busy_ports(ports):
        # Checked before anything starts: a service that cannot bind would exit, but the port answers all the
        # same (the other mesh's), and we would announce "mesh up" for a mesh that is not ours.
        listed = ", ".join(f"127.0.0.1:{port}" for port in busy)
        print(
            f"mesh: {listed} already in use (another `make run`?) — stop it, or choose free ports, e.g. "
            f"make run PORTS={','.join(map(str, free_ports(len(ports))))}",
            file=sys.stderr,
        )
        return 1
    die_with_parent()  # `make run` killed, even by SIGKILL: we get SIGTERM and stop the services
    # MESH_REQUIRE_USER_TOKEN and any other MESH_* setting in our environment reach every service.
    processes = [ServiceProcess(env) for env in chain_environments(ports[:3], args.pki_dir, token_port=ports[3])] + [
        ServiceProcess(token_environment(ports[3], args.pki_dir), module="services.token_service")
    ]

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with running(processes), renewing(args.pki_dir):
            names = " → ".join(f"{p.name} (127.0.0.1:{p.port})" for p in processes[:3])
            tokens = f"{processes[3].name} (127.0.0.1:{processes[3].port})"
            commands = "".join(f"\n  {command}" for command in client_commands(ports))
            print(
                f"mesh up: client → {names}; {tokens}; and the renewer (certificates renewed at half their life). "
                f"Ctrl-C stops them all. Call it:{commands}",
                flush=True,
            )
            while not stop.wait(0.5):
                if exited := [p for p in processes if p.process and p.process.poll() is not None]:
                    print(f"{exited[0].name} exited; stopping the mesh", file=sys.stderr)
                    return 1
    except RuntimeError as e:
        print(f"mesh: {e}", file=sys.stderr)
        return 1
    print("mesh stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
