"""Fail closed: a service with missing or broken material refuses to start, in one line naming the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.layout import Layout
from shared.x509 import MaterialError, read_protected
from tests.support import Credentials, free_ports


def start(layout: Layout, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "MESH_NAME": "service-b",
        "MESH_PORT": str(free_ports(1)[0]),
        "MESH_PKI_DIR": str(layout.out),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "services"], env=environment, capture_output=True, text=True, timeout=30
    )


def copy(path: Path, tmp_path: Path, mode: int = 0o600) -> Path:
    target = tmp_path / path.name
    shutil.copy(path, target)
    target.chmod(mode)
    return target


def broken(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


CASES = {
    "missing allow-list": (
        lambda lay, tmp, bad: {"MESH_ALLOW_LIST": str(tmp / "nope.txt")},
        "nope.txt: allow-list not found",
    ),
    "malformed allow-list": (
        lambda lay, tmp, bad: {"MESH_ALLOW_LIST": str(broken(tmp, "allow.txt", "# ok\nnot-hex\n"))},
        "allow.txt:2: 'not-hex' is not a SHA-256 thumbprint",
    ),
    "missing certificate": (
        lambda lay, tmp, bad: {"MESH_CERT": str(tmp / "none.crt")},
        "none.crt: certificate not found",
    ),
    "garbage certificate": (
        lambda lay, tmp, bad: {"MESH_CERT": str(broken(tmp, "junk.crt", "hello"))},
        "junk.crt: certificate is not a PEM certificate",
    ),
    "missing CA": (lambda lay, tmp, bad: {"MESH_CA": str(tmp / "ca.crt")}, "ca.crt: CA file not found"),
    "key of another identity": (
        lambda lay, tmp, bad: {"MESH_KEY": str(lay.key("service-c"))},
        "service-c.key: this key does not belong to the certificate",
    ),
    "key readable by others": (
        lambda lay, tmp, bad: {"MESH_KEY": str(copy(lay.key("service-b"), tmp, 0o644))},
        "private key is accessible by other users (mode 0644) — run `chmod 600",
    ),
    "garbage key": (
        lambda lay, tmp, bad: {"MESH_KEY": str(broken(tmp, "junk.key", "hello"))},
        "junk.key: not an unencrypted PEM private key",
    ),
    "expired own certificate": (
        lambda lay, tmp, bad: {"MESH_CERT": str(bad["expired"].cert), "MESH_KEY": str(bad["expired"].key)},
        "expired.crt: certificate expired on",
    ),
    "downstream without identity": (
        lambda lay, tmp, bad: {"MESH_DOWNSTREAM_URL": "https://127.0.0.1:1"},
        "MESH_DOWNSTREAM_URL and MESH_DOWNSTREAM_NAME go together",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refuses_to_start(layout: Layout, hostile: dict[str, Credentials], tmp_path: Path, case: str) -> None:
    make_env, message = CASES[case]
    result = start(layout, **make_env(layout, tmp_path, hostile))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "Uvicorn running" not in result.stdout


def test_missing_name_is_explained() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MESH_NAME"}
    result = subprocess.run([sys.executable, "-m", "services"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "MESH_NAME" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give the key file root's ownership and another group")
@pytest.mark.parametrize(
    ("owner", "group", "mode", "accepted"),
    [
        (0, "ours", 0o440, True),  # a Kubernetes Secret under fsGroup
        (0, "ours", 0o640, True),
        (0, "ours", 0o460, False),  # the group may write
        (0, "ours", 0o444, False),  # everyone may read
        (0, 54321, 0o440, False),  # a group that is not ours
        (12345, "ours", 0o440, False),  # another user's file
    ],
)
def test_a_key_readable_by_the_group_only_when_root_owns_it_for_our_group(
    tmp_path: Path, owner: int, group: int | str, mode: int, accepted: bool
) -> None:
    """PostgreSQL's rule for key files, which is also how Kubernetes mounts a Secret for a non-root container."""
    key = tmp_path / "service.key"
    key.write_bytes(b"secret")
    os.chown(key, owner, os.getegid() if group == "ours" else group)
    key.chmod(mode)
    if accepted:
        assert read_protected(key, "private key", private=True) == b"secret"
    else:
        with pytest.raises(MaterialError):
            read_protected(key, "private key", private=True)
