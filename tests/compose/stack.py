"""A compose stack of its own for a test module: own project name, ports, PKI directory and (optionally)
policy; built, started with `up --wait`, and torn down even when a test fails.

Skipped with a visible reason when no engine answers — unless MESH_REQUIRE_DOCKER=1 (as in CI), where that
is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.layout import Layout
from tests.support import Credentials, free_ports

ROOT = Path(__file__).resolve().parents[2]
CHAIN = ["service-a", "service-b", "service-c"]
SERVICES = [*CHAIN, "token-service"]  # the long-running services, each with a port on 127.0.0.1


def docker_available() -> str | None:
    """None if a Docker engine and Compose v2 answer; otherwise why not."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine is running (docker info failed)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "Docker Compose v2 (`docker compose`) is not installed"
    return None


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.project = f"mtls-mesh-test-{uuid.uuid4().hex[:8]}"
        self.pki = tmp / "pki"
        self.pki.mkdir()
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.env = {
            **os.environ,
            "MESH_HOST_PKI": str(self.pki),
            "MESH_PORT_A": str(self.ports["service-a"]),
            "MESH_PORT_B": str(self.ports["service-b"]),
            "MESH_PORT_C": str(self.ports["service-c"]),
            "MESH_PORT_TOKENS": str(self.ports["token-service"]),
        }
        self.layout = Layout(self.pki)

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # The one-shot client is in a profile of its own: `up --wait` would report it as "exited (0)" and fail.
        # `run client` names it, which is enough; `down` gets the profile, so that nothing is left behind.
        profile = ["--profile", "client"] if args[0] == "down" else []
        command = ["docker", "compose", "-p", self.project, *profile, *args]
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def url(self, service: str, path: str = "/chain") -> str:
        return f"https://127.0.0.1:{self.ports[service]}{path}"

    def base_url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.ports[name]}"

    def events(self, name: str) -> list[dict[str, Any]]:
        """What the container `name` logged, as JSON events (lines that are not JSON are skipped)."""
        events = []
        for line in self.compose("logs", "--no-log-prefix", "--no-color", name).stdout.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def credentials(self, name: str) -> Credentials:
        return Credentials(self.layout.cert(name), self.layout.key(name))


@contextmanager
def running_stack(tmp: Path, policy: Path | None = None, **env: str) -> Iterator[Stack]:
    """`make image`, then `up --wait` a stack of its own (with `policy` instead of pki/policy.toml, and `env`
    in the environment of compose, e.g. MESH_REQUIRE_USER_TOKEN="true")."""
    if reason := docker_available():
        if os.environ.get("MESH_REQUIRE_DOCKER") == "1":
            pytest.fail(f"MESH_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(f"compose tests need Docker: {reason}")
    subprocess.run(["make", "image"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    stack = Stack(tmp)
    if policy is not None:
        stack.env["MESH_HOST_POLICY"] = str(policy)
    stack.env.update(env)
    try:
        stack.compose("up", "-d", "--wait")
        yield stack
    finally:
        if os.environ.get("MESH_KEEP_STACK") != "1":
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
