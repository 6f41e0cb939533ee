"""`make walkthrough`: run every command of the walkthrough, in order, and compare what it prints.

The walkthrough is two documents, run one after the other in the same scratch copy, as a reader would:
docs/walkthrough.md (the first lesson) and docs/operations.md (part two, which starts where the first
ends). WALKTHROUGH_ONLY=operations.md runs one of them alone (each can start from a fresh clone).

A document is the script. In it:

- a ```console block holds commands (`$ …`), each followed by the output it must print;
- in expected output, `<sha256>`, `<hex>`, `<n>`, `<date>`, `<port>` and `<any>` stand for values that
  change from run to run, and a line `...` stands for any number of lines;
- `[exit N]` as the last expected line says the command must fail with status N (otherwise: status 0);
- `<!-- walkthrough: ACTION -->` comments, invisible when rendered, do what the reader does by hand in
  another terminal: `start-mesh` (optionally followed by `NAME=value` settings for the mesh, as in
  `start-mesh MESH_REQUIRE_USER_TOKEN=true`), `stop-mesh`, `background: COMMAND`, `stop-background`;
  a bare `background` runs the ```sh block just above it (the command the reader types in another terminal),
  so that the document shows it once.

It runs in a scratch copy of the repository (its own pki/out), against the local mesh on 8443–8446, or
against the Docker stack with WALKTHROUGH_TARGET=compose. WALKTHROUGH_PORTS=a,b,c,d,e,f moves the document's
ports 8443, 8444, 8445, 8446, 9445 and 9446 elsewhere (the tests use free ones), in commands and outputs alike.
A mismatch prints the step, the command, and expected against actual, and exits 1. At the end it prints,
per document, its word count and how long its commands ran: the two numbers its time estimate is made of.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "walkthrough.md", ROOT / "docs" / "operations.md")
READING_WORDS_PER_MINUTE = 200  # technical text, read with care
TOKENS = re.compile(
    r"^```console\n(?P<block>.*?)^```$|^```sh\n(?P<shell>.*?)^```$|<!-- walkthrough: (?P<action>.*?) -->"
    r"|^(?P<heading>## [^\n]*)$",
    re.S | re.M,
)
PLACEHOLDERS = {
    "<sha256>": r"[0-9a-f]{64}",
    "<hex>": r"[0-9a-fA-F:]+",
    "<n>": r"\d+(?:\.\d+)?",
    "<date>": r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?Z?",
    "<port>": r"\d{1,5}",
    "<any>": r".*",
}


@dataclass
class Command:
    line: str
    expected: list[str]
    exit_code: int = 0


def parse_block(block: str) -> list[Command]:
    commands: list[Command] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append(Command(line[2:], []))
        elif commands:
            exit_marker = re.fullmatch(r"\[exit (\d+)\]", line.strip())
            if exit_marker:
                commands[-1].exit_code = int(exit_marker.group(1))
            else:
                commands[-1].expected.append(line)
    return commands


def line_pattern(expected: str) -> re.Pattern[str]:
    parts = re.split("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")", expected.rstrip())
    return re.compile("".join(PLACEHOLDERS.get(p, re.escape(p)) for p in parts))


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line by line; `...` matches any run of lines (including none)."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return (
        bool(actual)
        and bool(line_pattern(expected[0]).fullmatch(actual[0].rstrip()))
        and matches(expected[1:], actual[1:])
    )


DOCUMENT_PORTS = (8443, 8444, 8445, 8446, 9445, 9446)  # A, B, C, the token service, two for chapters 5 and 8


class Walkthrough:
    def __init__(self, workdir: Path, target: str, ports: tuple[int, ...] = DOCUMENT_PORTS) -> None:
        self.workdir, self.target, self.ports = workdir, target, ports
        self.env = {
            **os.environ,
            "PORTS": ",".join(map(str, ports[:4])),  # make run / make call
            "MESH_CLIENT_URL": f"https://127.0.0.1:{ports[0]}/chain",  # python -m client's default
            "MESH_TOKEN_URL": f"https://127.0.0.1:{ports[3]}",  # python -m client --user
            "MESH_PORT_A": str(ports[0]),  # make up
            "MESH_PORT_B": str(ports[1]),
            "MESH_PORT_C": str(ports[2]),
            "MESH_PORT_TOKENS": str(ports[3]),
            "PATH": f"{workdir / '.venv' / 'bin'}:{os.environ['PATH']}",
            "VIRTUAL_ENV": str(workdir / ".venv"),
            # Its own compose project per target: a local run must never deploy into a Docker run's stack.
            "COMPOSE_PROJECT_NAME": f"mtls-mesh-walkthrough-{target}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        # As in a reader's terminal: no PKI directory of a test run, and no enclosing make (under `make test`,
        # MAKELEVEL would make every make in the document print "Entering directory" lines).
        for inherited in ("MESH_PKI_DIR", "MAKELEVEL", "MAKEFLAGS", "MFLAGS"):
            self.env.pop(inherited, None)
        self.mesh: list[subprocess.Popen[bytes] | None] = []  # the local mesh (start-mesh)
        self.background: list[subprocess.Popen[bytes] | None] = []  # anything else (background: …)

    def localise(self, text: str) -> str:
        """The document's ports replaced by the ones this run uses."""
        for document_port, port in zip(DOCUMENT_PORTS, self.ports, strict=True):
            text = re.sub(rf"\b{document_port}\b", str(port), text)
        return text

    def run(self, command: Command) -> tuple[int, list[str]]:
        result = subprocess.run(
            ["bash", "-c", command.line], cwd=self.workdir, env=self.env, capture_output=True, timeout=300
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        return result.returncode, [line for line in output.splitlines() if line.strip()]

    def act(self, action: str) -> None:
        if action.split()[0] == "start-mesh":
            settings = " ".join(action.split()[1:])  # e.g. MESH_REQUIRE_USER_TOKEN=true
            if self.target == "compose":
                self.spawn_and_wait(f"{settings} make up", wait=False)
            else:
                ports = ",".join(map(str, self.ports[:4]))
                line = f"{settings} python -m services.local --ports {ports}"
                self.mesh.append(self.spawn_and_wait(line, ports=self.ports[:4]))
        elif action == "stop-mesh":
            if self.target == "compose":  # our own compose project: containers, networks and its volume
                down = ["docker", "compose", "--profile", "client", "down", "--volumes", "--remove-orphans"]
                subprocess.run(down, cwd=self.workdir, env=self.env, capture_output=True, timeout=120)
            stop(self.mesh)
        elif action.startswith("background:"):
            line = self.localise(action.split(":", 1)[1].strip())
            ports = tuple(port for port in self.ports if re.search(rf"\b{port}\b", line))
            self.background.append(self.spawn_and_wait(line, ports=ports))
        elif action == "stop-background":
            stop(self.background)
        else:
            raise SystemExit(f"walkthrough: unknown action {action!r}")

    def spawn_and_wait(
        self, line: str, wait: bool = True, ports: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes] | None:
        if not wait:  # a command that returns once the thing it starts is up (make up)
            done = subprocess.run(
                ["bash", "-c", line], cwd=self.workdir, env=self.env, capture_output=True, timeout=900
            )
            if done.returncode != 0:
                output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
                raise SystemExit(f"walkthrough: `{line}` failed with status {done.returncode}:\n{output}")
            return None
        log = self.workdir / f".started-{len(self.mesh) + len(self.background)}.log"  # shown if it fails to come up
        with log.open("wb") as output:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                ["bash", "-c", line],
                cwd=self.workdir,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not all(_listening(port) for port in ports):  # until every port it opens accepts connections
            if process.poll() is not None:
                said = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"walkthrough: `{line}` exited with status {process.returncode}:\n{said}")
            if time.monotonic() > deadline:
                raise SystemExit(f"walkthrough: `{line}` did not listen on {ports} within 30 s")
            time.sleep(0.05)
        return process

    def stop_all(self) -> None:
        if self.target == "compose":
            self.act("stop-mesh")
        stop(self.mesh)
        stop(self.background)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def stop(processes: list[subprocess.Popen[bytes] | None]) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    processes.clear()


def prepare(workdir: Path) -> None:
    """A scratch copy of the tracked files (times kept, so make sees an up-to-date .venv), sharing .venv."""
    subprocess.run(["make", "--no-print-directory", "venv"], cwd=ROOT, check=True, capture_output=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        source = ROOT / name
        if source.is_file():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for shared in (".venv", ".venv-tools"):
        if (ROOT / shared).exists():
            (workdir / shared).symlink_to(ROOT / shared)


def check_code_links(text: str, name: str = "walkthrough.md", base: Path = ROOT / "docs") -> list[str]:
    """Links like [`symbol`](../path#L42) must still point at a line containing `symbol`; every other relative
    link must point at a file that exists (relative to `base`, the document's folder), and at a heading of it
    when it names one (`other.md#a-heading`, as the forge makes anchors)."""
    problems = []
    for symbol, path, line in re.findall(r"\[`([^`]+)`\]\(\.\./([^)#]+)#L(\d+)\)", text):
        source = ROOT / path
        lines = source.read_text().splitlines() if source.is_file() else []
        if int(line) > len(lines) or symbol not in lines[int(line) - 1]:
            problems.append(f"{name}: the link to {path}#L{line} should show `{symbol}`, and no longer does")
    for path, anchor in re.findall(r"\]\((?!https?:|mailto:)([^)#\s]*)(?:#([^)\s]*))?\)", text):
        target = (base / path).resolve() if path else None
        if target is not None and not target.exists():
            problems.append(f"{name}: the link to {path} points at nothing; fix the path")
        elif anchor and not anchor.startswith("L") and (target is None or target.suffix == ".md"):
            headings = text if target is None else target.read_text()
            if anchor not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", headings, re.M)}:
                problems.append(f"{name}: the link to {path}#{anchor} names no heading there; fix the anchor")
    return problems


def _anchor(heading: str) -> str:
    """The forge's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def words(text: str) -> int:
    """Every word counts, commands and output included (what `wc -w` says)."""
    return len(text.split())


def main() -> int:
    target = os.environ.get("WALKTHROUGH_TARGET", "local")
    only = os.environ.get("WALKTHROUGH_ONLY")
    documents = [doc for doc in DOCS if not only or doc.name == only]
    if not documents:
        print(f"walkthrough: WALKTHROUGH_ONLY={only} names none of {[doc.name for doc in DOCS]}", file=sys.stderr)
        return 1
    problems = [p for doc in DOCS for p in check_code_links(doc.read_text(), doc.name)]
    problems += check_code_links((ROOT / "README.md").read_text(), "README.md", ROOT)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    failures = 0
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mesh-walkthrough-") as scratch:
        workdir = Path(scratch)
        prepare(workdir)
        ports = tuple(int(p) for p in os.environ.get("WALKTHROUGH_PORTS", "").split(",") if p) or DOCUMENT_PORTS
        walkthrough = Walkthrough(workdir, target, ports)
        try:
            for doc in documents:
                started = time.monotonic()
                failures += run_document(walkthrough, doc)
                if failures and os.environ.get("WALKTHROUGH_KEEP_GOING") != "1":
                    return 1
                seconds = time.monotonic() - started
                count = words(doc.read_text())
                timings.append(
                    f"{doc.name}: {count} words ({count / READING_WORDS_PER_MINUTE:.0f} min of reading at "
                    f"{READING_WORDS_PER_MINUTE} words a minute), commands ran for {seconds / 60:.1f} min"
                )
        finally:
            walkthrough.stop_all()
    print("\n".join(timings))
    print(f"walkthrough: {'all steps printed what the document says' if not failures else f'{failures} mismatches'}")
    return 1 if failures else 0


def run_document(walkthrough: Walkthrough, doc: Path) -> int:
    """Every action and command of one document, in order; returns the number of mismatches."""
    failures = 0
    heading, shell = "(start)", ""
    print(f"— {doc.name}", flush=True)
    for token in TOKENS.finditer(doc.read_text()):
        if token["heading"]:
            heading = token["heading"][3:]
            print(f"— {heading}", flush=True)
        elif token["shell"] is not None:
            shell = token["shell"].strip()
        elif token["action"]:
            action = token["action"].strip()
            if action == "background":
                if not shell or "\n" in shell:
                    raise SystemExit(
                        f"walkthrough: {doc.name}, “{heading}”: a bare `background` needs one ```sh line above"
                    )
                action = f"background: {shell}"
            walkthrough.act(action)
        else:
            for command in parse_block(walkthrough.localise(token["block"])):
                code, actual = walkthrough.run(command)
                expected = [line for line in command.expected if line.strip()]
                if code == command.exit_code and matches(expected, actual):
                    continue
                failures += 1
                print(f"\nMISMATCH in {doc.name}, “{heading}”\n$ {command.line}", file=sys.stderr)
                print(f"exit status {code}, expected {command.exit_code}", file=sys.stderr)
                print("expected:\n  " + "\n  ".join(expected), file=sys.stderr)
                print("actual:\n  " + "\n  ".join(actual), file=sys.stderr)
                if os.environ.get("WALKTHROUGH_KEEP_GOING") != "1":
                    return failures
    return failures


if __name__ == "__main__":
    sys.exit(main())
