"""Streaming benchmark: gym_vllm vs a bare pass-through proxy vs talking to the upstream directly.

Run it (from the repository root)::

    .venv/bin/python bench/bench_stream.py [--tokens 256] [--concurrency 1,64,256] [--seconds 8] [--json out.json]

It starts three processes on free ports: `bench/fake_upstream.py` (a cheap vLLM look-alike),
`bench/passthrough.py` (a bare aiohttp proxy, the floor) and `python -m gym_vllm` (with a temporary
config), waits until each answers, then for every concurrency level C runs, one after the other:

    direct      chat streaming straight to the fake upstream
    passthrough chat streaming through the bare proxy
    gym-chat    chat streaming through gym_vllm (`/v1/chat/completions`, stream true)
    gym-resp    Responses streaming through gym_vllm (`/v1/responses`, stream true)

The load generator is asyncio with one aiohttp ClientSession: C workers in a closed loop for
`--warmup` + `--seconds`; only requests that finish inside the measurement window count. SSE events
are counted by `\\n\\n` separators over `iter_any()` chunks (a separator split across two chunks counts
once). A request counts as an error unless it is HTTP 200 with exactly the event count of a probe
request checked in full beforehand.

The machine is shared by all processes, so besides throughput it reports each process's own CPU
time (utime+stime from /proc/<pid>/stat, 1/CLK_TCK resolution) over the window, per event received
by the client. `--paired` runs each gym_vllm target instead in one closed loop with the pass-through, one request
each in turn, and reports what gym_vllm adds to the pass-through's CPU per event, both read over the same window
(bench_proxy.py's `--paired`, whose docstring says why; the ratio within a pair is diluted at low C, the excess is
not). `--profile-gym FILE` runs gym_vllm under cProfile and prints its top functions at the
end (its CPU numbers are then inflated by the profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import aiohttp

from harness import (JSON_HEADERS, Child, alternating_loop, closed_loop, foreign_load, free_port, gym_child, passthrough_child,
                     percentile, print_profile, progress, running_children, speedups, start_all, upstream_child)
from harness import fmt as _fmt


# ============================================================================================
# Load generator
# ============================================================================================


@dataclasses.dataclass
class Target:
    key: str
    label: str
    url: str
    body: bytes
    proxy: Child | None          # the process whose CPU is the proxy's (None: direct)
    is_responses: bool = False


@dataclasses.dataclass
class Sample:
    ok: bool
    end: float                   # perf_counter when the last byte arrived
    ttfb: float
    total: float
    events: int
    reads: int                   # iter_any() chunks: how finely the server's writes arrived
    error: str = ""


class SseCounter:
    """Counts `\\n\\n` event separators over arbitrary chunks, including one split across two chunks."""

    __slots__ = ("events", "pending")

    def __init__(self) -> None:
        self.events = 0
        self.pending = False     # the previous chunk ended in a `\n` that is not yet part of a separator

    def feed(self, chunk: bytes) -> None:
        start = 0
        if self.pending and chunk[:1] == b"\n":
            self.events += 1
            start = 1
        self.events += chunk.count(b"\n\n", start)
        rest = len(chunk) - start
        self.pending = rest >= 1 and chunk[-1] == 10 and not (rest >= 2 and chunk[-2] == 10)


async def one_request(session: aiohttp.ClientSession, target: Target, expected_events: int | None) -> Sample:
    begin = time.perf_counter()
    first: float | None = None
    counter = SseCounter()
    reads = 0
    try:
        async with session.post(target.url, data=target.body, headers=JSON_HEADERS) as response:
            if response.status != 200:
                text = (await response.read())[:200].decode(errors="replace")
                end = time.perf_counter()
                return Sample(False, end, end - begin, end - begin, 0, 0, f"HTTP {response.status}: {text}")
            async for chunk in response.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                reads += 1
                counter.feed(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        end = time.perf_counter()
        return Sample(False, end, end - begin, end - begin, counter.events, reads, f"{exc.__class__.__name__}: {exc}")
    end = time.perf_counter()
    ok = expected_events is None or counter.events == expected_events
    error = "" if ok else f"{counter.events} events, expected {expected_events}"
    return Sample(ok, end, (first or end) - begin, end - begin, counter.events, reads, error)


async def probe(session: aiohttp.ClientSession, target: Target) -> int:
    """One request read in full and checked; returns its event count (what every later request must have)."""
    async with session.post(target.url, data=target.body, headers=JSON_HEADERS) as response:
        raw = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{target.label}: probe answered HTTP {response.status}: {raw[:300]!r}")
    events = [event for event in raw.decode().split("\n\n") if event.strip()]
    last = events[-1] if events else ""
    if target.is_responses:
        data = json.loads(last.split("data: ", 1)[1]) if "data: " in last else {}
        if data.get("type") not in ("response.completed", "response.incomplete"):
            raise RuntimeError(f"{target.label}: probe stream does not end in response.completed/incomplete: {last[:300]!r}")
    elif last.strip() != "data: [DONE]":
        raise RuntimeError(f"{target.label}: probe stream does not end in `data: [DONE]`: {last[:300]!r}")
    counter = SseCounter()
    counter.feed(raw)
    return counter.events


@dataclasses.dataclass
class Result:
    concurrency: int
    target: str
    label: str
    window_s: float
    requests: int
    errors: int
    first_error: str
    events_per_request: int
    reads_per_request: float
    requests_per_s: float
    events_per_s: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    proxy_cpu_s: float | None
    proxy_cpu_percent: float | None
    proxy_cpu_us_per_event: float | None
    upstream_cpu_us_per_event: float
    loadgen_cpu_us_per_event: float
    other_cores: float           # machine busy CPU outside proxy+upstream+load generator, in cores (kernel, other jobs)
    vs_passthrough: float | None = None


async def run_target(session: aiohttp.ClientSession, target: Target, upstream: Child, concurrency: int,
                     warmup_s: float, seconds: float) -> Result:
    expected = await probe(session, target)
    watch = {"upstream": upstream.pid, **({"proxy": target.proxy.pid} if target.proxy else {})}
    window = await closed_loop(lambda: one_request(session, target, expected), concurrency, warmup_s, seconds, watch)
    good = [s for s in window.samples if s.ok]
    errors = [s for s in window.samples if not s.ok]
    events = sum(s.events for s in good)
    span = window.span

    def per_event(cpu_s: float) -> float:
        return cpu_s * 1e6 / events if events else math.nan

    proxy_cpu = window.cpu.get("proxy")
    return Result(
        concurrency=concurrency, target=target.key, label=target.label, window_s=span, requests=len(good),
        errors=len(errors), first_error=errors[0].error if errors else "", events_per_request=expected,
        reads_per_request=sum(s.reads for s in good) / len(good) if good else math.nan,
        requests_per_s=len(good) / span, events_per_s=events / span,
        ttfb_p50_ms=percentile([s.ttfb for s in good], 0.50) * 1e3, ttfb_p99_ms=percentile([s.ttfb for s in good], 0.99) * 1e3,
        total_p50_ms=percentile([s.total for s in good], 0.50) * 1e3, total_p99_ms=percentile([s.total for s in good], 0.99) * 1e3,
        proxy_cpu_s=proxy_cpu, proxy_cpu_percent=None if proxy_cpu is None else 100 * proxy_cpu / span,
        proxy_cpu_us_per_event=None if proxy_cpu is None else per_event(proxy_cpu),
        upstream_cpu_us_per_event=per_event(window.cpu["upstream"]), loadgen_cpu_us_per_event=per_event(window.loadgen_cpu),
        other_cores=window.other_cores,
    )


# ============================================================================================
# Report
# ============================================================================================


def markdown_table(results: list[Result]) -> str:
    header = ("| C | target | req/s | events/s | ev/req | reads/req | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms "
              "| proxy CPU s | proxy CPU % | proxy µs/event | × passthrough | upstream µs/event | other cores | errors |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        rows.append("| " + " | ".join([
            str(r.concurrency), r.label, _fmt(r.requests_per_s, ".1f"), _fmt(r.events_per_s), str(r.events_per_request), _fmt(r.reads_per_request, ".1f"),
            _fmt(r.ttfb_p50_ms, ".1f"), _fmt(r.ttfb_p99_ms, ".1f"), _fmt(r.total_p50_ms, ".1f"), _fmt(r.total_p99_ms, ".1f"),
            _fmt(r.proxy_cpu_s, ".2f"), _fmt(r.proxy_cpu_percent), _fmt(r.proxy_cpu_us_per_event, ".1f"),
            _fmt(r.vs_passthrough, ".2f", "×"), _fmt(r.upstream_cpu_us_per_event, ".1f"), _fmt(r.other_cores, ".2f"), str(r.errors),
        ]) + " |")
    return "\n".join(rows)


@dataclasses.dataclass
class PairedStream:
    """A gym_vllm target and the pass-through measured in one closed loop, in turn (`--paired`)."""
    concurrency: int
    target: str
    label: str
    requests: int                # the target's good replies inside the window
    floor_requests: int          # the pass-through's
    errors: int
    first_error: str
    us_per_event: float          # the target's proxy CPU per event it relayed
    floor_us_per_event: float    # the pass-through's
    excess_us_per_event: float
    vs_passthrough: float
    vs_passthrough_per_stream: float  # CPU per stream over the pass-through's: where gym_vllm sends fewer events than
                                      # vLLM's chunks (a leading <think> block becomes one reasoning item), per event is not


async def run_paired(session: aiohttp.ClientSession, target: Target, floor: Target, upstream: Child, concurrency: int,
                     warmup_s: float, seconds: float) -> PairedStream:
    senders = [(t.key, functools.partial(one_request, session, t, await probe(session, t))) for t in (floor, target)]
    watch = {"upstream": upstream.pid, "floor": floor.proxy.pid, "target": target.proxy.pid}
    window = await alternating_loop(senders, concurrency, warmup_s, seconds, watch)
    events, requests = collections.Counter(), collections.Counter()
    for key, sample in window.samples:
        if sample.ok:
            events[key] += sample.events
            requests[key] += 1
    bad = [sample for _, sample in window.samples if not sample.ok]
    mine = window.cpu["target"] * 1e6 / events[target.key] if events[target.key] else math.nan
    floors = window.cpu["floor"] * 1e6 / events[floor.key] if events[floor.key] else math.nan
    per_stream = {key: window.cpu[side] / requests[key] if requests[key] else math.nan
                  for side, key in (("target", target.key), ("floor", floor.key))}
    return PairedStream(concurrency, target.key, target.label, requests[target.key], requests[floor.key], len(bad),
                        bad[0].error if bad else "", mine, floors, mine - floors, mine / floors if floors else math.nan,
                        per_stream[target.key] / per_stream[floor.key] if per_stream[floor.key] else math.nan)


def paired_table(results: list[PairedStream]) -> str:
    rows = ["| C | target | excess µs/event | × pass-through | proxy µs/event | pass-through µs/event | × per stream "
            "| requests (pass-through) | errors |", "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r.concurrency} | {r.label} | {r.excess_us_per_event:+.1f} | {r.vs_passthrough:.2f}× | {r.us_per_event:.1f} | "
             f"{r.floor_us_per_event:.1f} | {r.vs_passthrough_per_stream:.2f}× | {r.requests} ({r.floor_requests}) | {r.errors} |"
             for r in results]
    return "\n".join(rows)


def add_ratios(results: list[Result]) -> None:
    """gym_vllm's CPU per event over the passthrough's, at the same concurrency."""
    floor = {r.concurrency: r.proxy_cpu_us_per_event for r in results if r.target == "passthrough"}
    for r in results:
        base = floor.get(r.concurrency)
        if r.target.startswith("gym") and base and r.proxy_cpu_us_per_event is not None and not math.isnan(base):
            r.vs_passthrough = r.proxy_cpu_us_per_event / base


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gym_vllm streaming benchmark (direct / passthrough / gym_vllm)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per streamed reply (default 256)")
    parser.add_argument("--concurrency", default="1,64,256", help="comma-separated concurrency levels (default 1,64,256)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per target and level (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds dropped before measuring (default 1)")
    parser.add_argument("--targets", default="direct,passthrough,gym-chat,gym-resp",
                        help="subset of direct,passthrough,gym-chat,gym-resp (default: all)")
    parser.add_argument("--think-tokens", type=int, default=0, help="upstream replies start with a <think> block this long")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="upstream sleep per token (default 0: only yield)")
    parser.add_argument("--token-ids", action="store_true",
                        help="gym_vllm with return_token_id_information on, every stream asking vLLM for token ids and log probs")
    parser.add_argument("--paired", action="store_true",
                        help="run each gym_vllm target and the pass-through in one loop, in turn, and report what gym_vllm "
                             "adds to the pass-through's CPU per event")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--profile-gym", metavar="FILE", help="run gym_vllm under cProfile, dump stats to FILE")
    parser.add_argument("--gym-launcher", metavar="SCRIPT",
                        help="run `python SCRIPT --config ...` instead of `python -m gym_vllm --config ...` "
                             "(e.g. a script that patches gym_vllm, then calls gym_vllm.main())")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency levels must be at least 1")
    args.target_keys = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_keys) - {"direct", "passthrough", "gym-chat", "gym-resp"}
    if unknown:
        parser.error(f"unknown --targets: {', '.join(sorted(unknown))}")
    if args.tokens < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--tokens must be >= 1, --seconds > 0, --warmup >= 0")
    if args.paired and not any(key.startswith("gym") for key in args.target_keys):
        parser.error("--paired measures gym_vllm targets against the pass-through: --targets needs a gym-* target")
    return args


def stream_bodies(tokens: int, token_ids: bool = False) -> tuple[bytes, bytes]:
    """The streaming requests: (chat completions, Responses), `tokens` tokens each. With `token_ids` the chat request
    asks vLLM for what gym_vllm asks it for when `return_token_id_information` is on (each chunk then carries its
    token's id and log-prob entry), so that the pass-through relays the same upstream stream."""
    chat = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    if token_ids:
        chat.update(logprobs=True, top_logprobs=0, return_token_ids=True, return_tokens_as_token_ids=True)
    return json.dumps(chat).encode(), json.dumps({"input": "hi", "stream": True, "max_output_tokens": tokens}).encode()


def build_targets(args: argparse.Namespace, upstream_port: int, pass_port: int, gym_port: int,
                  passthrough: Child, gym: Child) -> list[Target]:
    chat_body, responses_body = stream_bodies(args.tokens, args.token_ids)
    path = "/v1/chat/completions"
    targets = [
        Target("direct", "direct (upstream)", f"http://127.0.0.1:{upstream_port}{path}", chat_body, None),
        Target("passthrough", "passthrough chat", f"http://127.0.0.1:{pass_port}{path}", chat_body, passthrough),
        Target("gym-chat", "gym_vllm chat", f"http://127.0.0.1:{gym_port}{path}", chat_body, gym),
        Target("gym-resp", "gym_vllm responses", f"http://127.0.0.1:{gym_port}/v1/responses", responses_body, gym, True),
    ]
    return [t for t in targets if t.key in args.target_keys]


async def measure(args: argparse.Namespace, targets: list[Target], upstream: Child,
                  progress: Callable[[str], None]) -> list[Result] | list[PairedStream]:
    results: list = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as session:
        for level in args.levels:
            if args.paired:
                floor = next(t for t in targets if t.key == "passthrough")
                for target in (t for t in targets if t.key.startswith("gym")):
                    pair = await run_paired(session, target, floor, upstream, level, args.warmup, args.seconds)
                    results.append(pair)
                    progress(f"C={level:<4} {target.label:<20} paired: {pair.us_per_event:.1f} µs/ev, pass-through "
                             f"{pair.floor_us_per_event:.1f}, excess {pair.excess_us_per_event:+.1f}  errors {pair.errors}"
                             + (f" ({pair.first_error})" if pair.errors else ""))
                    await asyncio.sleep(0.3)
                continue
            for target in targets:
                result = await run_target(session, target, upstream, level, args.warmup, args.seconds)
                results.append(result)
                progress(f"C={level:<4} {target.label:<20} {result.requests_per_s:8.1f} req/s {result.events_per_s:9.0f} ev/s"
                         f"  proxy {_fmt(result.proxy_cpu_us_per_event, '.1f')} µs/ev  errors {result.errors}"
                         + (f" ({result.first_error})" if result.errors else ""))
                await asyncio.sleep(0.3)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    background = foreign_load()
    if background > 0.1:
        progress(f"WARNING: {background:.2f} cores were already busy before the benchmark started; "
                 f"results will be noisy (see the `other cores` column)")
    with running_children("bench_stream") as (workdir, children):
        upstream_port, pass_port, gym_port = free_port(), free_port(), free_port()
        upstream = upstream_child(workdir, upstream_port, args.token_delay_ms, args.think_tokens)
        passthrough = passthrough_child(workdir, pass_port, upstream_port)
        gym = gym_child(workdir, "gym_vllm", upstream_port, gym_port, token_ids=args.token_ids, profile=args.profile_gym,
                        launcher=args.gym_launcher)
        start_all([upstream, passthrough, gym], children)
        progress(f"started: fake_upstream :{upstream_port} (pid {upstream.pid}), passthrough :{pass_port} "
                 f"(pid {passthrough.pid}), gym_vllm :{gym_port} (pid {gym.pid})")

        targets = build_targets(args if not args.paired else argparse.Namespace(
            **{**vars(args), "target_keys": [*args.target_keys, "passthrough"]}), upstream_port, pass_port, gym_port, passthrough, gym)
        results = asyncio.run(measure(args, targets, upstream, progress))
        if args.paired:
            print(f"\n## Streaming, paired: each gym_vllm target and the pass-through in one closed loop, in turn; "
                  f"{args.tokens} tokens/reply, {args.seconds:g} s per pair after {args.warmup:g} s warm-up, {os.cpu_count()} "
                  f"CPUs, Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {speedups()}\n")
            print(paired_table(results))
            print("\nexcess: gym_vllm's CPU per relayed event minus the pass-through's, both read over the same window; "
                  "× pass-through: their ratio, diluted at low C (both wake with caches the other filled); × per stream: the ratio "
                  "of CPU per stream, which compares where gym_vllm sends fewer events than vLLM's chunks (--think-tokens).")
            if args.json:
                Path(args.json).write_text(json.dumps({"paired": [dataclasses.asdict(r) for r in results]}, indent=2))
                print(f"\nwrote {args.json}")
            return 0 if all(r.errors == 0 for r in results) else 3
        add_ratios(results)

    setup = {"tokens": args.tokens, "token_ids": args.token_ids, "seconds": args.seconds, "warmup": args.warmup, "think_tokens": args.think_tokens,
             "token_delay_ms": args.token_delay_ms, "cpus": os.cpu_count(), "python": platform.python_version(),
             "aiohttp": aiohttp.__version__, "speedups": speedups(), "profiled": bool(args.profile_gym),
             "busy_cores_before_start": round(background, 3)}
    print(f"\n## Streaming benchmark: {args.tokens} tokens/reply, {args.seconds:g} s per cell after {args.warmup:g} s warm-up, "
          f"{os.cpu_count()} CPUs, Python {setup['python']}, aiohttp {setup['aiohttp']}, {setup['speedups']}, "
          f"{background:.2f} cores busy before start\n")
    print(markdown_table(results))
    print("\nproxy CPU: utime+stime of the proxy process over the window; µs/event: per SSE event received by the client; "
          "× passthrough: gym_vllm's µs/event over the passthrough's at the same C; "
          "reads/req: iter_any() chunks the client got per reply (how finely the server wrote); "
          "other cores: machine CPU outside proxy+upstream+load generator (kernel networking, other jobs).")
    if args.profile_gym:
        print("NOTE: gym_vllm ran under cProfile; its CPU numbers are inflated.")
        print_profile(args.profile_gym)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": [dataclasses.asdict(r) for r in results]}, indent=2))
        print(f"\nwrote {args.json}")
    return 0 if all(r.errors == 0 for r in results) else 3


if __name__ == "__main__":
    sys.exit(main())
