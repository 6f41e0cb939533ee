"""`make bench`: what mTLS costs on this chain, measured against the same chain in plaintext, in one run.

Nine chains run side by side on loopback, all from the same service code (`bench/serve.py`):

    mtls            as shipped: A → B → C, ECDSA P-256, TLS 1.3, keep-alive on every hop
    plaintext       the same, TLS off (benchmark-only mode)
    mtls-rsa        RSA-2048 certificates
    mtls-tls12      TLS 1.2 on every hop
    mtls-cold       a new connection, so a full mutual handshake, at every hop of every request
    plaintext-cold  a new TCP connection at every hop of every request
    sidecar         the plaintext apps behind nginx sidecars that do the mTLS (bench/sidecar.py)
    mtls-6hop       as shipped, six services long
    mtls-tokens     as shipped, with MESH_REQUIRE_USER_TOKEN=true and a user token on every request (each
                    service's exchange cache warm); apart from the rounds, the cost of a cold exchange

Then, apart from the chains: the bare mutual handshake (bench/handshake.py), against which the cold hops
are set, and how costs grow with the CRL and the allow-list (bench/scaling.py).

Phases are interleaved — round after round, each chain in a shuffled order — so that machine drift
(CPU frequency, other load) falls on all of them alike; ratios are computed from these same runs. The whole
interleaved set is repeated (--repeats, 3 by default): every ratio is computed in each repeat and reported as
their median, with `"spread": [min, max]` beside it — one run of one set once gave 0.95 and then 0.79.
`--chains` runs only some chains (the ratios that need the others are left out): a short run proves the machinery.
Results: bench/results.json, bench/results.md, bench/latency.png and bench/scaling.png; the table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import random
import ssl
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench.handshake import bare_handshake_ms, bare_resumed_handshake_ms, event_loop_handshake_added_ms
from bench.scaling import SIZES, allow_list_scaling, crl_scaling, p99_during_reloads
from bench.sidecar import SidecarPorts, running_sidecars
from client.__main__ import user_token
from pki import Policy, init
from services.local import CHAIN, ServiceProcess, chain_environments, free_ports, running, token_environment
from services.wiring import service_policy
from shared import tls
from shared.authz import AllowList, authorize_id
from shared.layout import Layout
from shared.outbound import callee_check, nativetls
from shared.x509 import PeerIdentity, SpiffeId, load_certificates

HERE = Path(__file__).parent


@dataclass
class Variant:
    name: str
    layout: Layout
    plaintext: bool = False
    tls12: bool = False
    cold: bool = False
    sidecar: bool = False
    tokens: bool = False
    names: tuple[str, ...] = CHAIN
    processes: list[ServiceProcess] = field(default_factory=list)
    sidecar_ports: SidecarPorts | None = None
    latencies_ms: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)  # requests per second, one value per slice
    cpu_us: list[float] = field(default_factory=list)  # the chain's CPU per request (µs), one value per slice
    sidecar_pid: int | None = None  # nginx, whose CPU is the chain's too
    repeats: list[tuple[int, int]] = field(default_factory=list)  # where each repeat ends in the two lists above
    errors: int = 0
    token_port: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # a user token, with `tokens`

    @property
    def url(self) -> str:
        if self.sidecar_ports is not None:  # the client talks mTLS to A's inbound sidecar
            return f"https://127.0.0.1:{self.sidecar_ports.inbound[0]}/chain"
        return f"{'http' if self.plaintext else 'https'}://127.0.0.1:{self.processes[0].port}/chain"

    def start(self, logs: Path, free: Iterator[int]) -> list[ServiceProcess]:
        """The chain's processes (not yet started), on ports taken from `free`."""
        scheme = "http" if self.plaintext else "https"
        ports = take(free, len(self.names))
        quiet = {"MESH_LOG_LEVEL": "warning"}
        if self.tokens:
            [self.token_port] = take(free, 1)
            quiet["MESH_REQUIRE_USER_TOKEN"] = "true"
        envs = chain_environments(ports, self.layout.out, names=self.names, token_port=self.token_port, **quiet)
        if self.sidecar:
            count = len(self.names)
            self.sidecar_ports = SidecarPorts(take(free, count), take(free, count - 1), ports)
        callers = ["client", *self.names[:-1]]
        for i, (env, caller) in enumerate(zip(envs, callers, strict=True)):
            if "MESH_DOWNSTREAM_URL" in env:
                env["MESH_DOWNSTREAM_URL"] = env["MESH_DOWNSTREAM_URL"].replace("https", scheme)
                if self.sidecar_ports is not None:  # the app calls its own outbound sidecar, in plaintext
                    env["MESH_DOWNSTREAM_URL"] = f"http://127.0.0.1:{self.sidecar_ports.outbound[i]}"
            if self.plaintext:
                env["BENCH_PLAINTEXT_CALLER"] = str(self.layout.cert(caller))
            if self.tls12:
                env["BENCH_TLS_MAX"] = "1.2"
            if self.cold:
                env["MESH_DOWNSTREAM_KEEPALIVE"] = "false"
        self.processes = [
            ServiceProcess(env, logs / f"{self.name}-{env['MESH_NAME']}.log", module="bench.serve") for env in envs
        ]
        if self.token_port is not None:
            tokens = token_environment(self.token_port, self.layout.out, MESH_LOG_LEVEL="warning")
            log = logs / f"{self.name}-token-service.log"
            return [*self.processes, ServiceProcess(tokens, log, module="services.token_service")]
        return self.processes

    def new_user_token(self) -> None:
        """With `tokens`: a fresh token for alice, as the edge gets it (python -m client --user)."""
        if self.token_port is not None:
            material = self.layout.material("client")
            token = user_token(f"https://127.0.0.1:{self.token_port}", material, "alice", "service-a")
            self.headers = {"Authorization": f"Bearer {token}"}

    def end_repeat(self) -> None:
        self.repeats.append((len(self.latencies_ms), len(self.throughput)))

    def repeat(self, index: int) -> Variant:
        """This chain's samples from one repeat only (a summary's input)."""
        start = self.repeats[index - 1] if index else (0, 0)
        end = self.repeats[index]
        return dataclasses.replace(
            self,
            latencies_ms=self.latencies_ms[start[0] : end[0]],
            throughput=self.throughput[start[1] : end[1]],
            cpu_us=self.cpu_us[start[1] : end[1]],
        )

    def cpu_seconds(self) -> float:
        """CPU used so far by the chain's processes: its services (and token service) and its sidecars."""
        pids = [p.process.pid for p in self.processes if p.process is not None]
        if self.sidecar_pid is not None:
            pids.append(self.sidecar_pid)
        return sum(map(cpu_seconds, pids))

    def client(self) -> httpx.AsyncClient:
        context = tls.client_context(self.layout.material("client"))
        if self.tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        limits = httpx.Limits(max_keepalive_connections=0 if self.cold else 20, keepalive_expiry=4)
        # The same client stack as the services' own calls to the next hop (shared.outbound.downstream).
        check = callee_check(authorize_id(SpiffeId("mesh.internal", "/service-a")))
        return httpx.AsyncClient(transport=nativetls.transport(context, limits, check), timeout=10)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process `pid` and all its threads, from /proc (Linux; 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential(variant: Variant, count: int) -> None:
    """`count` timed requests, one after another. A fresh client's first request opens its connection (a full
    mutual handshake at the first hop): it is sent untimed, so warm chains measure warm connections only —
    what a connection costs is what the cold chains measure."""
    variant.new_user_token()  # the round's first, untimed, request fills the services' exchange caches
    async with variant.client() as client:
        await client.get(variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"})
        for _ in range(count):
            start = time.perf_counter()
            response = await client.get(variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"})
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code == 200:
                variant.latencies_ms.append(elapsed)
            else:
                variant.errors += 1


async def concurrent(variant: Variant, seconds: float, concurrency: int) -> None:
    done = 0
    variant.new_user_token()
    async with variant.client() as client:
        # Untimed, two bursts at full concurrency: every hop's pool holds the connections this load needs (and,
        # with tokens, the exchange caches are filled). The other chains' slices outlast a service's 4-second
        # keep-alive expiry, and a slice that began cold would count up to 16 mutual handshakes per hop: what the
        # cold chains measure, not throughput on kept-alive connections.
        for _ in range(2):
            await asyncio.gather(
                *(
                    client.get(variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"})
                    for _ in range(concurrency)
                )
            )
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.get(
                    variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"}
                )
                if response.status_code == 200:
                    done += 1
                else:
                    variant.errors += 1

        start, cpu = time.perf_counter(), variant.cpu_seconds()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        variant.throughput.append(done / (time.perf_counter() - start))
        variant.cpu_us.append((variant.cpu_seconds() - cpu) / max(done, 1) * 1e6)


async def cold_exchanges(variant: Variant, count: int) -> list[float]:
    """Chain latency with a token nobody has exchanged yet: A and B each exchange it before calling on."""
    latencies = []
    async with variant.client() as client:
        await client.get(variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"})
        for _ in range(count):
            variant.new_user_token()  # untimed: what the edge does once per user session
            start = time.perf_counter()
            response = await client.get(variant.url, headers=variant.headers, extensions={"sni_hostname": "service-a"})
            if response.status_code == 200:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                variant.errors += 1
    return latencies


STARTED = time.monotonic()


def elapsed() -> str:
    return f"[{time.monotonic() - STARTED:5.1f} s]"


def take(free: Iterator[int], count: int) -> list[int]:
    return [next(free) for _ in range(count)]


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def authz_microseconds(layout: Layout, runs: int = 200_000) -> float:
    """One authorization decision (trusted now + leaf + clientAuth + allow-list lookup), as each request pays it."""
    policy = service_policy(AllowList.load(layout.allow_list("service-b")), tls.LiveTLS(layout.material("service-b")))
    caller = PeerIdentity.from_certificate(load_certificates(layout.cert("service-a"))[0])
    best = min(timeit.repeat(lambda: policy(caller), number=runs, repeat=5))
    return best / runs * 1e6


def machine() -> dict[str, object]:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    import httptools
    import uvicorn

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "platform": platform.platform(),
        "uvicorn": uvicorn.__version__,
        "uvloop": uvloop.__version__,
        "httptools": httptools.__version__,
        "httpx": httpx.__version__,
    }


def summarise(variant: Variant) -> dict[str, float]:
    lat = variant.latencies_ms
    summary = {
        "requests": len(lat),
        "errors": variant.errors,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat),
    }
    if variant.throughput:
        summary["rps"] = statistics.median(variant.throughput)
        summary["cpu_us_per_request"] = statistics.median(variant.cpu_us)
    return summary


CHAINS = (
    "mtls",
    "plaintext",
    "mtls-rsa",
    "mtls-tls12",
    "mtls-cold",
    "plaintext-cold",
    "sidecar",
    "mtls-6hop",
    "mtls-tokens",
)
THROUGHPUT_CHAINS = ("mtls", "plaintext", "sidecar", "mtls-tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats; each ratio is their median, with min and max"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds per repeat (default 2)")
    parser.add_argument("--per-round", type=int, default=200, help="sequential requests per chain per round")
    parser.add_argument("--throughput-rounds", type=int, default=2, help="throughput slices per chain per repeat")
    parser.add_argument("--throughput-seconds", type=float, default=2.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chains", default=",".join(CHAINS), help="which chains (default: all; ratios need both)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="CRL and allow-list sizes for scaling")
    parser.add_argument(
        "--handshakes", type=int, default=300, help="bare handshakes timed per figure (authorizations: 600× as many)"
    )
    parser.add_argument(
        "--reload-seconds", type=float, default=4.0, help="per phase: p99 with the largest CRL/allow-list reloading"
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--chart-only", action="store_true", help="redraw latency.png from results.json, run nothing")
    args = parser.parse_args(argv)
    if args.chart_only:
        results = json.loads((args.out / "results.json").read_text())
        chart(results["raw_latencies_ms"], args.out / "latency.png")
        scaling_chart(results["scaling"], args.out / "scaling.png")
        return 0
    chains = args.chains.split(",")
    if unknown := set(chains) - set(CHAINS):
        parser.error(f"--chains: no chain called {', '.join(sorted(unknown))}; the chains are {', '.join(CHAINS)}")
    sizes = tuple(int(size) for size in args.sizes.split(","))
    random.seed(20261126)

    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as scratch:
        root = Path(scratch)
        ecdsa, rsa, six = Layout(root / "ecdsa"), Layout(root / "rsa"), Layout(root / "six")
        init(ecdsa)
        every = {
            "mtls": lambda: Variant("mtls", ecdsa),
            "plaintext": lambda: Variant("plaintext", ecdsa, plaintext=True),
            "mtls-rsa": lambda: Variant("mtls-rsa", rsa),
            "mtls-tls12": lambda: Variant("mtls-tls12", ecdsa, tls12=True),
            "mtls-cold": lambda: Variant("mtls-cold", ecdsa, cold=True),
            "plaintext-cold": lambda: Variant("plaintext-cold", ecdsa, plaintext=True, cold=True),
            "sidecar": lambda: Variant("sidecar", ecdsa, plaintext=True, sidecar=True),
            "mtls-6hop": lambda: Variant("mtls-6hop", six, names=SIX_HOPS),
            "mtls-tokens": lambda: Variant("mtls-tokens", ecdsa, tokens=True),
        }
        if "mtls-rsa" in chains:
            init(rsa, key_type="rsa")
        if "mtls-6hop" in chains:
            init(six, six_hop_policy())
        variants = [every[name]() for name in CHAINS if name in chains]
        # Every port at once: ports picked one chain at a time, before any process binds them, can repeat — and a
        # service whose port another chain's service holds would pass for ready, answering with the wrong PKI.
        free = iter(free_ports(64))
        chains = [v.start(root, free) for v in variants]
        sidecar = next((v for v in variants if v.sidecar), None)
        with contextlib.ExitStack() as stack:
            # Chain after chain: thirty processes importing at once on two shared cores can take longer to listen
            # than a service is given (services.local.running).
            for processes in chains:
                stack.enter_context(running(processes))
            if sidecar is not None and sidecar.sidecar_ports is not None:
                sidecar.sidecar_pid = stack.enter_context(running_sidecars(ecdsa, CHAIN, sidecar.sidecar_ports))
            print(f"{elapsed()} {sum(map(len, chains))} processes listen", file=sys.stderr)
            for v in variants:  # warm-up: imports, pools, first handshakes
                uvloop.run(sequential(v, 50))
                v.latencies_ms.clear()
            trio = [v for v in variants if v.name in THROUGHPUT_CHAINS]
            for repeat in range(args.repeats):
                for _ in range(args.rounds):
                    for v in random.sample(variants, len(variants)):
                        uvloop.run(sequential(v, args.per_round // 4 if v.cold else args.per_round))
                for _ in range(args.throughput_rounds):
                    for v in random.sample(trio, len(trio)):
                        uvloop.run(concurrent(v, args.throughput_seconds, args.concurrency))
                for v in variants:
                    v.end_repeat()
                print(f"{elapsed()} repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
            authz_us = authz_microseconds(ecdsa, runs=args.handshakes * 600)
            tokens = next((v for v in variants if v.tokens), None)
            cold_token_ms = uvloop.run(cold_exchanges(tokens, args.per_round // 2)) if tokens else []
        print(f"{elapsed()} bare handshake and scaling …", file=sys.stderr)
        server = tls.server_context(ecdsa.material("service-b"))
        client = tls.client_context(ecdsa.material("service-a"))
        bare_ms = bare_handshake_ms(server, client, "service-b", runs=args.handshakes)
        loop_ms = event_loop_handshake_added_ms(server, client, "service-b", runs=args.handshakes * 5 // 3)
        ticketing = tls.server_context(ecdsa.material("service-b"))  # a copy that may issue tickets
        resumed_ms = bare_resumed_handshake_ms(ticketing, client, "service-b", runs=args.handshakes)
        scaling = {
            "crl": crl_scaling(ecdsa, root, sizes, args.repeats),
            "allow_list": allow_list_scaling(ecdsa, root, sizes, runs=args.handshakes * 300),
        }
        print(f"{elapsed()} p99 during reloads …", file=sys.stderr)
        reloads = p99_during_reloads(ecdsa, root, max(sizes), args.repeats, args.reload_seconds)
        for kind, figures in reloads.items():
            repeated = scaling[kind].pop("repeated", {}) | figures.pop("repeated")
            scaling[kind] |= figures | {"repeated": repeated}
        results = write_results(variants, authz_us, (bare_ms, loop_ms, resumed_ms), scaling, cold_token_ms, args)
    print(results["table"])
    print(f"{elapsed()} done", file=sys.stderr)
    return 0 if all(v.errors == 0 for v in variants) else 1


SIX_HOPS = ("service-a", "service-b", "service-c", "service-d", "service-e", "service-f")


def six_hop_policy() -> Policy:
    """The same mesh, twice as long: each service admits the one before it."""
    allow = {callee: (caller,) for caller, callee in zip(("client", *SIX_HOPS[:-1]), SIX_HOPS, strict=True)}
    return dataclasses.replace(Policy.load(), services=SIX_HOPS, allow=allow)


Summaries = dict[str, dict[str, float]]  # chain name → summarise()


@dataclass(frozen=True)
class Ratio:
    """One figure computed in every repeat from that repeat's summaries; results keep its median and spread."""

    group: str | None  # the key of results.json holding it (None: the top level)
    key: str
    text: str  # what it is, for results.md
    chains: tuple[str, ...]  # the chains it needs
    of: Callable[[Summaries], float]


def _over(a: str, b: str, stat: str) -> Callable[[Summaries], float]:
    return lambda s: s[a][stat] / s[b][stat]


def ratios(bare_ms: float) -> list[Ratio]:
    def cold_hop_added_ms(s: Summaries) -> float:
        return (s["mtls-cold"]["p50_ms"] - s["plaintext-cold"]["p50_ms"]) / len(CHAIN)

    tables = [
        (
            "mtls_vs_plaintext",
            "mtls",
            "plaintext",
            "mTLS ÷ plaintext (keep-alive)",
            ("p50", "p90", "p99", "rps", "cpu"),
        ),
        ("sidecar", "mtls", "sidecar", "in-process mTLS ÷ nginx sidecars", ("p50", "p99", "rps", "cpu")),
        ("user_tokens", "mtls-tokens", "mtls", "user tokens on every hop ÷ mTLS only", ("p50", "p99", "rps", "cpu")),
    ]
    # Per statistic: its ratio's key, its words, its figure in a chain's summary. Throughput on two shared cores
    # moves with whatever else runs; the CPU a request costs the chain's processes (services and sidecars; not
    # the load generator) moves far less: both are reported.
    named = {
        "rps": ("throughput", "throughput", "rps"),
        "cpu": ("cpu_per_request", "CPU per request", "cpu_us_per_request"),
    }
    found = [
        Ratio(group, f"{key}_ratio", f"{text}, {words}", (a, b), _over(a, b, summary_key))
        for group, a, b, text, stats in tables for stat in stats
        for key, words, summary_key in [named.get(stat, (stat, stat, f"{stat}_ms"))]
    ]  # fmt: skip
    return [
        *found,
        Ratio(None, "cold_vs_keepalive_p50_ratio", "cold (a handshake at every hop) ÷ keep-alive, p50",
              ("mtls-cold", "mtls"), _over("mtls-cold", "mtls", "p50_ms")),
        Ratio(None, "cold_mtls_vs_cold_plaintext_p50_ratio", "cold mTLS ÷ cold plaintext, p50",
              ("mtls-cold", "plaintext-cold"), _over("mtls-cold", "plaintext-cold", "p50_ms")),
        Ratio(None, "rsa_vs_ecdsa_p50_ratio", "RSA-2048 ÷ ECDSA P-256, p50", ("mtls-rsa", "mtls"),
              _over("mtls-rsa", "mtls", "p50_ms")),
        Ratio(None, "tls12_vs_tls13_p50_ratio", "TLS 1.2 ÷ TLS 1.3, p50", ("mtls-tls12", "mtls"),
              _over("mtls-tls12", "mtls", "p50_ms")),
        Ratio("handshake", "ratio", "a new connection's cost per hop ÷ a bare mutual handshake",
              ("mtls-cold", "plaintext-cold"), lambda s: cold_hop_added_ms(s) / bare_ms),
    ]  # fmt: skip


def spread_of(values: Sequence[float]) -> tuple[float, list[float]]:
    """The median of the repeats' values, and [min, max]."""
    return statistics.median(values), [min(values), max(values)]


def place(results: dict[str, Any], group: str | None, key: str, values: Sequence[float]) -> None:
    """Put a repeated figure where today's readers look for it (its median), its spread beside it."""
    holder = results if group is None else results.setdefault(group, {})
    holder[key], holder.setdefault("spread", {})[key] = spread_of(values)


def write_results(
    variants: list[Variant],
    authz_us: float,
    handshakes: tuple[float, float, float],
    scaling: dict[str, Any],
    cold_token_ms: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    by_name = {v.name: summarise(v) for v in variants}
    repeats = [{v.name: summarise(v.repeat(i)) for v in variants} for i in range(args.repeats)]
    bare_ms, loop_ms, resumed_ms = handshakes
    results: dict[str, Any] = {}
    for ratio in ratios(bare_ms):
        if set(ratio.chains) <= set(by_name):
            place(results, ratio.group, ratio.key, [ratio.of(s) for s in repeats])
    if "mtls" in by_name:
        results["authz_us_per_request"] = authz_us
        results["authz_share_of_one_hop"] = authz_us / (by_name["mtls"]["p50_ms"] * 1000 / len(CHAIN))
    if "handshake" in results:
        cold_hop_added_ms = (by_name["mtls-cold"]["p50_ms"] - by_name["plaintext-cold"]["p50_ms"]) / len(CHAIN)
        results["handshake"] |= {
            "cold_hop_added_ms": cold_hop_added_ms,
            # Where the rest goes: the event loop's TLS transport (same process, no app) adds this over TCP…
            "event_loop_tls_added_ms": loop_ms,
            # …and what is left is crossing processes (one more wake-up per round trip) and our set-up path.
            "cross_process_and_setup_ms": cold_hop_added_ms - loop_ms,
        }
    # A bare handshake and, for comparison, what TLS 1.3 resumption would cost instead (left off: see README).
    results.setdefault("handshake", {}).update(bare_mutual_handshake_ms=bare_ms, bare_resumed_handshake_ms=resumed_ms)
    if cold_token_ms:
        # A fresh user token: A and B each exchange it (one mTLS call to the token service) before calling on.
        results["user_tokens"] |= {
            "cold_chain_p50_ms": percentile(cold_token_ms, 50),
            "cold_exchange_ms": (percentile(cold_token_ms, 50) - by_name["mtls-tokens"]["p50_ms"]) / 2,
        }
    for figures in scaling.values():  # figures measured in every repeat (scaling.crl's handshake_ratio)
        for key, values in figures.pop("repeated", {}).items():
            figures[key], figures.setdefault("spread", {})[key] = spread_of(values)
    results["scaling"] = {
        **scaling,
        "chain_p50_ms": {
            str(len(v.names)): by_name[v.name]["p50_ms"] for v in variants if v.name in ("mtls", "mtls-6hop")
        },
    }
    results["variants"] = by_name
    results["method"] = {
        "repeats": f"{args.repeats} repeats of the interleaved latency rounds and throughput slices below; every "
        'ratio is computed in each repeat, and reported as the median of the repeats with "spread": [min, max]',
        "latency": f"per repeat, {args.rounds} interleaved rounds of {args.per_round} sequential chain requests per "
        f"chain ({args.per_round // 4} for the cold chains), keep-alive unless cold; each round's client opens its "
        "connection with one untimed request, so warm percentiles exclude connection set-up",
        "throughput": f"per repeat, {args.throughput_rounds} interleaved slices of {args.throughput_seconds:g} s at "
        f"concurrency {args.concurrency}, {', '.join(THROUGHPUT_CHAINS)}, each after two untimed bursts that fill "
        "every hop's pool; median of a repeat's slices",
        "cpu per request": "during each throughput slice, the user and system CPU of the chain's processes "
        "(services, token service, nginx sidecars; not the load generator) from /proc, over the requests answered",
        "cold exchange": f"{args.per_round // 2} chain requests, each with a new user token (got untimed); "
        "(their p50 - the warm mtls-tokens p50) / 2 exchanges",
        "handshake": f"bare: one thread, MemoryBIO, the services' contexts, median of {args.handshakes}; cold hop "
        "added: (cold mTLS chain p50 - cold plaintext chain p50) / 3",
    }
    results["machine"] = machine()
    results["raw_latencies_ms"] = {v.name: [round(x, 3) for x in v.latencies_ms] for v in variants}
    table = markdown_table(results, ratios(bare_ms))
    results["table"] = table
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(table + "\n")
    chart({v.name: v.latencies_ms for v in variants}, args.out / "latency.png")
    scaling_chart(results["scaling"], args.out / "scaling.png")
    return results


def figure(holder: dict[str, Any], key: str) -> str:
    """`1.02× [0.98–1.05]`: the median of the repeats and their spread."""
    low, high = holder["spread"][key]
    return f"**{holder[key]:.2f}×** [{low:.2f}–{high:.2f}]"


def markdown_table(results: dict[str, Any], every: list[Ratio]) -> str:
    variants: Summaries = results["variants"]
    info = results["machine"]
    lines = [
        "| chain | requests | p50 ms | p90 ms | p99 ms | req/s (c=16) | CPU µs per request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in variants.items():
        rps = f"{s['rps']:.0f}" if "rps" in s else "–"
        cpu = f"{s['cpu_us_per_request']:.0f}" if "cpu_us_per_request" in s else "–"
        lines.append(
            f"| {name} | {s['requests']} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {rps} | {cpu} |"
        )
    lines += ["", "| ratio (median of the repeats [min–max]) | |", "|---|---:|"]
    for ratio in every:
        holder = results if ratio.group is None else results.get(ratio.group, {})
        if ratio.key in holder:
            lines.append(f"| {ratio.text} | {figure(holder, ratio.key)} |")
    lines.append("")
    if "authz_us_per_request" in results:
        lines.append(
            f"authorization check: {results['authz_us_per_request']:.2f} µs per request = "
            f"{100 * results['authz_share_of_one_hop']:.2f} % of one hop's time"
        )
    hand = results["handshake"]
    if "cold_hop_added_ms" in hand:
        lines.append(
            f"a new connection adds {hand['cold_hop_added_ms']:.2f} ms per hop; a bare mutual handshake costs "
            f"{hand['bare_mutual_handshake_ms']:.2f} ms (on uvloop's TLS transport, same process, no app: "
            f"{hand['event_loop_tls_added_ms']:.2f} ms; the rest, {hand['cross_process_and_setup_ms']:.2f} ms, is "
            f"crossing processes and our set-up path); a resumed one would cost "
            f"{hand['bare_resumed_handshake_ms']:.2f} ms (left off)"
        )
    if "cold_exchange_ms" in results.get("user_tokens", {}):
        tok = results["user_tokens"]
        lines.append(
            f"a cold token exchange costs **{tok['cold_exchange_ms']:.2f} ms** "
            f"(chain p50 with a fresh token: {tok['cold_chain_p50_ms']:.2f} ms)"
        )
    scale = results["scaling"]
    crl, allow, chain = scale["crl"], scale["allow_list"], scale["chain_p50_ms"]
    sizes = [key for key in crl if key.isdigit()]
    lines += [
        "",
        "| size | handshake with CRL ms | …with the CRL in OpenSSL ms | CRL reload ms | authorization µs "
        "| allow-list reload ms |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {size} | {crl[size]['handshake_ms']:.2f} | {crl[size]['openssl_crl_handshake_ms']:.2f} | "
            f"{crl[size]['reload_ms']:.1f} | "
            f"{allow[size]['authz_us']:.2f} | {allow[size]['reload_ms']:.1f} |"
            for size in sizes
        ),
    ]
    if "handshake_ratio" in crl:
        lines.append(f"handshake with the largest CRL ÷ with the smallest: {figure(crl, 'handshake_ratio')}")
    for name, figures in (("CRL", crl), ("allow-list", allow)):
        if "p99_during_reload_ratio" in figures:
            lines.append(
                f"p99 while the largest {name} is replaced every second ÷ p99 without: "
                f"{figure(figures, 'p99_during_reload_ratio')} ({figures['p99_during_reload_ms']:.2f} / "
                f"{figures['p99_quiet_ms']:.2f} ms; {figures['reloads_taken']} reloads taken, "
                f"{figures['reloads_refused']} refused)"
            )
    if chain:
        lines.append("chain p50: " + "; ".join(f"{hops} hops: {ms:.2f} ms" for hops, ms in chain.items()))
    lines += [
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}; {info['openssl']}; "
        f"uvicorn {info['uvicorn']} (httptools, uvloop {info['uvloop']}); httpx {info['httpx']}.",
    ]
    return "\n".join(lines)


def chart(latencies_ms: dict[str, list[float]], path: Path) -> None:
    """Latency distributions, warm chains left, cold right (from a run, or from results.json: --chart-only)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (warm, cold) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, latencies in latencies_ms.items():
        axis = cold if name.endswith("-cold") else warm
        ordered = sorted(latencies)
        axis.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=name)
    for axis, title in ((warm, "keep-alive"), (cold, "new connection at every hop")):
        axis.set_title(f"Chain latency, {title}")
        axis.set_xlabel("ms (client → A → B → C → back)")
        axis.set_ylabel("fraction of requests ≤ x")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticks([5, 10, 20, 50] if axis is warm else [10, 20, 50])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scaling_chart(scaling: dict[str, dict], path: Path) -> None:
    """Cost against size, log-log: a straight line of slope 1 is linear growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in scaling["crl"] if s.isdigit()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(sizes, [scaling["crl"][str(s)]["handshake_ms"] for s in sizes], "o-", label="handshake with the CRL")
    left.plot(sizes, [scaling["crl"][str(s)]["reload_ms"] for s in sizes], "o-", label="CRL reload")
    left.plot(sizes, [scaling["allow_list"][str(s)]["reload_ms"] for s in sizes], "o-", label="allow-list reload")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("entries (CRL serials, allow-list lines)")
    left.set_ylabel("ms")
    left.set_title("Growth with the CRL and the allow-list")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    hops = sorted(int(h) for h in scaling["chain_p50_ms"])
    right.bar([str(h) for h in hops], [scaling["chain_p50_ms"][str(h)] for h in hops])
    right.set_xlabel("services in the chain")
    right.set_ylabel("chain p50, ms (keep-alive)")
    right.set_title("Growth with the chain")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
