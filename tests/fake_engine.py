"""A stand-in for `vllm serve` for supervisor faults a real engine cannot produce on demand.

Takes vLLM's flags (only --port and --api-key matter); FAKE_ENGINE_MODE picks the behaviour:
serve (default), exit_at_once, port_in_use (prints vLLM's bind error and exits), hang (never healthy), progress (first
redraws a progress bar with `\r` for 300 KB without a newline, as a download or a weight loader's bar does, then serves),
ignore_term (serves, and ignores SIGTERM), fork_worker (serves, with a worker process in its process group, as vLLM's
engine core and workers are).
"""

import argparse
import os
import signal
import sys

from aiohttp import web

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--api-key", required=True)
args, _ = parser.parse_known_args()
mode = os.environ.get("FAKE_ENGINE_MODE", "serve")
if mode == "exit_at_once":
    print(f"fake engine: failing on purpose (args: api_key={args.api_key})", flush=True)  # as vLLM before 0.32 prints it
    sys.exit(3)
if mode == "port_in_use" and os.environ.get("FAKE_ENGINE_BUSY_PORT") == str(args.port):
    print(f"OSError: [Errno 98] error while attempting to bind on address ('0.0.0.0', {args.port}): address already in use", flush=True)
    sys.exit(1)
if mode == "fork_worker" and os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)"])
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "progress":
    for step in range(6000):
        sys.stdout.write(f"\rLoading safetensors checkpoint shards: {step / 60:5.1f}% |{'#' * (step // 200):<30}| {step}/6000")
    sys.stdout.write("\n")
    sys.stdout.flush()


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if mode == "hang" else 200)


async def chat(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") != f"Bearer {args.api_key}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    body = await request.json()
    return web.json_response({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": f"engine on {args.port}"},
                                           "finish_reason": "stop"}]})


app = web.Application()
app.router.add_get("/health", health)
app.router.add_post("/v1/chat/completions", chat)
print(f"fake engine listening on {args.port}", flush=True)
web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=mode != "ignore_term")
