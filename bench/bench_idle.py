"""Memory of idle keep-alive connections held open to gym_vllm.

Run it (from the repository root)::

    .venv/bin/python bench/bench_idle.py [--connections 1024] [--first-request models|responses|none] [--json out.json]

It starts `bench/fake_upstream.py` and `python -m gym_vllm` (a temporary config, as bench_stream.py
does), warms gym_vllm up with a few requests of every kind it will see, and reads its RSS (VmRSS of
/proc/<pid>/status) and open sockets. Then it opens `--connections` TCP connections (in batches of
`--batch`), sends one HTTP/1.1 keep-alive request on each (`GET /v1/models` by default; `responses`:
a non-streaming `POST /v1/responses`, which also grows gym_vllm's upstream connection pool; `none`:
no request, just accepted connections) and reads the whole reply, leaving every connection open and
idle. After `--settle` seconds it reads RSS and sockets again and reports the difference, in all and
per connection. Then it checks that gym_vllm still serves: a `POST /v1/responses` on a new
connection and a `GET /v1/models` on one of the idle ones must both answer 200 with the expected
`object`, and no idle connection may have been closed by the server. Finally it closes them all and
reads RSS once more (whether the memory goes back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import aiohttp

from harness import (Child, free_port, gym_child, open_fds, progress, raise_nofile, rss_kib, running_children, start_all,
                     upstream_child)

RESPONSES_BODY = json.dumps({"input": "hi", "max_output_tokens": 64, "bench_think_tokens": 16}).encode()


def http_request(kind: str, port: int) -> bytes:
    if kind == "models":
        return f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n".encode()
    return (f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(RESPONSES_BODY)}\r\n\r\n").encode() + RESPONSES_BODY


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 reply with Content-Length or chunked framing."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return status, body[:-2]
            body = body[:-2]
    return status, await reader.read()


def check_object(status: int, body: bytes, expected: str) -> str:
    if status != 200:
        return f"HTTP {status}: {body[:160]!r}"
    try:
        obj = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:80]!r}"
    return "" if isinstance(obj, dict) and obj.get("object") == expected else f"object {obj.get('object') if isinstance(obj, dict) else obj!r}"


async def open_idle(port: int, count: int, batch: int, kind: str) -> tuple[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], list[str]]:
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    request = http_request(kind, port) if kind != "none" else b""
    expected = "list" if kind == "models" else "response"

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        except OSError as exc:
            errors.append(f"connect: {exc}")
            return
        connections.append((reader, writer))
        if request:
            try:
                writer.write(request)
                status, body = await read_reply(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{exc.__class__.__name__}: {exc}")
                return
            error = check_object(status, body, expected)
            if error:
                errors.append(error)

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return connections, errors


async def fresh_request(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/responses", data=RESPONSES_BODY,
                                headers={"Content-Type": "application/json"}) as response:
            return check_object(response.status, await response.read(), "response")


async def run(args: argparse.Namespace, gym: Child, port: int) -> dict:
    pid = gym.pid
    # Warm-up: every code path the idle connections will touch, so lazy imports and caches are not counted.
    async with aiohttp.ClientSession() as session:
        for _ in range(args.warmup_requests):
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as response:
                await response.read()
            async with session.post(f"http://127.0.0.1:{port}/v1/responses", data=RESPONSES_BODY,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
    await asyncio.sleep(args.settle)
    rss0, (fds0, sockets0) = rss_kib(pid), open_fds(pid)
    progress(f"gym_vllm pid {pid}: RSS {rss0 / 1024:.1f} MiB, {sockets0} sockets before")

    begin = time.perf_counter()
    connections, open_errors = await open_idle(port, args.connections, args.batch, args.first_request)
    open_s = time.perf_counter() - begin
    await asyncio.sleep(args.settle)
    rss1, (fds1, sockets1) = rss_kib(pid), open_fds(pid)
    progress(f"opened {len(connections)} connections in {open_s:.2f} s ({len(open_errors)} errors); "
             f"RSS {rss1 / 1024:.1f} MiB, {sockets1} sockets")

    # Still serving? A new connection, and one of the idle ones.
    new_error = await fresh_request(port)
    reuse_error = "no idle connection to reuse"
    if connections:
        reader, writer = connections[0]
        try:
            writer.write(http_request("models", port))
            status, body = await asyncio.wait_for(read_reply(reader), 10)
            reuse_error = check_object(status, body, "list")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            reuse_error = f"{exc.__class__.__name__}: {exc}"
    await asyncio.sleep(0.2)
    closed_by_server = sum(1 for reader, _ in connections if reader.at_eof())
    rss2 = rss_kib(pid)

    for _, writer in connections:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in connections), return_exceptions=True)
    await asyncio.sleep(args.settle)
    rss3, (fds3, sockets3) = rss_kib(pid), open_fds(pid)
    held = len(connections)
    return {
        "connections_requested": args.connections, "connections_open": held, "open_errors": len(open_errors),
        "first_open_error": open_errors[0] if open_errors else "", "open_seconds": round(open_s, 3),
        "first_request": args.first_request, "rss_before_kib": rss0, "rss_idle_kib": rss1, "rss_after_checks_kib": rss2,
        "rss_after_close_kib": rss3, "rss_delta_kib": rss1 - rss0,
        "rss_per_connection_bytes": round((rss1 - rss0) * 1024 / held) if held else None,
        "server_sockets_before": sockets0, "server_sockets_idle": sockets1, "server_sockets_after_close": sockets3,
        "server_fds_before": fds0, "server_fds_idle": fds1, "server_fds_after_close": fds3,
        "closed_by_server": closed_by_server, "new_connection_request": new_error or "ok",
        "idle_connection_request": reuse_error or "ok",
    }


def report(r: dict) -> str:
    mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
    rows = [
        ("idle keep-alive connections held", f"{r['connections_open']} of {r['connections_requested']} "
                                             f"({r['open_errors']} errors, opened in {r['open_seconds']:.2f} s)"),
        ("first request on each", {"models": "GET /v1/models", "responses": "POST /v1/responses (non-streaming)",
                                   "none": "none (accepted only)"}[r["first_request"]]),
        ("gym_vllm sockets before → idle → after close", f"{r['server_sockets_before']} → {r['server_sockets_idle']} → "
                                                         f"{r['server_sockets_after_close']}"),
        ("gym_vllm RSS before", mib(r["rss_before_kib"])),
        ("gym_vllm RSS with the connections idle", mib(r["rss_idle_kib"])),
        ("RSS added", f"{mib(r['rss_delta_kib'])} ({r['rss_delta_kib']} KiB)"),
        ("RSS added per connection", f"{r['rss_per_connection_bytes'] / 1024:.1f} KiB" if r["rss_per_connection_bytes"] is not None else "–"),
        ("RSS after the checks / after closing all", f"{mib(r['rss_after_checks_kib'])} / {mib(r['rss_after_close_kib'])}"),
        ("new connection: POST /v1/responses", r["new_connection_request"]),
        ("an idle connection: GET /v1/models", r["idle_connection_request"]),
        ("idle connections closed by gym_vllm", str(r["closed_by_server"])),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RSS of gym_vllm holding idle keep-alive connections")
    parser.add_argument("--connections", type=int, default=1024, help="idle connections to hold (default 1024)")
    parser.add_argument("--first-request", choices=("models", "responses", "none"), default="models",
                        help="request sent once on each connection before it idles (default models)")
    parser.add_argument("--batch", type=int, default=128, help="connections opened concurrently (default 128)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait before each RSS reading (default 1)")
    parser.add_argument("--warmup-requests", type=int, default=20, help="requests of each kind before the first reading")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.batch < 1:
        parser.error("--connections and --batch must be >= 1")
    nofile = raise_nofile(2 * args.connections + 1024)
    if nofile < args.connections + 64:
        progress(f"WARNING: RLIMIT_NOFILE is {nofile}: too low for {args.connections} connections")

    with running_children("bench_idle") as (workdir, children):
        upstream_port, gym_port = free_port(), free_port()
        gym = gym_child(workdir, "gym_vllm", upstream_port, gym_port)
        start_all([upstream_child(workdir, upstream_port), gym], children)
        result = asyncio.run(run(args, gym, gym_port))
        result["gym_alive_at_end"] = gym.alive()

    result.update({"python": platform.python_version(), "aiohttp": aiohttp.__version__, "cpus": os.cpu_count()})
    print(f"\n## Idle keep-alive connections to gym_vllm (Python {result['python']}, aiohttp {result['aiohttp']})\n")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    ok = (result["connections_open"] == args.connections and not result["open_errors"] and result["closed_by_server"] == 0
          and result["new_connection_request"] == "ok" and result["idle_connection_request"] == "ok")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
