"""The walkthrough is executable: run it whole, and make sure its checker would notice drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from docs.walkthrough import ROOT, check_code_links, line_pattern, matches
from tests.support import free_ports

pytestmark = pytest.mark.e2e


def test_placeholders_and_ellipsis() -> None:
    assert line_pattern("sha256 <sha256>").fullmatch("sha256 " + "ab" * 32)
    assert not line_pattern("sha256 <sha256>").fullmatch("sha256 abc")
    assert matches(["first", "...", "last"], ["first", "x", "y", "last"])
    assert matches(["first", "...", "last"], ["first", "last"])


def test_a_deleted_or_changed_line_is_a_mismatch() -> None:
    actual = ["403 from service-c: …", "  reason: thumbprint is not on the allow-list service-c.txt"]
    assert matches(list(actual), actual)
    assert not matches(actual[:1], actual), "output the document no longer shows must be noticed"
    assert not matches([actual[0], "  reason: something else"], actual)


def test_code_links_point_at_what_they_name() -> None:
    assert check_code_links((ROOT / "docs" / "walkthrough.md").read_text()) == []
    assert check_code_links("[`no_such_symbol`](../shared/tls/contexts.py#L1)") != []


def test_the_walkthrough_runs_and_prints_what_it_says(tmp_path: Path) -> None:
    """Every command of docs/walkthrough.md, against a real local mesh on free ports."""
    ports = ",".join(map(str, free_ports(6)))
    env = {**os.environ, "WALKTHROUGH_TARGET": "local", "WALKTHROUGH_PORTS": ports}
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "walkthrough.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "all steps printed what the document says" in result.stdout
