"""Non-streaming benchmark: gym_vllm vs a bare pass-through vs talking to the upstream directly.

Run it (from the repository root)::

    .venv/bin/python bench/bench_proxy.py [--concurrency 1,64,256,1024] [--seconds 6] [--rounds 3] [--json out.json]
                                          [--compare-url URL [--compare-pid PID]]

It starts four processes on free ports: `bench/fake_upstream.py` (a cheap vLLM look-alike),
`bench/passthrough.py` (a bare aiohttp proxy that parses no JSON: the floor), and two gym_vllm
servers in front of the same upstream, one with `return_token_id_information: false` and one with
`true` (`python -m gym_vllm` with temporary configs, `uses_reasoning_parser: true`). Then, for every
concurrency level C, it runs one closed-loop cell per target (all requests non-streaming):

    shape `plain`: a --tokens (64) token answer that starts with a --think-tokens (16) `<think>` block
      direct            /v1/chat/completions straight to the fake upstream
      passthrough       the same through the pass-through
      gym-chat          the same through gym_vllm
      gym-resp          /v1/responses through gym_vllm (reasoning item + message)
      compare           (--compare-url) the gym-resp body against another server's /responses
    shape `tools`: the same answer plus --tool-calls (1) tool calls, 2 function tools, tool_choice auto
      direct-tools      chat with the 2 tools straight to the upstream
      passthrough-tools the same through the pass-through
      gym-resp-tools    /v1/responses with the 2 tools through gym_vllm (reasoning, message, function_call)
    shape `ids`: a --ids-tokens (256) token answer with token ids and log-probs
      direct-ids        chat with what gym_vllm asks vLLM for (`logprobs`, `top_logprobs: 0`,
                        `return_token_ids`, `return_tokens_as_token_ids`) straight to the upstream
      passthrough-ids   the same through the pass-through
      gym-resp-ids      /v1/responses through the token-id gym_vllm (ids on the last output item)
    `--history-turns N` (default 0) puts N earlier turns of an agent rollout before the ids shape's question, as
    NeMo RL sends them: each a tool call carrying the prompt ids, generated ids and log probs of its turn (prompts
    from 200 tokens, growing by the answer and 20 tokens a turn), then the tool's output; the chat targets carry the
    same turns as the messages gym_vllm makes of them
    `--prompt-tokens N` (default 0: a 19-token question) makes the ids shape's question N tokens long (prose the fake
    vLLM counts as N tokens), so the reply carries N prompt ids, as a real single-turn prompt of that size would

The upstream's answer size follows the request fields `max_tokens`, `bench_think_tokens` and
`bench_tool_calls` (gym_vllm forwards unknown fields), so within a shape every target makes the
upstream send the same answer, and the baselines of a gym_vllm target are the direct and
pass-through cells of its shape at the same C.

Each cell: one probe request checked in full (status, `object`, output item types or finish reason,
token counts); then a fresh client session (connector `limit=0`) opens C connections with C
concurrent priming requests; then C workers send requests back to back for `--warmup` +
`--seconds` and only requests that end inside the window count. Every request is validated: HTTP 200,
a JSON body with the expected `object`, and the probe's shape (finish reason/status, item types and
token-id counts); anything else is an error, counted and kept by kind.

`--rounds N` runs every level's cells N times, in alternating order (forward, backward, ...), and reports each
cell's median round by proxy CPU per request (direct cells: by p50), with the range over the rounds: a single
round on a small shared machine can be off by ±20%.

Reported per cell: req/s, p50/p99 latency, the added p50 (this target's p50 minus the direct cell's at
the same C), errors, and the proxy process's CPU seconds per 1,000 requests (utime+stime from
/proc/<pid>/stat over the window; 1/CLK_TCK resolution) with its ratio to the pass-through's. The
load generator, the upstream and the proxies share the machine's cores, so the CPU per request is
the figure to compare; req/s and latencies at high C mostly measure the machine being full.

`--paired` measures what gym_vllm adds to the pass-through's CPU per request in a way that a busy shared machine
cannot tilt: each gym_vllm target (of `--targets`) and the pass-through of its shape run in ONE closed loop, the C
workers sending to the two in turn (each proxy then has about C/2 requests in flight), and both proxies' CPU is read
over the same window. Whatever else the machine does in that window weighs on both alike; separate cells seconds
apart can land on different neighbours' bursts. Reported: the excess (gym_vllm's CPU per request minus the
pass-through's) and the ratio. The excess is what a pair measures well. The ratio is diluted at low C: each proxy
wakes with caches the other one filled, a cost both pay per request (at C=1 on the 2-core VM it doubled the
pass-through's CPU per request), so it comes out nearer 1 than the ratio of the two running alone. With `--rounds N`
each pair runs N times and the median round (by excess) is reported with the rounds' range.

`--compare-url URL` adds the `compare` cell at every C: the gym-resp body (plus `model`) against
URL/responses of a server that is already running, checked loosely (HTTP 200, `object: response`,
status completed/incomplete). Its added p50 and × passthrough are against this run's direct and
pass-through cells, which is a fair comparison only if that server talks to an equivalent upstream:
start it against `http://127.0.0.1:PORT/v1` and pass `--upstream-port PORT` so both use this run's
fake upstream. Its CPU is measured only with `--compare-pid`.

`--profile-gym FILE` runs the plain gym_vllm under cProfile (`--profile-gym-ids FILE` the token-id one,
`--profile-passthrough FILE` the pass-through) and prints its top functions with their share of all
profiled time; its CPU numbers are then inflated. Profile one target at a time (`--targets`) to keep
the profile to one kind of request.
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
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

import fake_upstream
from harness import (JSON_HEADERS, Child, alternating_loop, closed_loop, fmt, foreign_load, free_port, gym_child, open_fds,
                     passthrough_child, percentile, progress, raise_nofile, running_children, speedups, start_all,
                     upstream_child)

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Current weather for a city.",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string", "description": "City name, e.g. Paris"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}},
    {"type": "function", "name": "get_time", "description": "Local time in a time zone.",
     "parameters": {"type": "object", "properties": {
         "timezone": {"type": "string", "description": "IANA zone, e.g. Europe/Paris"}}, "required": ["timezone"]}},
]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS]
PROMPT = "What is the weather in Paris? Answer briefly."


def question(prompt_tokens: int) -> str:
    """The ids shape's question: PROMPT, or (`prompt_tokens` > 0) prose the fake vLLM counts as that many prompt tokens."""
    if prompt_tokens <= 0:
        return PROMPT
    filler = " ".join(text.strip() for text in fake_upstream.VOCAB)
    chars = max(0, prompt_tokens - fake_upstream.TEMPLATE_TOKENS) * 4
    return (PROMPT + " " + filler * (chars // len(filler) + 1))[:max(chars, len(PROMPT))]

ALL_TARGETS = ("direct", "passthrough", "gym-chat", "gym-resp", "direct-tools", "passthrough-tools", "gym-resp-tools",
               "direct-ids", "passthrough-ids", "gym-resp-ids")

Signature = tuple


# ============================================================================================
# Targets and validation
# ============================================================================================


def chat_signature(body: dict) -> Signature:
    """What every reply of a chat cell must share: finish reason, token counts, tool calls."""
    choice = body["choices"][0]
    message = choice["message"]
    return ("chat", choice.get("finish_reason"), (body.get("usage") or {}).get("completion_tokens"),
            len(choice.get("token_ids") or message.get("generation_token_ids") or []),
            len((choice.get("logprobs") or {}).get("content") or []), len(message.get("tool_calls") or []))


def responses_signature(body: dict) -> Signature:
    """What every reply of a Responses cell must share: status, output item types, token-id counts."""
    output = body["output"]
    last = output[-1] if output else {}
    return ("response", body.get("status"), tuple(item.get("type") for item in output),
            len(last.get("generation_token_ids") or []), len(last.get("generation_log_probs") or []),
            (body.get("usage") or {}).get("output_tokens"))


def loose_responses_signature(body: dict) -> Signature:
    """For a foreign server (--compare-url): only that it finished."""
    status = body.get("status")
    if status not in ("completed", "incomplete"):
        raise ValueError(f"status {status!r}")
    return ("response",)


@dataclasses.dataclass
class Target:
    key: str
    label: str
    shape: str                   # plain | tools | ids: which direct/passthrough cells are its baselines
    url: str
    body: bytes
    proxy: str | None            # name of the proxy process whose CPU is measured (None: direct / unknown)
    expect_object: str
    signature: Callable[[dict], Signature]
    expected: Signature | None   # what the probe must show (None: whatever it shows, e.g. --compare-url)
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JSON_HEADERS))
    strict: bool = True          # every request must match the probe's signature


@dataclasses.dataclass
class Sample:
    ok: bool
    end: float                   # perf_counter when the whole body had arrived
    latency: float
    error: str = ""


class ProbeError(RuntimeError):
    pass


def check_body(target: Target, status: int, raw: bytes) -> tuple[str, Signature | None]:
    """('' or an error, signature) for one reply."""
    if status != 200:
        return f"HTTP {status}: {raw[:160].decode(errors='replace')}", None
    try:
        body = json.loads(raw)
    except ValueError:
        return f"body is not JSON: {raw[:80]!r}", None
    if not isinstance(body, dict) or body.get("object") != target.expect_object:
        got = body.get("object") if isinstance(body, dict) else type(body).__name__
        return f"object is {got!r}, expected {target.expect_object!r}", None
    try:
        return "", target.signature(body)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        return f"unexpected shape: {exc.__class__.__name__}: {exc}", None


async def one_request(session: aiohttp.ClientSession, target: Target, expected: Signature | None) -> Sample:
    begin = time.perf_counter()
    try:
        async with session.post(target.url, data=target.body, headers=target.headers) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        end = time.perf_counter()
        return Sample(False, end, end - begin, f"{exc.__class__.__name__}: {exc}")
    end = time.perf_counter()
    error, signature = check_body(target, status, raw)
    if not error and target.strict and signature != expected:
        error = f"reply shape {signature} differs from the probe's {expected}"
    return Sample(not error, end, end - begin, error)


async def probe(session: aiohttp.ClientSession, target: Target) -> tuple[Signature, int]:
    """One request checked in full; returns (its signature, its body size)."""
    async with session.post(target.url, data=target.body, headers=target.headers) as response:
        raw = await response.read()
        status = response.status
    error, signature = check_body(target, status, raw)
    if error:
        raise ProbeError(error)
    if target.expected is not None and signature != target.expected:
        raise ProbeError(f"reply shape {signature}, expected {target.expected}")
    return signature, len(raw)


def history(turns: int, answer_tokens: int) -> tuple[list[dict], list[dict]]:
    """`turns` earlier turns of a rollout as Responses input items with their token ids and log probs, and as the chat
    messages gym_vllm makes of them."""
    items: list[dict] = []
    messages: list[dict] = []
    prompt = 200
    for turn in range(turns):
        tokens = {"prompt_token_ids": [1000 + (7 * k) % 30000 for k in range(prompt)],
                  "generation_token_ids": [1000 + (11 * k) % 30000 for k in range(answer_tokens)],
                  "generation_log_probs": [fake_upstream.LOGPROBS[k % len(fake_upstream.LOGPROBS)] for k in range(answer_tokens)]}
        call_id, arguments = f"call_{turn}", json.dumps({"city": "Paris", "turn": turn})
        items += [{"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": arguments, **tokens},
                  {"type": "function_call_output", "call_id": call_id, "output": "18 C and sunny"}]
        messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                          "name": "get_weather", "arguments": arguments}}], **tokens},
                     {"role": "tool", "tool_call_id": call_id, "content": "18 C and sunny"}]
        prompt += answer_tokens + 20
    return items, messages


def build_targets(args: argparse.Namespace, ports: dict[str, int]) -> list[Target]:
    tokens, ids_tokens, think, calls = args.tokens, args.ids_tokens, args.think_tokens, args.tool_calls
    bench_fields = {"bench_think_tokens": think}

    def chat(max_tokens: int, **extra: Any) -> bytes:
        return json.dumps({"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                           **bench_fields, **extra}).encode()

    def responses(max_tokens: int, **extra: Any) -> dict:
        return {"input": PROMPT, "max_output_tokens": max_tokens, **bench_fields, **extra}

    def url(port_name: str, path: str) -> str:
        return f"http://127.0.0.1:{ports[port_name]}{path}"

    def items(with_calls: int, answer_tokens: int) -> tuple[str, ...]:
        reasoning = think > 0 and answer_tokens >= 2
        text_tokens = answer_tokens - (min(think, answer_tokens - 2) + 2 if reasoning else 0)
        message = text_tokens > 0 or not (reasoning or with_calls)
        return (("reasoning",) if reasoning else ()) + (("message",) if message else ()) + ("function_call",) * with_calls

    plain_chat = chat(tokens)
    tools_chat = chat(tokens, tools=CHAT_TOOLS, tool_choice="auto", bench_tool_calls=calls)
    history_items, history_messages = history(args.history_turns, ids_tokens)
    ids_question = question(args.prompt_tokens)
    ids_chat = json.dumps({"model": "bench", "messages": [{"role": "user", "content": ids_question}, *history_messages],
                           "max_tokens": ids_tokens, **bench_fields, "logprobs": True, "top_logprobs": 0,
                           "return_token_ids": True, "return_tokens_as_token_ids": True}).encode()
    ids_responses = {"input": [{"role": "user", "content": ids_question}, *history_items] if history_items else ids_question,
                     "max_output_tokens": ids_tokens, **bench_fields}
    cc, resp = "/v1/chat/completions", "/v1/responses"
    finish_tools = "tool_calls" if calls else "length"
    sig_plain = ("chat", "length", tokens, 0, 0, 0)
    sig_tools = ("chat", finish_tools, tokens, 0, 0, calls)
    sig_ids = ("chat", "length", ids_tokens, ids_tokens, ids_tokens, 0)
    status_tools = "completed" if calls else "incomplete"
    targets = [
        Target("direct", "direct chat", "plain", url("upstream", cc), plain_chat, None, "chat.completion", chat_signature, sig_plain),
        Target("passthrough", "passthrough chat", "plain", url("passthrough", cc), plain_chat, "passthrough",
               "chat.completion", chat_signature, sig_plain),
        Target("gym-chat", "gym_vllm chat", "plain", url("gym", cc), plain_chat, "gym", "chat.completion", chat_signature, sig_plain),
        Target("gym-resp", "gym_vllm responses", "plain", url("gym", resp), json.dumps(responses(tokens)).encode(), "gym",
               "response", responses_signature, ("response", "incomplete", items(0, tokens), 0, 0, tokens)),
        Target("direct-tools", "direct chat +tools", "tools", url("upstream", cc), tools_chat, None, "chat.completion",
               chat_signature, sig_tools),
        Target("passthrough-tools", "passthrough chat +tools", "tools", url("passthrough", cc), tools_chat, "passthrough",
               "chat.completion", chat_signature, sig_tools),
        Target("gym-resp-tools", "gym_vllm responses +tools", "tools", url("gym", resp),
               json.dumps(responses(tokens, tools=TOOLS, tool_choice="auto", bench_tool_calls=calls)).encode(), "gym",
               "response", responses_signature, ("response", status_tools, items(calls, tokens), 0, 0, tokens)),
        Target("direct-ids", "direct chat ids", "ids", url("upstream", cc), ids_chat, None, "chat.completion", chat_signature, sig_ids),
        Target("passthrough-ids", "passthrough chat ids", "ids", url("passthrough", cc), ids_chat, "passthrough",
               "chat.completion", chat_signature, sig_ids),
        Target("gym-resp-ids", "gym_vllm(ids) responses ids", "ids", url("gym_ids", resp),
               json.dumps(ids_responses).encode(), "gym_ids", "response", responses_signature,
               ("response", "incomplete", items(0, ids_tokens), ids_tokens, ids_tokens, ids_tokens)),
    ]
    selected = [t for t in targets if t.key in args.target_keys]
    if args.compare_url:
        body = responses(tokens, model=args.compare_model)
        if args.compare_no_bench_fields:
            body = {k: v for k, v in body.items() if not k.startswith("bench_")}
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.compare_api_key}"}
        selected.append(Target("compare", f"compare {args.compare_url}", "plain", args.compare_url.rstrip("/") + "/responses",
                               json.dumps(body).encode(), "compare" if args.compare_pid else None, "response",
                               loose_responses_signature, None, headers, strict=False))
    return selected


# ============================================================================================
# One cell
# ============================================================================================


@dataclasses.dataclass
class Result:
    concurrency: int
    target: str
    label: str
    shape: str
    failed: str                  # why the cell could not run ('' if it ran)
    window_s: float
    requests: int                # validated replies that ended inside the window
    errors: int
    error_kinds: dict[str, int]
    first_error: str
    reply_bytes: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    prime_s: float               # time for the C priming requests that open the connections
    prime_errors: int
    server_sockets: int | None   # open sockets of the proxy (direct: the upstream) right after the window
    proxy_cpu_s: float | None
    proxy_cores: float | None    # proxy CPU seconds per second of window
    proxy_cpu_s_per_1k: float | None
    upstream_cpu_s_per_1k: float
    loadgen_cpu_s_per_1k: float
    other_cores: float           # machine busy CPU outside proxy+upstream+load generator, in cores
    added_p50_ms: float | None = None
    vs_passthrough: float | None = None
    cpu_s_per_1k_rounds: list[float] = dataclasses.field(default_factory=list)  # every round's, with --rounds > 1


def _error_kind(error: str) -> str:
    return error.split(":", 1)[0] if not error.startswith("HTTP") else error[:8]


def _failed(target: Target, concurrency: int, why: str) -> Result:
    nan = math.nan
    return Result(concurrency, target.key, target.label, target.shape, why, 0.0, 0, 0, {}, "", 0, nan, nan, nan, nan,
                  nan, 0, None, None, None, None, nan, nan, nan)


async def run_cell(target: Target, pids: dict[str, int], concurrency: int, args: argparse.Namespace) -> Result:
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as session:
        try:
            expected, reply_bytes = await probe(session, target)
        except (ProbeError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return _failed(target, concurrency, f"probe: {exc.__class__.__name__}: {exc}")
        prime_begin = time.perf_counter()
        primed = await asyncio.gather(*(one_request(session, target, expected) for _ in range(concurrency)))
        prime_s = time.perf_counter() - prime_begin
        watch = {"upstream": pids["upstream"]}
        if target.proxy:
            watch["proxy"] = pids[target.proxy]
        window = await closed_loop(lambda: one_request(session, target, expected), concurrency, args.warmup, args.seconds, watch)
        # Connections the server side holds now, with the load generator's still open: C (+ C upstream for a proxy).
        server = watch.get("proxy") or (pids["upstream"] if target.key.startswith("direct") else None)
        try:
            sockets = open_fds(server)[1] if server else None
        except OSError:
            sockets = None
    good = [s for s in window.samples if s.ok]
    bad = [s for s in window.samples if not s.ok]
    span, n = window.span, len(good)

    def per_1k(cpu_s: float) -> float:
        return cpu_s * 1000 / n if n else math.nan

    latencies = [s.latency for s in good]
    proxy_cpu = window.cpu.get("proxy")
    return Result(
        concurrency=concurrency, target=target.key, label=target.label, shape=target.shape, failed="", window_s=span,
        requests=n, errors=len(bad), error_kinds=dict(collections.Counter(_error_kind(s.error) for s in bad).most_common(8)),
        first_error=bad[0].error if bad else "", reply_bytes=reply_bytes, requests_per_s=n / span,
        p50_ms=percentile(latencies, 0.50) * 1e3, p99_ms=percentile(latencies, 0.99) * 1e3,
        mean_ms=sum(latencies) / n * 1e3 if n else math.nan,
        prime_s=prime_s, prime_errors=sum(1 for s in primed if not s.ok), server_sockets=sockets,
        proxy_cpu_s=proxy_cpu, proxy_cores=None if proxy_cpu is None else proxy_cpu / span,
        proxy_cpu_s_per_1k=None if proxy_cpu is None else per_1k(proxy_cpu),
        upstream_cpu_s_per_1k=per_1k(window.cpu["upstream"]), loadgen_cpu_s_per_1k=per_1k(window.loadgen_cpu),
        other_cores=window.other_cores,
    )


@dataclasses.dataclass
class Paired:
    """A gym_vllm target and the pass-through of its shape, measured in one closed loop (`--paired`)."""
    concurrency: int
    target: str
    label: str
    failed: str
    requests: int                # the target's validated replies inside the window
    floor_requests: int          # the pass-through's
    errors: int                  # of both
    first_error: str
    cpu_s_per_1k: float          # the target's proxy, CPU seconds per 1,000 of its requests
    floor_cpu_s_per_1k: float    # the pass-through's
    vs_passthrough: float
    vs_passthrough_rounds: list[float] = dataclasses.field(default_factory=list)

    @property
    def excess_ms(self) -> float:
        """gym_vllm's CPU milliseconds per request over the pass-through's."""
        return self.cpu_s_per_1k - self.floor_cpu_s_per_1k


def floor_of(target: Target, targets: list[Target]) -> Target:
    """The pass-through target of `target`'s shape."""
    return next(t for t in targets if t.proxy == "passthrough" and t.shape == target.shape)


def _failed_pair(target: Target, concurrency: int, why: str) -> Paired:
    nan = math.nan
    return Paired(concurrency, target.key, target.label, why, 0, 0, 0, "", nan, nan, nan)


async def run_paired(target: Target, floor: Target, pids: dict[str, int], concurrency: int, args: argparse.Namespace) -> Paired:
    nan = math.nan
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as session:
        try:
            expected = {t.key: (await probe(session, t))[0] for t in (floor, target)}
        except (ProbeError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return _failed_pair(target, concurrency, f"probe: {exc.__class__.__name__}: {exc}")
        senders = [(t.key, functools.partial(one_request, session, t, expected[t.key])) for t in (floor, target)]
        window = await alternating_loop(senders, concurrency, args.warmup, args.seconds,
                                        {"floor": pids[floor.proxy], "target": pids[target.proxy]})
    good = collections.Counter(key for key, sample in window.samples if sample.ok)
    bad = [sample for _, sample in window.samples if not sample.ok]
    n, n_floor = good[target.key], good[floor.key]
    cpu = window.cpu["target"] * 1000 / n if n else nan
    floor_cpu = window.cpu["floor"] * 1000 / n_floor if n_floor else nan
    return Paired(concurrency, target.key, target.label, "", n, n_floor, len(bad), bad[0].error if bad else "", cpu, floor_cpu,
                  cpu / floor_cpu if floor_cpu else nan)


def median_pair(rounds: list[Paired]) -> Paired:
    ran = [r for r in rounds if not r.failed] or rounds
    chosen = sorted(ran, key=lambda r: r.excess_ms)[(len(ran) - 1) // 2]
    chosen.vs_passthrough_rounds = [r.vs_passthrough for r in ran if not r.failed]
    return chosen


def _describe_pair(result: Paired) -> str:
    return (f"paired: proxy {result.cpu_s_per_1k:.3f} s/1k  pass-through {result.floor_cpu_s_per_1k:.3f} s/1k"
            f"  excess {result.excess_ms:+.3f} ms  {result.vs_passthrough:.2f}×  errors {result.errors}"
            + (f" ({result.first_error[:200]})" if result.errors else ""))


def paired_table(results: list[Paired]) -> str:
    rows = ["| C | target | excess CPU ms/req | × pass-through | rounds (×) | proxy CPU s/1k req | pass-through CPU s/1k req "
            "| requests (pass-through) | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.failed:
            rows.append(f"| {r.concurrency} | {r.label} | FAILED: {r.failed[:150]} | | | | | | |")
            continue
        spread = f"{min(r.vs_passthrough_rounds):.2f}–{max(r.vs_passthrough_rounds):.2f}" if len(r.vs_passthrough_rounds) > 1 else "–"
        rows.append(f"| {r.concurrency} | {r.label} | {r.excess_ms:+.3f} | {r.vs_passthrough:.2f}× | {spread} | {r.cpu_s_per_1k:.3f} | "
                    f"{r.floor_cpu_s_per_1k:.3f} | {r.requests} ({r.floor_requests}) | {r.errors} |")
    return "\n".join(rows)


def add_baselines(results: list[Result]) -> None:
    """Added p50 over the direct cell, CPU per request over the pass-through cell: same shape, same C."""
    by = {(r.concurrency, r.target): r for r in results}
    for r in results:
        if r.target.startswith("direct"):
            continue
        suffix = {"plain": "", "tools": "-tools", "ids": "-ids"}[r.shape]
        direct, passthrough = by.get((r.concurrency, "direct" + suffix)), by.get((r.concurrency, "passthrough" + suffix))
        if direct and not direct.failed and not math.isnan(direct.p50_ms) and not math.isnan(r.p50_ms):
            r.added_p50_ms = r.p50_ms - direct.p50_ms
        if (not r.target.startswith("passthrough") and passthrough and passthrough.proxy_cpu_s_per_1k
                and r.proxy_cpu_s_per_1k is not None and not math.isnan(passthrough.proxy_cpu_s_per_1k)):
            r.vs_passthrough = r.proxy_cpu_s_per_1k / passthrough.proxy_cpu_s_per_1k


# ============================================================================================
# Report
# ============================================================================================


def _spread(result: Result) -> str:
    rounds = result.cpu_s_per_1k_rounds
    return f" ({min(rounds):.3f}–{max(rounds):.3f})" if len(rounds) > 1 else ""


def markdown_table(results: list[Result]) -> str:
    header = ("| C | target | req/s | p50 ms | p99 ms | added p50 ms | errors | proxy CPU s/1k req | × passthrough "
              "| proxy cores | upstream CPU s/1k | loadgen CPU s/1k | other cores | server sockets | reply bytes |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        if r.failed:
            rows.append(f"| {r.concurrency} | {r.label} | FAILED: {r.failed[:150]} |" + " |" * (header.count("|") - 4))
            continue
        errors = str(r.errors) + (f" ({', '.join(f'{k}×{v}' for k, v in r.error_kinds.items())})" if r.errors else "")
        rows.append("| " + " | ".join([
            str(r.concurrency), r.label, fmt(r.requests_per_s, ".0f"), fmt(r.p50_ms, ".2f"), fmt(r.p99_ms, ".2f"),
            fmt(r.added_p50_ms, "+.2f"), errors, fmt(r.proxy_cpu_s_per_1k, ".3f") + _spread(r), fmt(r.vs_passthrough, ".2f", "×"),
            fmt(r.proxy_cores, ".2f"), fmt(r.upstream_cpu_s_per_1k, ".3f"), fmt(r.loadgen_cpu_s_per_1k, ".3f"),
            fmt(r.other_cores, ".2f"), fmt(r.server_sockets, "d"), str(r.reply_bytes),
        ]) + " |")
    return "\n".join(rows)


def profile_shares(path: str, limit: int = 25) -> str:
    """The profile's top functions by own time, with their share of all profiled own time, as markdown."""
    if not os.path.exists(path):
        return f"(no profile written to {path})"
    stats = pstats.Stats(path)
    total = sum(tt for _, _, tt, _, _ in stats.stats.values())
    rows = ["| # | function | calls | own s | own share | cumulative s |", "|---|---|---|---|---|---|"]
    ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    for rank, ((file, line, name), (_, calls, tt, ct, _)) in enumerate(ranked, 1):
        where = f"{os.path.basename(file)}:{line}({name})" if file != "~" else name
        rows.append(f"| {rank} | `{where}` | {calls} | {tt:.3f} | {100 * tt / total:.1f}% | {ct:.3f} |")
    return f"total profiled own time {total:.3f} s\n\n" + "\n".join(rows)


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gym_vllm non-streaming benchmark (direct / passthrough / gym_vllm)")
    parser.add_argument("--concurrency", default="1,64,256,1024", help="comma-separated concurrency levels (default 1,64,256,1024)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per target and level (default 6)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds dropped before measuring (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every cell this many times, in alternating order, and report the median round (default 1)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"subset of {','.join(ALL_TARGETS)} (default: all)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer of the plain and tools shapes (default 64)")
    parser.add_argument("--think-tokens", type=int, default=16, help="tokens inside the leading <think> block (default 16)")
    parser.add_argument("--tool-calls", type=int, default=1, help="tool calls in the answers of the tools shape (default 1)")
    parser.add_argument("--ids-tokens", type=int, default=256, help="tokens per answer of the ids shape (default 256)")
    parser.add_argument("--history-turns", type=int, default=0,
                        help="earlier turns, with their token ids and log probs, before the ids shape's question (default 0)")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="length of the ids shape's question in prompt tokens (default 0: a 19-token question)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client timeout per request, s (default 120)")
    parser.add_argument("--upstream-port", type=int, default=0,
                        help="port of the fake upstream (default: a free one); fix it to put a --compare-url server in front of it")
    parser.add_argument("--compare-url", metavar="URL",
                        help="base URL (…/v1) of another OpenAI-compatible server already running: adds the gym-resp load "
                             "against URL/responses")
    parser.add_argument("--compare-pid", type=int, help="pid of the --compare-url server, to measure its CPU")
    parser.add_argument("--compare-model", default="bench", help="`model` sent to --compare-url (default bench)")
    parser.add_argument("--compare-api-key", default="bench", help="bearer key sent to --compare-url (default bench)")
    parser.add_argument("--compare-no-bench-fields", action="store_true",
                        help="leave the fake upstream's `bench_*` fields out of the --compare-url body")
    parser.add_argument("--paired", action="store_true",
                        help="run each gym_vllm target and the pass-through of its shape in one loop, in turn, and report "
                             "their CPU ratio (the goals' measure, robust to a busy machine)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--profile-gym", metavar="FILE", help="run the plain gym_vllm under cProfile, dump stats to FILE")
    parser.add_argument("--profile-gym-ids", metavar="FILE", help="run the token-id gym_vllm under cProfile, dump stats to FILE")
    parser.add_argument("--profile-passthrough", metavar="FILE", help="run the pass-through under cProfile, dump stats to FILE")
    parser.add_argument("--gym-launcher", metavar="SCRIPT",
                        help="run `python SCRIPT --config ...` instead of `python -m gym_vllm --config ...` for both gym_vllm servers")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency levels must be at least 1")
    args.target_keys = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_keys) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown --targets: {', '.join(sorted(unknown))}")
    if (args.tokens < 1 or args.ids_tokens < 1 or args.think_tokens < 0 or args.tool_calls < 0 or args.history_turns < 0
            or args.prompt_tokens < 0):
        parser.error("--tokens and --ids-tokens must be >= 1, --think-tokens, --tool-calls, --history-turns and "
                     "--prompt-tokens >= 0")
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --rounds >= 1")
    if args.compare_pid and not os.path.exists(f"/proc/{args.compare_pid}/stat"):
        parser.error(f"--compare-pid {args.compare_pid}: no such process")
    if args.paired and not any(key.startswith("gym") for key in args.target_keys):
        parser.error("--paired measures gym_vllm targets against the pass-through: --targets needs a gym-* target")
    return args


def median_round(rounds: list[Result]) -> Result:
    """The round reported for a cell: the median by proxy CPU per request (by p50 for the direct cells, which have no
    proxy), with every round's CPU figure attached; failed rounds count only when all failed."""
    ran = [r for r in rounds if not r.failed] or rounds
    key = (lambda r: r.p50_ms) if ran[0].proxy_cpu_s_per_1k is None else (lambda r: r.proxy_cpu_s_per_1k)
    chosen = sorted(ran, key=key)[(len(ran) - 1) // 2]
    chosen.cpu_s_per_1k_rounds = [r.proxy_cpu_s_per_1k for r in ran if r.proxy_cpu_s_per_1k is not None]
    return chosen


def _describe_cell(result: Result) -> str:
    return (f"{result.requests_per_s:8.0f} req/s  p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms"
            f"  proxy {fmt(result.proxy_cpu_s_per_1k, '.3f')} s/1k  errors {result.errors}"
            + (f" ({result.first_error[:200]})" if result.errors else "")
            + (f"  [priming: {result.prime_errors} errors]" if result.prime_errors else ""))


R = TypeVar("R", Result, Paired)


async def measure(args: argparse.Namespace, targets: list[Target], children: list[Child],
                  run: Callable[[Target, int], Awaitable[R]], failed: Callable[[Target, int, str], R],
                  describe: Callable[[R], str], median: Callable[[list[R]], R]) -> list[R]:
    """`run(target, C)` for every target at every level, `--rounds` times in alternating order (so no target always
    runs first or last on a warming or cooling machine); `median` picks each cell's reported round."""
    results: list[R] = []
    for level in args.levels:
        rounds: dict[str, list[R]] = collections.defaultdict(list)
        for round_index in range(args.rounds):
            for target in targets if round_index % 2 == 0 else targets[::-1]:
                dead = [c.name for c in children if not c.alive()]
                result = failed(target, level, f"process(es) exited: {', '.join(dead)}") if dead else await run(target, level)
                rounds[target.key].append(result)
                prefix = f"C={level:<5} {target.label:<30}" + (f" round {round_index + 1}" if args.rounds > 1 else "")
                progress(f"{prefix} FAILED: {result.failed}" if result.failed else f"{prefix} {describe(result)}")
                await asyncio.sleep(0.3)
        results += [median(rounds[target.key]) for target in targets]
    return results


def ids_shape(args: argparse.Namespace) -> str:
    return (f"{args.ids_tokens} with token ids" + (f", a {args.prompt_tokens}-token question" if args.prompt_tokens else "")
            + (f", after {args.history_turns} earlier turns" if args.history_turns else ""))


def report_paired(args: argparse.Namespace, results: list[Paired]) -> int:
    print(f"\n## Paired CPU per request: each gym_vllm target and the pass-through in one closed loop, in turn; "
          f"{args.tokens}-token answers with a {args.think_tokens}-token <think> block ({ids_shape(args)}), "
          f"{args.seconds:g} s per pair after {args.warmup:g} s warm-up"
          + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
          + f", {os.cpu_count()} CPUs, Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {speedups()}\n")
    print(paired_table(results))
    print("\nexcess: the gym_vllm process's CPU per request (utime+stime) minus the pass-through's, both read over the same "
          "window; at C, each has about C/2 requests in flight. × pass-through: their ratio, diluted at low C by the cost "
          "of waking with caches the other filled, which both pay (compare the excess with the pass-through's CPU per "
          "request when it runs alone, bench_proxy.py without --paired). rounds: the ratio's range over the rounds.")
    if args.json:
        rows = [{**dataclasses.asdict(r), "excess_ms": r.excess_ms} for r in results]
        Path(args.json).write_text(json.dumps(_json_safe({"paired": rows}), indent=2))
        print(f"\nwrote {args.json}")
    return 0 if all(r.errors == 0 and not r.failed for r in results) else 3


def _json_safe(value: Any) -> Any:
    """NaN (no data) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Each connection is a descriptor: the load generator holds C, a proxy 2·C (client and upstream side).
    nofile = raise_nofile(4 * max(args.levels) + 1024)
    if nofile < 2 * max(args.levels) + 256:
        progress(f"WARNING: RLIMIT_NOFILE is {nofile}: too low for C={max(args.levels)}; expect connection errors")
    background = foreign_load()
    if background > 0.1:
        progress(f"WARNING: {background:.2f} cores were already busy before the benchmark started; "
                 f"results will be noisy (see the `other cores` column)")
    with running_children("bench_proxy") as (workdir, children):
        ports = {"upstream": args.upstream_port or free_port(), "passthrough": free_port(), "gym": free_port(),
                 "gym_ids": free_port()}
        upstream = upstream_child(workdir, ports["upstream"])
        passthrough = passthrough_child(workdir, ports["passthrough"], ports["upstream"], profile=args.profile_passthrough)
        gym = gym_child(workdir, "gym_vllm", ports["upstream"], ports["gym"], profile=args.profile_gym, launcher=args.gym_launcher)
        gym_ids = gym_child(workdir, "gym_vllm_ids", ports["upstream"], ports["gym_ids"], token_ids=True,
                            profile=args.profile_gym_ids, launcher=args.gym_launcher)
        start_all([upstream, passthrough, gym, gym_ids], children)
        pids = {"upstream": upstream.pid, "passthrough": passthrough.pid, "gym": gym.pid, "gym_ids": gym_ids.pid}
        if args.compare_pid:
            pids["compare"] = args.compare_pid
        progress("started: " + ", ".join(f"{c.name} :{ports[k]} (pid {c.pid})" for k, c in
                                         zip(("upstream", "passthrough", "gym", "gym_ids"), children)))
        targets = build_targets(args, ports)
        if args.paired:
            all_targets = build_targets(argparse.Namespace(**{**vars(args), "target_keys": ALL_TARGETS}), ports)
            gyms = [t for t in targets if t.proxy and t.proxy.startswith("gym")]
            return report_paired(args, asyncio.run(measure(
                args, gyms, children, lambda t, level: run_paired(t, floor_of(t, all_targets), pids, level, args),
                _failed_pair, _describe_pair, median_pair)))
        results = asyncio.run(measure(args, targets, children, lambda t, level: run_cell(t, pids, level, args), _failed,
                                      _describe_cell, median_round))
        add_baselines(results)

    setup = {"tokens": args.tokens, "think_tokens": args.think_tokens, "tool_calls": args.tool_calls, "ids_tokens": args.ids_tokens,
             "history_turns": args.history_turns, "prompt_tokens": args.prompt_tokens,
             "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds, "levels": args.levels, "compare_url": args.compare_url,
             "cpus": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__, "speedups": speedups(),
             "profiled": bool(args.profile_gym or args.profile_gym_ids or args.profile_passthrough), "busy_cores_before_start": round(background, 3)}
    print(f"\n## Non-streaming benchmark: {args.tokens}-token answers with a {args.think_tokens}-token <think> block "
          f"({ids_shape(args)}), {args.seconds:g} s per cell after {args.warmup:g} s warm-up, "
          + (f"median of {args.rounds} rounds in alternating order, " if args.rounds > 1 else "")
          + f"{os.cpu_count()} CPUs, Python {setup['python']}, aiohttp {setup['aiohttp']}, {setup['speedups']}, "
          f"{background:.2f} cores busy before start\n")
    print(markdown_table(results))
    print("\nadded p50: this cell's p50 minus the direct cell's of the same shape at the same C. proxy CPU: utime+stime of "
          "the proxy process over the window, in CPU seconds per 1,000 validated requests (with --rounds, the median round's, "
          "then the rounds' range); × passthrough: over the "
          "pass-through's of the same shape at the same C. proxy cores: its CPU seconds per second. other cores: machine "
          "CPU outside proxy+upstream+load generator (kernel networking, the idle proxies, other jobs). server sockets: "
          "open sockets of the proxy (direct: the upstream) right after the window, client and upstream side together. "
          "reply bytes: the probe reply's body size as the client got it.")
    for key, path in (("gym", args.profile_gym), ("gym_ids", args.profile_gym_ids), ("passthrough", args.profile_passthrough)):
        if path:
            print(f"\nNOTE: {key} ran under cProfile; its CPU numbers are inflated.\n\n## {key} cProfile ({path}), top functions by own time\n")
            print(profile_shares(path))
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe({"setup": setup, "results": [dataclasses.asdict(r) for r in results]}), indent=2))
        print(f"\nwrote {args.json}")
    return 0 if all(r.errors == 0 and not r.failed for r in results) else 3


if __name__ == "__main__":
    sys.exit(main())
