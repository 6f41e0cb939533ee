"""`make bench` still runs: every chain (the nginx sidecars included), the handshake figures and the scaling,
in a short version that proves the machinery, not the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from docs.walkthrough import ROOT

pytestmark = pytest.mark.e2e


def test_a_short_bench_writes_every_figure(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.bench", "--rounds", "1", "--per-round", "20", "--throughput-rounds", "1",
               "--throughput-seconds", "0.5", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["handshake"]) >= {"cold_hop_added_ms", "bare_mutual_handshake_ms", "ratio"}
    assert set(results["sidecar"]) == {"p50_ratio", "p99_ratio", "throughput_ratio"}
    assert set(results["user_tokens"]) >= {"p50_ratio", "p99_ratio", "throughput_ratio", "cold_exchange_ms"}
    assert set(results["scaling"]["crl"]) == {"10", "10000", "100000"}
    assert set(results["scaling"]["chain_p50_ms"]) == {"3", "6"}
    assert all(v["errors"] == 0 for v in results["variants"].values())
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "scaling.png").stat().st_size > 0
