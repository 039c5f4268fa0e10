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

Streams (bench_stream.py's requests, 256 tokens): passthrough-stream, gym-chat-stream, gym-resp-stream, counted per
event the client got. Their fake upstream spaces its tokens (`--stream-token-delay-ms`, 0.5 by default) and
`--stream-concurrency` streams run at once, so that the proxy reads a few events at a time, as from a real engine;
without it the proxy, slowed down by valgrind, would read each reply in a few large pieces.

`--conversion` also counts, for every gym target, the conversion alone: what the handler does to the request besides
its I/O (the request decoded and checked, converted, vLLM's body written; vLLM's reply, fetched once from the fake
upstream, decoded and converted, the answer written), run `--requests` times in a loop in a process of its own, under
callgrind from the start: its count minus that of a run with no iterations. The rest of gym_vllm's count is the
I/O path (aiohttp's client and server, timeouts, ids, counters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp

import bench_proxy
import bench_stream
import gym_vllm
from harness import (Child, fmt, free_port, gym_child, gym_config, passthrough_child, progress, running_children, speedups,
                     start_all, upstream_child)

REQUEST_TARGETS = ("passthrough", "gym-chat", "gym-resp", "passthrough-tools", "gym-resp-tools", "passthrough-ids", "gym-resp-ids")
STREAM_TARGETS = {  # key: (label, proxy, path)
    "passthrough-stream": ("passthrough chat stream", "passthrough", "/v1/chat/completions"),
    "gym-chat-stream": ("gym_vllm chat stream", "gym", "/v1/chat/completions"),
    "gym-resp-stream": ("gym_vllm responses stream", "gym", "/v1/responses"),
}
TARGETS = (*REQUEST_TARGETS, *STREAM_TARGETS)
STREAM_TOKENS = 256


def proxy_sources(args: argparse.Namespace, proxy: str) -> list[tuple[str, str | None]]:
    """Each source a proxy is measured from, (its name, the gym_vllm.py to run instead of ours): this checkout, and for
    gym_vllm `--compare-src`."""
    sources: list[tuple[str, str | None]] = [("this checkout", None)]
    if args.compare_src and proxy != "passthrough":
        sources.append((args.compare_src, str(Path(args.compare_src).resolve())))
    return sources


def start_proxy(workdir: Path, children: list[Child], label: str, proxy: str, upstream_port: int, port: int,
                src: str | None) -> tuple[Child, Path]:
    """The proxy (`passthrough`, `gym` or `gym_ids`) started on `port` (the benchmarks' own command; `src`: a gym_vllm.py
    to run instead of ours) under callgrind with instrumentation off, and the path its dumps start with."""
    if proxy == "passthrough":
        child = passthrough_child(workdir, port, upstream_port)
    else:
        child = gym_child(workdir, label, upstream_port, port, token_ids=proxy == "gym_ids", launcher=src)
    dump = workdir / f"{label}.callgrind"
    child.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}", *child.argv]
    children.append(child)
    child.start()
    child.wait_ready(timeout_s=180)  # start-up under valgrind
    return child, dump


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def instructions_in(dump: Path) -> int:
    """The `totals:` (or `summary:`) line of a callgrind dump: instructions executed while instrumented."""
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{dump} has no totals line")


def dumped_instructions(child: Child, dump: Path) -> int:
    """Has callgrind dump what it counted since instrumentation went on; returns that count."""
    callgrind("-d", str(child.pid))
    dumps = sorted(dump.parent.glob(f"{dump.name}.*"))  # `-d` writes <dump>.1; the final one at exit comes later
    if not dumps:
        raise RuntimeError(f"{child.name}: callgrind wrote no dump")
    return instructions_in(dumps[0])


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
    return dumped_instructions(child, dump)


async def count_stream(target: bench_stream.Target, child: Child, dump: Path, requests: int, concurrency: int,
                       warmup: int) -> tuple[int, int, int]:
    """(instructions the proxy executed, events the clients got, their reads) for `requests` checked streams,
    `concurrency` at once."""
    async with aiohttp.ClientSession() as session:
        expected = await bench_stream.probe(session, target)
        for phase, n in (("warm-up", warmup), ("measured", requests)):
            if phase == "measured":
                callgrind("-i", "on", str(child.pid))
            events = reads = 0
            for done in range(0, n, concurrency):
                for sample in await asyncio.gather(*(bench_stream.one_request(session, target, expected)
                                                     for _ in range(min(concurrency, n - done)))):
                    if not sample.ok:
                        raise RuntimeError(f"{target.label}: {phase} stream failed: {sample.error}")
                    events += sample.events
                    reads += sample.reads
    return dumped_instructions(child, dump), events, reads


# --- the conversion alone --------------------------------------------------------------------------

def convert_once(endpoint: str, request_raw: bytes, reply_raw: bytes, config: gym_vllm.ServerConfig) -> bytes:
    """What the handler of `endpoint` (`response` or `chat.completion`) does to one request besides its I/O, with the
    same functions in the same order (handle_responses, handle_chat_completions)."""
    request = gym_vllm._loads(request_raw, sendable=True)
    if endpoint == "response":
        gym_vllm.request_json(gym_vllm.responses_request_to_chat(request, config))
        reply = gym_vllm._loads(reply_raw, None if request.get("top_logprobs") else gym_vllm.CompletionForResponse)
        return gym_vllm.response_json(gym_vllm.chat_response_to_responses(reply, request, config))
    metadata = request.get("metadata") if isinstance(request.get("metadata"), dict) else None
    gym_vllm.request_json(gym_vllm.prepare_chat_request(request, config, metadata=metadata))
    return gym_vllm._dumps(gym_vllm.chat_response_for_client(gym_vllm._loads(reply_raw), request, config)).encode()


def conversion_inputs(workdir: Path, target: bench_proxy.Target, upstream_port: int) -> Path:
    """A folder with what `--conversion-loop` needs for `target`: its config, request, endpoint and vLLM's reply to it
    (asked of the fake upstream with the body gym_vllm would send)."""
    folder = workdir / f"conversion-{target.key}"
    folder.mkdir()
    (folder / "config.yaml").write_text(gym_config(upstream_port, free_port(), token_ids=target.proxy == "gym_ids"))
    [config] = gym_vllm.load_config([str(folder / "config.yaml")])
    request = json.loads(target.body)
    chat_body = (gym_vllm.responses_request_to_chat(request, config) if target.expect_object == "response"
                 else gym_vllm.prepare_chat_request(request, config))
    upstream = urllib.request.Request(f"http://127.0.0.1:{upstream_port}/v1/chat/completions", data=gym_vllm.request_json(chat_body),
                                      headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(upstream, timeout=30) as answer:
        (folder / "reply.json").write_bytes(answer.read())
    (folder / "request.json").write_bytes(target.body)
    (folder / "endpoint").write_text(target.expect_object)
    return folder


def conversion_loop(folder: Path, iterations: int) -> None:
    """`convert_once` on the folder's request: 100 times to warm up, then `iterations` times (the counted run), run by
    the gym_vllm CLI's own runner, so that the garbage collector is set as it sets it."""
    [config] = gym_vllm.load_config([str(folder / "config.yaml")])
    endpoint = (folder / "endpoint").read_text()
    request_raw, reply_raw = (folder / "request.json").read_bytes(), (folder / "reply.json").read_bytes()

    async def loop() -> None:
        for _ in range(100 + iterations):
            convert_once(endpoint, request_raw, reply_raw, config)

    gym_vllm.run_until_done(loop)


def conversion_instructions(folder: Path, iterations: int) -> float:
    """Instructions of one `convert_once`: a loop of `iterations` under callgrind minus a loop of none. Both with one hash
    seed: start-up's count then repeats exactly (with random seeds it moves by ~0.5 M instructions)."""
    totals = []
    for count in (0, iterations):
        dump = folder / f"loop-{count}.callgrind"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", sys.executable, __file__,
                        "--conversion-loop", str(folder), "--requests", str(count)], check=True, capture_output=True,
                       timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
        totals.append(instructions_in(dump))
    return (totals[1] - totals[0]) / iterations


def report(rows: list[dict], args: argparse.Namespace) -> str:
    stream_rows = [row for row in rows if row["shape"] == "stream"]
    rows = [row for row in rows if row["shape"] != "stream"]
    floor = {row["shape"]: row["k_instructions"] for row in rows if row["proxy"] == "passthrough"}
    conversion = args.conversion
    lines: list[str] = []
    if rows:
        lines += [f"## Instructions per request (valgrind), {args.requests} requests per target after {args.warmup} warm-up, "
                  f"token IDs for {args.ids_tokens} tokens" + (f" of a {args.prompt_tokens}-token question" if args.prompt_tokens else "")
                  + (f" after {args.history_turns} earlier turns" if args.history_turns else "")
                  + f", Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {speedups()}", "",
                  "| target | source | k instructions / request | × passthrough |" + (" of it, the conversion alone |" if conversion else ""),
                  "|---|---|---|---|" + ("---|" if conversion else "")]
        for row in rows:
            base = floor.get(row["shape"])
            ratio = f"{row['k_instructions'] / base:.2f}×" if base and row["proxy"] != "passthrough" else "–"
            line = f"| {row['label']} | {row['source']} | {fmt(row['k_instructions'])} | {ratio} |"
            if conversion:
                line += f" {fmt(row['k_conversion'])} |" if "k_conversion" in row else " – |"
            lines.append(line)
        lines += ["", "User-space instructions of the proxy process only (no system calls, no kernel networking); "
                      "× passthrough: over the pass-through's of the same shape."]
        if conversion:
            lines.append("The conversion alone: the handler's work besides I/O, looped in a process of its own (--conversion).")
    if stream_rows:
        floor_per_event = next((row["instructions_per_event"] for row in stream_rows if row["proxy"] == "passthrough"), None)
        lines += [*([""] if lines else []), f"## Instructions per streamed event (valgrind), {args.stream_requests} streams of "
                  f"{STREAM_TOKENS} tokens per target, {args.stream_concurrency} at once, tokens {args.stream_token_delay_ms:g} ms apart", "",
                  "| stream target | source | instructions / event | × passthrough | events per client read |",
                  "|---|---|---|---|---|"]
        for row in stream_rows:
            ratio = (f"{row['instructions_per_event'] / floor_per_event:.2f}×" if floor_per_event and row["proxy"] != "passthrough"
                     else "–")
            lines.append(f"| {row['label']} | {row['source']} | {fmt(row['instructions_per_event'])} | {ratio} | "
                         f"{fmt(row['events_per_client_read'], '.1f')} |")
        lines += ["", "Per event the clients got. Events per client read: about what the proxy read from the fake upstream at "
                      "a time (each proxy writes once per read)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="instructions per request, gym_vllm vs the pass-through (valgrind)")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per target (default 300)")
    parser.add_argument("--warmup", type=int, default=100, help="requests before counting starts (default 100)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)} (default: all)")
    parser.add_argument("--ids-tokens", type=int, default=64, help="tokens per answer of the ids shape (default 64)")
    parser.add_argument("--history-turns", type=int, default=0,
                        help="earlier turns, with their token ids and log probs, before the ids shape's question (default 0)")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="length of the ids shape's question in prompt tokens (default 0: a 19-token question)")
    parser.add_argument("--compare-src", metavar="FILE", help="another gym_vllm.py to measure on every gym target")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--conversion", action="store_true",
                        help="also count each gym target's conversion alone (its work besides I/O, in a loop)")
    parser.add_argument("--stream-requests", type=int, default=40, help="measured streams per stream target (default 40)")
    parser.add_argument("--stream-concurrency", type=int, default=4, help="streams at once (default 4)")
    parser.add_argument("--stream-token-delay-ms", type=float, default=0.5,
                        help="the streams' fake upstream's pause between tokens (default 0.5)")
    parser.add_argument("--conversion-loop", metavar="FOLDER", type=Path, help=argparse.SUPPRESS)  # the loop's own process
    args = parser.parse_args(argv)
    args.target_keys = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_keys) - set(TARGETS)
    if unknown:
        parser.error(f"unknown --targets: {', '.join(sorted(unknown))}")
    if args.requests < (0 if args.conversion_loop else 1) or args.warmup < 0 or args.ids_tokens < 1 or args.history_turns < 0 \
            or args.prompt_tokens < 0 or args.stream_requests < 1 or args.stream_concurrency < 1 or args.stream_token_delay_ms < 0:
        parser.error("--requests, --ids-tokens, --stream-requests and --stream-concurrency must be >= 1, --warmup, "
                     "--history-turns, --prompt-tokens and --stream-token-delay-ms >= 0")
    if args.compare_src and not Path(args.compare_src).is_file():
        parser.error(f"--compare-src {args.compare_src}: no such file")
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        parser.error(f"{' and '.join(missing)} not found: install valgrind (apt-get install valgrind)")
    return args


def count_streams(args: argparse.Namespace, keys: list[str], workdir: Path, children: list[Child]) -> list[dict]:
    """A row per stream target (and per source): instructions per event the clients got."""
    upstream_port = free_port()
    start_all([upstream_child(workdir, upstream_port, token_delay_ms=args.stream_token_delay_ms)], children)
    chat_body, responses_body = bench_stream.stream_bodies(STREAM_TOKENS)
    rows = []
    for key in keys:
        label, proxy, path = STREAM_TARGETS[key]
        for source, src in proxy_sources(args, proxy):
            port = free_port()
            child, dump = start_proxy(workdir, children, f"{key}-{len(rows)}", proxy, upstream_port, port, src)
            target = bench_stream.Target(key, label, f"http://127.0.0.1:{port}{path}",
                                         responses_body if path == "/v1/responses" else chat_body, None, path == "/v1/responses")
            instructions, events, reads = asyncio.run(count_stream(target, child, dump, args.stream_requests,
                                                                   args.stream_concurrency, warmup=args.stream_concurrency))
            child.stop()
            row = {"target": key, "label": label, "shape": "stream", "proxy": proxy, "source": source,
                   "instructions_per_event": instructions / events, "events_per_client_read": events / reads}
            rows.append(row)
            progress(f"{label:<30} {source:<20} {row['instructions_per_event']:8.0f} instructions/event")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.conversion_loop:
        conversion_loop(args.conversion_loop, args.requests)
        return 0
    request_keys = [key for key in args.target_keys if key in REQUEST_TARGETS]
    shape_args = bench_proxy.parse_args(["--targets", ",".join(request_keys or REQUEST_TARGETS), "--ids-tokens", str(args.ids_tokens),
                                         "--history-turns", str(args.history_turns), "--prompt-tokens", str(args.prompt_tokens)])
    rows: list[dict] = []
    with running_children("bench_instructions.py") as (workdir, children):
        upstream_port, port = free_port(), free_port()
        start_all([upstream_child(workdir, upstream_port, think_tokens=shape_args.think_tokens)], children)
        ports = {"upstream": upstream_port, "passthrough": port, "gym": port, "gym_ids": port}
        for target in bench_proxy.build_targets(shape_args, ports) if request_keys else []:
            sources = proxy_sources(args, target.proxy)
            for source, src in sources:
                child, dump = start_proxy(workdir, children, f"{target.key}-{len(rows)}", target.proxy, upstream_port, port, src)
                total = asyncio.run(count(target, child, dump, args.requests, args.warmup))
                child.stop()
                row = {"target": target.key, "label": target.label, "shape": target.shape, "proxy": target.proxy,
                       "source": source, "k_instructions": total / args.requests / 1000}
                rows.append(row)
                progress(f"{target.label:<30} {source:<20} {row['k_instructions']:8.0f} k instructions/request")
            if args.conversion and target.proxy != "passthrough":  # this checkout's, like the row measured first
                this_checkout = rows[-len(sources)]
                this_checkout["k_conversion"] = conversion_instructions(conversion_inputs(workdir, target, upstream_port),
                                                                        args.requests) / 1000
                progress(f"{target.label:<30} {'the conversion alone':<20} {this_checkout['k_conversion']:8.0f} k instructions")
        stream_keys = [key for key in args.target_keys if key in STREAM_TARGETS]
        if stream_keys:
            rows += count_streams(args, stream_keys, workdir, children)
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"requests": args.requests, "warmup": args.warmup, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
