"""`make profile`: where one request's time goes in each service of the chain, under the throughput phase.

The shipped mTLS chain (A → B → C, as `make bench` runs it) takes `--seconds` of load at concurrency 16 while py-spy
samples each service process. It reads Python frames: C code counts for the Python frame that called it, and
uvloop's own C — sockets and its server-side TLS transport — for the loop (`--native` unwinds C too, but pauses the
process at every sample, which skews the load). Every sample is given to one part of the work by its innermost
frame that belongs to a known part — TLS, HTTP parsing, the httpx pool, FastAPI and Starlette, JSON, our own code
(shared/, services/), the event loop — and each part's samples become microseconds of CPU per request per hop.
py-spy counts a thread only while it runs (idle waiting is left out), so on a quiet machine the columns add up to
the CPU one request costs in that process; on a loaded one, time spent waiting for a core counts too.

Results: printed, and written to bench/profile.json (`--stacks DIR` keeps py-spy's collapsed stacks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import uvloop

from bench.bench import HERE, Variant, concurrent, sequential
from pki import init
from services.local import free_ports, running
from shared.layout import Layout

# Innermost match wins; the order only settles a frame that matches two parts.
PARTS = (  # py-spy names a frame "function (package/module.py:line)"
    ("TLS (ssl module: handshakes, records)", ("(ssl.py", "(<frozen ssl", "_ssl")),
    ("HTTP parsing (httptools, uvicorn's protocol)", ("(httptools", "(h11/", "(uvicorn/protocols/")),
    ("httpx pool and client", ("(httpx/", "(httpcore/", "(anyio/", "(shared/outbound/nativetls")),
    ("FastAPI and Starlette (routing, dependencies, responses)", ("(fastapi/", "(starlette/", "(pydantic")),
    ("JSON", ("(json/", "orjson")),
    # A response's one write (HeldHead.write) is where uvloop seals the TLS record and sends it: the loop's work.
    (LOOP := "event loop (uvloop's C: sockets, server-side TLS records)", ("(shared/inbound/onewrite",)),
    ("ours (shared/, services/)", ("(shared/", "(services/", "(bench/serve")),
    ("uvicorn (other)", ("(uvicorn/",)),
    # uvloop's own C (sockets, and its TLS transport on the serving side) shows as the loop's Python entry point.
    (LOOP, ("(uvloop", "(asyncio/")),
)


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for part, marks in PARTS:
            if any(mark in frame for mark in marks):
                return part
    return "other"


def record(pid: int, seconds: float, rate: int, out: Path, native: bool) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", str(rate)]
    # Native unwinding must pause the process at each sample; without it, py-spy reads it without pausing.
    command += ["--format", "raw", "--output", str(out), *(["--native"] if native else ["--nonblocking"])]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second per process")
    parser.add_argument(
        "--native", action="store_true", help="native frames too (py-spy then pauses each process per sample: slow)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "profile.json")
    parser.add_argument("--stacks", type=Path, help="keep py-spy's collapsed stacks here (for flame graphs)")
    parser.add_argument(
        "--chain",
        choices=("mtls", "plaintext", "mtls-tokens"),
        default="mtls",
        help="the chain to load (the others: to compare)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-profile-") as scratch:
        root = Path(scratch)
        layout = Layout(root / "pki")
        init(layout)
        variant = Variant(args.chain, layout, plaintext=args.chain == "plaintext", tokens=args.chain == "mtls-tokens")
        processes = variant.start(root, iter(free_ports(8)))
        with running(processes):
            uvloop.run(sequential(variant, 100))  # warm-up: imports, pools, first handshakes
            spies = []
            for process in processes:
                assert process.process is not None
                out = root / f"{process.name}.txt"
                spies.append(
                    (
                        process.name,
                        out,
                        record(process.process.pid, args.seconds + 2, args.rate, out, args.native),
                    )
                )
            time.sleep(1)  # py-spy attaches (bounded: it records for --seconds + 2 and stops by itself)
            uvloop.run(concurrent(variant, args.seconds, 16))
            requests = variant.throughput[-1] * args.seconds
            hops = {}
            for name, out, spy in spies:
                _, err = spy.communicate(timeout=args.seconds + 60)
                if spy.returncode != 0 or not out.exists():
                    print(f"py-spy could not record {name}: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
                    return 1
                counts: Counter[str] = Counter()
                stacks = out.read_text().splitlines()
                for line in stacks:
                    stack, _, count = line.rpartition(" ")
                    counts[part_of(stack)] += int(count)
                # The load lasted `seconds` of the `seconds + 2` recorded; the rest is idle and not sampled.
                hops[name] = {part: n / args.rate / requests * 1e6 for part, n in counts.most_common()}
                if args.stacks:
                    args.stacks.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out, args.stacks / f"{name}.txt")
    result = {
        "method": f"py-spy {'--native ' if args.native else ''}at {args.rate} Hz on each service, "
        f"{args.seconds:g} s at concurrency 16 on the {args.chain} chain; µs of CPU per request per hop",
        "rps": variant.throughput[-1],
        "errors": variant.errors,
        "us_per_request": hops,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    parts = [*dict.fromkeys(part for part, _ in PARTS), "other"]
    print(f"{result['rps']:.0f} req/s, {variant.errors} errors; µs of CPU per request")
    print("| part | " + " | ".join(hops) + " |")
    print("|---|" + "---:|" * len(hops))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{hops[h].get(part, 0):.0f}" for h in hops) + " |")
    print("| **total** | " + " | ".join(f"{sum(hops[h].values()):.0f}" for h in hops) + " |")
    return 0 if variant.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
