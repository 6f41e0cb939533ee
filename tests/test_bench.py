"""`make bench` still runs, and writes every figure with its median and spread.

Two halves, so that `make test` pays seconds, not a minute: the shape of results.json for all nine chains is checked
in-process, from made-up samples through the same code that writes a real run; a real run of two chains (as shipped,
and behind the nginx sidecars), three repeats, the handshake figures, a small scaling section and reloads under
requests proves the machinery. The whole bench is `make bench` (`make bench-quick` for a short one)."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.bench import CHAINS, SIX_HOPS, Variant, percentile, ratios, write_results
from docs.walkthrough import ROOT
from services.local import CHAIN
from shared.layout import Layout

RATIO_GROUPS = {
    "mtls_vs_plaintext": {"p50_ratio", "p90_ratio", "p99_ratio", "throughput_ratio", "cpu_per_request_ratio"},
    "sidecar": {"p50_ratio", "p99_ratio", "throughput_ratio", "cpu_per_request_ratio"},
    "user_tokens": {"p50_ratio", "p99_ratio", "throughput_ratio", "cpu_per_request_ratio"},
    "handshake": {"ratio"},
}
TOP_RATIOS = {
    "cold_vs_keepalive_p50_ratio",
    "cold_mtls_vs_cold_plaintext_p50_ratio",
    "rsa_vs_ecdsa_p50_ratio",
    "tls12_vs_tls13_p50_ratio",
}


def assert_spread(holder: dict[str, Any], key: str) -> None:
    low, high = holder["spread"][key]
    assert low <= holder[key] <= high, (key, holder[key], holder["spread"][key])


def made_up_run(out: Path, repeats: int) -> dict[str, Any]:
    """write_results over samples drawn at random for every chain, `repeats` repeats (no process runs)."""
    rng = random.Random(7)
    variants = []
    for name in CHAINS:
        variant = Variant(name, Layout(out / "pki"), names=SIX_HOPS if name == "mtls-6hop" else CHAIN)
        for _ in range(repeats):
            variant.latencies_ms += [rng.uniform(3, 6) for _ in range(50)]
            variant.throughput += [rng.uniform(250, 350) for _ in range(2)]
            variant.cpu_us += [rng.uniform(3000, 4000) for _ in range(2)]
            variant.end_repeat()
        variants.append(variant)
    sizes = {str(size): {"handshake_ms": 1.5, "openssl_crl_handshake_ms": 2.0, "reload_ms": 1.0} for size in (10, 100)}
    reloads = {"p99_quiet_ms": 8.0, "p99_during_reload_ms": 8.5, "reloads_taken": 9, "reloads_refused": 0}
    ratios_seen = [1.0, 1.1, 0.9][:repeats]
    scaling = {
        "crl": {
            **sizes,
            **reloads,
            "repeated": {"handshake_ratio": ratios_seen, "p99_during_reload_ratio": ratios_seen},
        },
        "allow_list": {
            **{size: {"authz_us": 2.0, "reload_ms": 1.0} for size in sizes},
            **reloads,
            "repeated": {"p99_during_reload_ratio": ratios_seen},
        },
    }
    args = argparse.Namespace(
        repeats=repeats, rounds=1, per_round=50, throughput_rounds=2, throughput_seconds=1.0, concurrency=16,
        handshakes=10, out=out,
    )  # fmt: skip
    return write_results(variants, 2.0, (1.5, 2.0, 0.9), scaling, [9.0, 10.0], args)


def test_every_ratio_has_its_median_and_spread(tmp_path: Path) -> None:
    results = made_up_run(tmp_path, repeats=3)
    assert results == json.loads((tmp_path / "results.json").read_text())
    for group, keys in RATIO_GROUPS.items():
        assert keys <= set(results[group]) and set(results[group]["spread"]) == keys
        for key in keys:
            assert_spread(results[group], key)
    assert set(results["spread"]) == TOP_RATIOS
    for key in TOP_RATIOS:
        assert_spread(results, key)
    # Today's other keys stay where readers find them.
    assert set(results["handshake"]) >= {"cold_hop_added_ms", "bare_mutual_handshake_ms", "event_loop_tls_added_ms"}
    assert {"cold_exchange_ms", "cold_chain_p50_ms"} <= set(results["user_tokens"])
    assert {"authz_us_per_request", "authz_share_of_one_hop", "variants", "machine", "raw_latencies_ms"} <= set(results)
    assert results["scaling"]["chain_p50_ms"].keys() == {"3", "6"}
    crl, allow = results["scaling"]["crl"], results["scaling"]["allow_list"]
    assert crl["handshake_ratio"] == 1.0 and crl["spread"]["handshake_ratio"] == [0.9, 1.1]
    for figures in (crl, allow):
        assert figures["p99_during_reload_ratio"] == 1.0 and figures["spread"]["p99_during_reload_ratio"] == [0.9, 1.1]
    # Each ratio is the median of the repeats' own ratios, not a ratio of pooled samples.
    mtls, plain = results["raw_latencies_ms"]["mtls"], results["raw_latencies_ms"]["plaintext"]
    per_repeat = sorted(
        percentile(mtls[i * 50 : i * 50 + 50], 50) / percentile(plain[i * 50 : i * 50 + 50], 50) for i in range(3)
    )
    assert results["mtls_vs_plaintext"]["p50_ratio"] == pytest.approx(per_repeat[1], rel=1e-3)
    assert results["mtls_vs_plaintext"]["spread"]["p50_ratio"] == pytest.approx([per_repeat[0], per_repeat[2]], 1e-3)
    table = (tmp_path / "results.md").read_text()
    assert all(ratio.text in table for ratio in ratios(1.5)), table
    assert "[" in table and "–" in table


@pytest.mark.e2e
def test_a_short_bench_runs_two_chains_three_times(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.bench", "--chains", "mtls,sidecar", "--repeats", "3",
               "--rounds", "1", "--per-round", "10", "--throughput-rounds", "1", "--throughput-seconds", "0.3",
               "--sizes", "10,100", "--handshakes", "20", "--reload-seconds", "1",
               "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for key in RATIO_GROUPS["sidecar"]:
        assert_spread(results["sidecar"], key)
    assert not {"mtls_vs_plaintext", "user_tokens", "spread"} & set(results)  # their chains did not run
    assert set(results["handshake"]) == {"bare_mutual_handshake_ms", "bare_resumed_handshake_ms"}
    crl, allow = results["scaling"]["crl"], results["scaling"]["allow_list"]
    assert {"10", "100", "handshake_ratio", "spread"} <= set(crl)
    for figures in (crl, allow):  # replaced every second and taken every time, never refused
        assert_spread(figures, "p99_during_reload_ratio")
        assert figures["reloads_taken"] >= 2 and figures["reloads_refused"] == 0, figures
    assert set(results["scaling"]["chain_p50_ms"]) == {"3"}
    assert all(v["errors"] == 0 and v["requests"] == 30 for v in results["variants"].values())
    assert all(v["cpu_us_per_request"] > 0 for v in results["variants"].values())  # read from /proc, nginx's too
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "scaling.png").stat().st_size > 0


def test_httpcore_asks_which_event_loop_without_searching_sys_path() -> None:
    """httpcore imports sniffio on every lock, event and cancel shield of every call to the next hop; if it is
    missing, each is a failed import that walks sys.path (make profile found a tenth of a service's CPU there)."""
    from httpcore._synchronization import current_async_library

    async def asks() -> None:
        loaded = set(sys.modules)
        current_async_library()
        assert "sniffio" in sys.modules, "sniffio is not installed: add it to the dependencies (pyproject.toml)"
        assert set(sys.modules) - loaded <= {"sniffio", "sniffio._impl", "sniffio._version"}

    import asyncio

    asyncio.run(asks())
