"""The floor for proxy overhead: a bare aiohttp reverse proxy that parses no JSON.

Run it::

    .venv/bin/python bench/passthrough.py --port 9000 --upstream http://127.0.0.1:8000

Every request is forwarded to the same path upstream (method, body, Content-Type and
Authorization), and the upstream's status, Content-Type and body bytes come back unchanged,
streamed as they arrive (`iter_any()` -> `write()`). One shared ClientSession, no limits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gym_vllm  # noqa: E402  (only for its event-loop choice: the floor runs on the loop gym_vllm runs on)

CLIENT_KEY = web.AppKey("client", aiohttp.ClientSession)
FORWARDED_HEADERS = ("Content-Type", "Authorization")


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    base = upstream.rstrip("/")

    async def client(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            app[CLIENT_KEY] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        body = await request.read()
        async with app[CLIENT_KEY].request(request.method, base + request.path_qs, data=body, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                "Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")})
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp pass-through proxy (benchmark floor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000 (paths are appended as they come)")
    args = parser.parse_args()
    loop_factory = gym_vllm.event_loop_factory()
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None, backlog=4096,
                loop=loop_factory() if loop_factory else None)


if __name__ == "__main__":
    main()
