"""`make soak`: many chain requests through the local mesh, checking that nothing leaks.

Starts A → B → C on free loopback ports (its own processes), sends N chain requests at a fixed
concurrency as the client, and prints errors, latency percentiles, and each service's resident memory
(RSS) and open file descriptors before and after. Bounded in count and in time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pki import init
from services.local import ServiceProcess, chain_environments, free_ports, running
from shared import tls
from shared.layout import Layout

# What "flat" means: after warm-up, RSS may grow by allocator noise and caches, FDs by a few pooled
# connections — not by anything proportional to the number of requests.
RSS_BOUND_KB = 16 * 1024
FD_BOUND = 8


@dataclass
class Usage:
    rss_kb: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return cls(rss, len(list(Path(f"/proc/{pid}/fd").iterdir())))


@dataclass
class SoakResult:
    requests: int
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    before: dict[str, Usage] = field(default_factory=dict)
    after: dict[str, Usage] = field(default_factory=dict)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")

    def flat(self) -> bool:
        return all(
            self.after[n].rss_kb - self.before[n].rss_kb <= RSS_BOUND_KB
            and self.after[n].fds - self.before[n].fds <= FD_BOUND
            for n in self.before
        )

    def report(self) -> str:
        lines = [
            f"{self.requests} chain requests in {self.seconds:.1f} s ({self.requests / self.seconds:.0f}/s), "
            f"errors: {len(self.errors)}",
            f"latency ms: p50 {self.percentile(50):.1f}  p99 {self.percentile(99):.1f}  "
            f"mean {statistics.fmean(self.latencies_ms):.1f}",
            f"{'service':<10} {'RSS before':>11} {'RSS after':>10} {'FDs before':>11} {'FDs after':>10}",
        ]
        for name in self.before:
            b, a = self.before[name], self.after[name]
            lines.append(f"{name:<10} {b.rss_kb / 1024:>9.1f}MB {a.rss_kb / 1024:>8.1f}MB {b.fds:>11} {a.fds:>10}")
        verdict = "flat" if self.flat() else "NOT flat"
        lines.append(f"resources: {verdict} (bounds: RSS +{RSS_BOUND_KB // 1024} MB, FDs +{FD_BOUND})")
        for error in self.errors[:5]:
            lines.append(f"error: {error}")
        return "\n".join(lines)


async def _drive(url: str, context: object, total: int, concurrency: int, deadline: float, result: SoakResult) -> None:
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=4)
    async with httpx.AsyncClient(verify=context, timeout=10, limits=limits) as client:  # type: ignore[arg-type]

        async def worker() -> None:
            nonlocal sent
            while sent < total and time.monotonic() < deadline:
                sent += 1
                start = time.perf_counter()
                try:
                    response = await client.get(url, extensions={"sni_hostname": "service-a"})
                    if response.status_code != 200:
                        result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as e:
                    result.errors.append(repr(e))
                result.latencies_ms.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def soak(
    processes: list[ServiceProcess], layout: Layout, total: int, concurrency: int, max_seconds: float
) -> SoakResult:
    """Drive `total` chain requests through running `processes` (A first) and measure them."""
    material = tls.TLSMaterial(layout.ca_cert, layout.cert("client"), layout.key("client"), layout.crl)
    url = f"https://127.0.0.1:{processes[0].port}/chain"
    result = SoakResult(total)
    pids = {p.name: p.process.pid for p in processes if p.process}
    # Warm up first (imports, pools, allocator arenas), so "before" is the steady state, not the cold start.
    asyncio.run(_drive(url, tls.client_context(material), 4 * concurrency, concurrency, time.monotonic() + 30, result))
    result.errors.clear()
    result.latencies_ms.clear()
    result.before = {name: Usage.of(pid) for name, pid in pids.items()}
    start = time.monotonic()
    asyncio.run(_drive(url, tls.client_context(material), total, concurrency, start + max_seconds, result))
    result.seconds = time.monotonic() - start
    result.requests = len(result.latencies_ms)
    time.sleep(1)  # let idle connections settle
    result.after = {name: Usage.of(pid) for name, pid in pids.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=300, help="stop early after this long")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-soak-") as scratch:
        layout = Layout(Path(scratch) / "pki")
        init(layout)
        envs = chain_environments(free_ports(3), layout.out, MESH_LOG_LEVEL="warning")
        processes = [ServiceProcess(env, Path(scratch) / f"{env['MESH_NAME']}.log") for env in envs]
        with running(processes):
            result = soak(processes, layout, args.requests, args.concurrency, args.max_seconds)
    print(result.report())
    return 0 if not result.errors and result.flat() else 1


if __name__ == "__main__":
    sys.exit(main())
