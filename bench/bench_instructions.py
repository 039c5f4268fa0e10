"""Instructions per request: gym_vllm vs the bare pass-through, counted by valgrind, the same to ±1% run after run.

Run it (from the repository root; needs valgrind, `apt-get install valgrind`)::

    .venv/bin/python bench/bench_instructions.py [--requests 300] [--targets ...] [--compare-src OLD/gym_vllm.py]
                                                 [--json out.json]

CPU seconds per request (bench_proxy.py) are what the goals are stated in, but on a small shared machine
they move by ±20% between runs: too much to see a change of a few percent. This counts instead what a
change alters, the instructions the proxy process executes (valgrind's callgrind, user space only:
system calls and the kernel's network stack are not counted, so the ratios here are higher than the
CPU-time ratios, for which that work is common to both).

It starts `bench/fake_upstream.py`, then for each target a fresh proxy under
`valgrind --tool=callgrind --instr-atstart=no` (instrumentation off: start-up runs at a few times native
speed). Each proxy gets the request of its target (the same bodies and checks as bench_proxy.py), one probe
checked in full, `--warmup` requests, then `callgrind_control -i on`, `--requests` requests one after another
(each checked like bench_proxy's), and `callgrind_control -d`: the dump holds exactly the measured requests,
the event loop's work between them included.

Targets (bench_proxy.py's, without the direct ones): passthrough, gym-chat, gym-resp, passthrough-tools,
gym-resp-tools, passthrough-ids, gym-resp-ids. `--compare-src FILE` also measures every gym target with
another gym_vllm.py (say, a `git worktree` of an earlier commit) and reports the change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp

import bench_proxy
from harness import (Child, fmt, free_port, gym_child, passthrough_child, progress, running_children, speedups, start_all,
                     upstream_child)

TARGETS = ("passthrough", "gym-chat", "gym-resp", "passthrough-tools", "gym-resp-tools", "passthrough-ids", "gym-resp-ids")


def proxy_child(workdir: Path, label: str, target: bench_proxy.Target, upstream_port: int, port: int,
                src: str | None) -> tuple[Child, Path]:
    """The target's proxy on `port` (the benchmarks' own command; `src`: a gym_vllm.py to run instead of ours) under
    callgrind with instrumentation off, and the path its dumps start with."""
    if target.proxy == "passthrough":
        child = passthrough_child(workdir, port, upstream_port)
    else:
        child = gym_child(workdir, label, upstream_port, port, token_ids=target.proxy == "gym_ids", launcher=src)
    dump = workdir / f"{label}.callgrind"
    child.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}", *child.argv]
    return child, dump


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def instructions_in(dump: Path) -> int:
    """The `totals:` (or `summary:`) line of a callgrind dump: instructions executed while instrumented."""
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{dump} has no totals line")


async def count(target: bench_proxy.Target, child: Child, dump: Path, requests: int, warmup: int) -> int:
    """Instructions the proxy executed for `requests` checked requests, one after another."""
    async with aiohttp.ClientSession() as session:
        expected, _ = await bench_proxy.probe(session, target)
        for phase, n in (("warm-up", warmup), ("measured", requests)):
            if phase == "measured":
                callgrind("-i", "on", str(child.pid))
            for _ in range(n):
                sample = await bench_proxy.one_request(session, target, expected)
                if not sample.ok:
                    raise RuntimeError(f"{target.label}: {phase} request failed: {sample.error}")
    callgrind("-d", str(child.pid))
    dumps = sorted(dump.parent.glob(f"{dump.name}.*"))  # `-d` writes <dump>.1; the final one at exit comes later
    if not dumps:
        raise RuntimeError(f"{child.name}: callgrind wrote no dump")
    return instructions_in(dumps[0])


def report(rows: list[dict], args: argparse.Namespace) -> str:
    floor = {row["shape"]: row["k_instructions"] for row in rows if row["proxy"] == "passthrough"}
    lines = [f"## Instructions per request (valgrind), {args.requests} requests per target after {args.warmup} warm-up, "
             f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {speedups()}", "",
             "| target | source | k instructions / request | × passthrough |", "|---|---|---|---|"]
    for row in rows:
        base = floor.get(row["shape"])
        ratio = f"{row['k_instructions'] / base:.2f}×" if base and row["proxy"] != "passthrough" else "–"
        lines.append(f"| {row['label']} | {row['source']} | {fmt(row['k_instructions'])} | {ratio} |")
    lines += ["", "User-space instructions of the proxy process only (no system calls, no kernel networking); "
                  "× passthrough: over the pass-through's of the same shape."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="instructions per request, gym_vllm vs the pass-through (valgrind)")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per target (default 300)")
    parser.add_argument("--warmup", type=int, default=100, help="requests before counting starts (default 100)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--ids-tokens", type=int, default=64, help="tokens per answer of the ids shape (default 64)")
    parser.add_argument("--compare-src", metavar="FILE", help="another gym_vllm.py to measure on every gym target")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.target_keys = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_keys) - set(TARGETS)
    if unknown:
        parser.error(f"unknown --targets: {', '.join(sorted(unknown))}")
    if args.requests < 1 or args.warmup < 0 or args.ids_tokens < 1:
        parser.error("--requests and --ids-tokens must be >= 1, --warmup >= 0")
    if args.compare_src and not Path(args.compare_src).is_file():
        parser.error(f"--compare-src {args.compare_src}: no such file")
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        parser.error(f"{' and '.join(missing)} not found: install valgrind (apt-get install valgrind)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape_args = bench_proxy.parse_args(["--targets", ",".join(args.target_keys), "--ids-tokens", str(args.ids_tokens)])
    rows: list[dict] = []
    with running_children("bench_instructions.py") as (workdir, children):
        upstream_port, port = free_port(), free_port()
        start_all([upstream_child(workdir, upstream_port, think_tokens=shape_args.think_tokens)], children)
        ports = {"upstream": upstream_port, "passthrough": port, "gym": port, "gym_ids": port}
        for target in bench_proxy.build_targets(shape_args, ports):
            sources = [("this checkout", None)]
            if args.compare_src and target.proxy != "passthrough":
                sources.append((args.compare_src, str(Path(args.compare_src).resolve())))
            for source, src in sources:
                child, dump = proxy_child(workdir, f"{target.key}-{len(rows)}", target, upstream_port, port, src)
                children.append(child)
                child.start()
                child.wait_ready(timeout_s=180)  # start-up under valgrind
                total = asyncio.run(count(target, child, dump, args.requests, args.warmup))
                child.stop()
                row = {"target": target.key, "label": target.label, "shape": target.shape, "proxy": target.proxy,
                       "source": source, "k_instructions": total / args.requests / 1000}
                rows.append(row)
                progress(f"{target.label:<30} {source:<20} {row['k_instructions']:8.0f} k instructions/request")
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"requests": args.requests, "warmup": args.warmup, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
