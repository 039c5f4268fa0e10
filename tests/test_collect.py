"""`python -m gym_vllm collect`, run as a subprocess against a real gym_vllm proxy over real sockets.

The fake upstream behind the proxy gives what a real engine cannot on demand (a given error, a slow
reply to kill a run in); the last test collects real rollouts from real vLLM. A few pure tests
cover the resume reader and the line parser directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

import pytest

import gym_vllm
from conftest import server_config

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (one JSON line each) or raw strings (written as they are: bad lines, blank lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_rollouts(path: Path) -> list[dict]:
    """Every line of the output, which must be whole JSON lines, each ending with a newline."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.splitlines()]


def keys(rollouts: list[dict]) -> list[tuple[int, int]]:
    return sorted((r["_ng_task_index"], r["_ng_rollout_index"]) for r in rollouts)


def collect_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, **extra}


async def start_collect(*args, env: dict | None = None, stderr=asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "gym_vllm", "collect", *map(str, args), cwd=REPO,
                                                env=env or collect_env(), stdout=asyncio.subprocess.PIPE, stderr=stderr)


async def run_collect(*args, env: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    process = await start_collect(*args, env=env)
    _, err = await asyncio.wait_for(process.communicate(), timeout)
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    return process.returncode, stderr


async def wait_for_lines(path: Path, count: int, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines")


@pytest.fixture
async def stub(fake_upstreams, proxy):
    """(fake upstream, proxy base URL)."""
    [(fake, url)] = await fake_upstreams(1)
    return fake, await proxy(server_config(url))


# --- the pure parts ---------------------------------------------------------------------------


def test_input_line_shapes():
    request, record = gym_vllm.parse_input_line('{"responses_create_params": {"input": "q", "stream": true}, "answer": 4}', "m")
    assert request == {"input": "q", "model": "m"} and record == {"responses_create_params": request, "answer": 4}
    request, record = gym_vllm.parse_input_line(b'{"input": [], "model": "mine"}', "m")
    assert request == {"input": [], "model": "mine"} and record == {"responses_create_params": request}
    request, _ = gym_vllm.parse_input_line(b'{"input": "\\ud83d\\ude00"}')  # an escaped pair is one character
    assert request == {"input": "\U0001F600"}
    for line, reason in [("{", "not valid JSON"), ("[1]", "not a JSON object but an array"), (b"\xff", "not valid JSON"),
                         ('{"messages": []}', "the line has no `input`"),
                         ('{"responses_create_params": {}}', "`responses_create_params` has no `input`"),
                         ('{"responses_create_params": "q"}', "is a string, not an object"),
                         ('{"input": 3}', "`input` is a number"), ('{"input": "\\ud800"}', "lone UTF-16 surrogate"),
                         (b'{"input": "q", "metadata": {"a": "\\uDC00"}}', "lone UTF-16 surrogate"),
                         ('{"input": "q", "temperature": NaN}', "not valid JSON (NaN is not a JSON number)"),  # was written
                         ('{"input": "q", "x": ' + "[" * 990 + "]" * 990 + "}", "nested too deeply")]:  # was a crash
        with pytest.raises(ValueError, match=re.escape(reason)):
            gym_vllm.parse_input_line(line)


def test_resume_state_drops_only_a_torn_last_line():
    def line(i: int, r: int) -> bytes:
        return json.dumps({"_ng_task_index": i, "_ng_rollout_index": r, "response": {}}).encode() + b"\n"

    whole = line(0, 0) + b"\n" + line(2, 1)
    state = gym_vllm.resume_state((whole + b'{"_ng_task_index": 3, "resp').splitlines(keepends=True))
    assert state.done == {(0, 0), (2, 1)} and state.keep_bytes == len(whole) and state.torn_line
    state = gym_vllm.resume_state((whole + line(4, 0)[:-1]).splitlines(keepends=True))  # whole, newline missing
    assert state.done == {(0, 0), (2, 1), (4, 0)} and not state.torn_line and state.ends_mid_line
    with pytest.raises(ValueError, match="line 2: not an object|line 2: no integer"):  # damage before the end is not a torn write
        gym_vllm.resume_state((line(0, 0) + b'{"oops": 1}\n' + line(1, 0)).splitlines(keepends=True))
    state = gym_vllm.resume_state([line(0, 0), '{"_ng_task_index": 1, "text": "é'.encode()[:-1]])  # cut inside a character
    assert state.torn_line and state.keep_bytes == len(line(0, 0))
    # Whole JSON that is not a record, without a newline, is someone's file, not a write cut short: it was truncated
    for other in (b'{"important": 1}', b'[1, 2]', b'"notes"'):
        for before in ([], [line(0, 0)]):
            with pytest.raises(ValueError, match=f"line {len(before) + 1}: "):
                gym_vllm.resume_state([*before, other])


def test_collect_leaves_an_output_that_is_not_its_own_untouched(tmp_path, capsys):
    """A one-line JSON file without its newline given as --output: the run refuses it and leaves it as it was (it was
    taken for a record cut short by a kill, and truncated to nothing)."""
    output = tmp_path / "notes.json"
    output.write_bytes(b'{"important": 1}')
    (tmp_path / "in.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(gym_vllm.CollectError, match="is not a collect output"):
        asyncio.run(gym_vllm.collect("http://127.0.0.1:9/v1", str(tmp_path / "in.jsonl"), str(output)))
    assert output.read_bytes() == b'{"important": 1}'


def test_replies_and_progress_line():
    ok, error = gym_vllm.response_from_reply(200, b'{"output": [], "status": "incomplete"}')
    assert ok == {"output": [], "status": "incomplete"} and error is None
    assert gym_vllm.response_from_reply(400, b'{"error": {"message": "bad temperature"}}') == (None, "HTTP 400: bad temperature")
    assert gym_vllm.response_from_reply(500, b'"engine down"') == (None, "HTTP 500: engine down")
    assert gym_vllm.response_from_reply(502, b"<html>bad gateway</html>") == (None, "HTTP 502: <html>bad gateway</html>")
    assert "status `failed`: boom" in gym_vllm.response_from_reply(200, b'{"output": [], "status": "failed", "error": {"message": "boom"}}')[1]
    assert gym_vllm.response_from_reply(200, b'{"output": [{"text": "\\ud800"}]}') == (  # was written out: a crash
        None, "HTTP 200: the reply holds a lone UTF-16 surrogate escape (like \\ud800) in a string, which no UTF-8 text can carry")
    assert gym_vllm.response_from_reply(200, b'{"output": [{"text": "\\ud83d\\ude00"}]}')[0] == {"output": [{"text": "\U0001F600"}]}
    assert gym_vllm.response_from_reply(200, b'{"output": [], "x": -Infinity}') == (  # was written out as -Infinity
        None, 'HTTP 200 but not a Responses object: {"output": [], "x": -Infinity}')
    assert gym_vllm.format_progress(30, 100, 2, 20, 10.0) == "30/100 done (30%), 2 failed, 2.0 rollouts/s, ETA 34s"
    assert gym_vllm.format_progress(0, 100, 0, 0, 3.0).endswith("0.0 rollouts/s, ETA ?")


# --- the CLI against a proxy ------------------------------------------------------------------


async def test_both_input_shapes_keep_their_keys(stub, tmp_path):
    fake, url = stub
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"responses_create_params": {"input": "first", "model": "given", "metadata": {"k": "v"}}, "expected_answer": "4"},
        {"input": [{"role": "user", "content": "second"}], "max_output_tokens": 8, "stream": True},
    ])
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out, "--model", "policy")
    assert code == 0, stderr
    first, second = sorted(read_rollouts(out), key=lambda r: r["_ng_task_index"])
    assert first["expected_answer"] == "4" and first["_ng_rollout_index"] == 0
    assert first["responses_create_params"] == {"input": "first", "model": "given", "metadata": {"k": "v"}}
    assert set(second) == {"responses_create_params", "_ng_task_index", "_ng_rollout_index", "response"}
    assert second["responses_create_params"] == {"input": [{"role": "user", "content": "second"}], "max_output_tokens": 8,
                                                 "model": "policy"}  # --model filled in; `stream` dropped
    for rollout in (first, second):
        assert rollout["response"]["object"] == "response" and rollout["response"]["status"] == "completed"
        assert rollout["response"]["output"][-1]["content"][0]["text"] == "Hello from stub"
    assert sorted(r["messages"][-1]["content"] for r in fake.requests) == ["first", "second"]
    assert second["response"]["max_output_tokens"] == 8 and "stream" not in fake.requests[-1]
    assert "\r" not in stderr and "2 rollouts written" in stderr  # not a terminal: plain lines


async def test_bad_lines_are_reported_with_their_line_numbers_and_skipped(stub, tmp_path):
    _, url = stub
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"input": "good"}, "not json", "[1, 2]", {"responses_create_params": {"messages": []}}, "", {"input": "also good"},
        {"responses_create_params": "q"},
    ])
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out)
    assert code == 1, stderr  # the run completes, but not everything asked for could be collected
    assert f"{source} line 2: not valid JSON" in stderr and f"{source} line 3: not a JSON object but an array" in stderr
    assert f"{source} line 4: `responses_create_params` has no `input`" in stderr
    assert f"{source} line 7: `responses_create_params` is a string" in stderr and "line 1:" not in stderr
    assert "4 bad input lines skipped" in stderr
    rollouts = read_rollouts(out)  # indices count non-blank lines: "also good" (line 6) is index 4
    assert {r["_ng_task_index"]: r["responses_create_params"]["input"] for r in rollouts} == {0: "good", 4: "also good"}


async def test_limit_and_num_repeats(stub, tmp_path):
    fake, url = stub
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}", "temperature": 0} for i in range(5)])
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out, "--limit", 3, "--num-repeats", 4,
                                     "--concurrency", 1)
    assert code == 0, stderr
    rollouts = read_rollouts(out)
    # One in flight: written in job order, each group's repeats together.
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rollouts] == [(i, r) for i in range(3) for r in range(4)]
    assert all(r["responses_create_params"]["input"] == f"q{r['_ng_task_index']}" for r in rollouts)
    assert len(fake.requests) == 12 and "3 requests have temperature 0: their 4 repeats will be alike" in stderr

    # A larger --num-repeats and --limit later only adds what is missing.
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out, "--limit", 4, "--num-repeats", 5)
    assert code == 0, stderr
    assert keys(read_rollouts(out)) == [(i, r) for i in range(4) for r in range(5)]
    assert len(fake.requests) == 20 and "12 already in" in stderr


async def test_concurrency_keeps_every_line_and_uses_every_upstream(fake_upstreams, proxy, tmp_path):
    upstreams = await fake_upstreams(2)
    for fake, _ in upstreams:
        fake.delay = 0.1
    # A host name, not an IP: aiohttp's default cookie jar would keep a cookie from it.
    url = (await proxy(server_config([u for _, u in upstreams]))).replace("127.0.0.1", "localhost")
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(32)])
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out, "--concurrency", 8)
    assert code == 0, stderr
    rollouts = read_rollouts(out)
    assert keys(rollouts) == [(i, 0) for i in range(32)]
    assert all(r["responses_create_params"]["input"] == f"q{r['_ng_task_index']}" for r in rollouts)
    # No cookie jar: a kept cookie would pin the later requests to one upstream.
    assert [len(fake.requests) for fake, _ in upstreams] == [16, 16]
    assert sum(fake.max_active for fake, _ in upstreams) >= 4


async def test_failed_requests_are_not_written_and_a_rerun_retries_them(stub, tmp_path):
    fake, url = stub
    rows = [{"input": "fine"}, {"input": "bad400"}, {"input": "fail500"}, {"input": "also fine"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out)
    assert code == 1, stderr
    assert f"{source} line 2: HTTP 400: temperature must be non-negative" in stderr
    assert f"{source} line 3: HTTP 502: " in stderr and "engine exploded" in stderr
    assert "2 failed" in stderr and "run the same command again to collect the 2 missing" in stderr
    assert keys(read_rollouts(out)) == [(0, 0), (3, 0)]

    write_jsonl(source, [rows[0], {"input": "fixed a"}, {"input": "fixed b"}, rows[3]])  # the data fixed in place
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out)
    assert code == 0, stderr
    assert [r["messages"][-1]["content"] for r in fake.requests[4:]] in (["fixed a", "fixed b"], ["fixed b", "fixed a"])
    assert keys(read_rollouts(out)) == [(i, 0) for i in range(4)]


async def another_server(aiohttp_server, responses) -> str:
    """Another server's /v1 (its `/models` answers the start-up check, `responses` every rollout), for what
    gym_vllm itself never answers."""
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/responses", responses)
    return f"http://127.0.0.1:{(await aiohttp_server(app)).port}/v1"


async def test_a_server_that_hangs_up_stops_the_run(aiohttp_server, tmp_path):
    from aiohttp import web

    posts = []

    async def hang_up(request: web.Request) -> web.Response:  # answers the check, then drops every request
        posts.append(request.path)
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    url = await another_server(aiohttp_server, hang_up)
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(30)])
    code, stderr = await run_collect("--url", url, "--input", source,
                                     "--output", tmp_path / "out.jsonl", "--concurrency", 1)
    assert code == 1 and f"{source} line 1: connection failed" in stderr, stderr
    assert len(posts) == 8 and "stopped early: 8 requests in a row could not reach" in stderr
    assert "collect the 30 missing" in stderr and read_rollouts(tmp_path / "out.jsonl") == []


async def test_a_server_that_says_come_back_is_asked_again(aiohttp_server, tmp_path, monkeypatch, capsys):
    """503 or 429 (local_vllm's proxy while its engine restarts, a rate limit): each line is sent again after a pause,
    where every line left failed at once; a server that keeps refusing stops the run as one that is gone does.
    Found by a review."""
    from aiohttp import web

    monkeypatch.setattr(gym_vllm, "_RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    asked: dict = {}

    async def restarting(request: web.Request) -> web.Response:
        question = (await request.json())["input"]
        asked[question] = asked.get(question, 0) + 1
        if question == "never" or asked[question] <= 2:
            return web.Response(status=503 if asked[question] % 2 else 429, headers={"Retry-After": "0"},
                                body=b'{"error": {"message": "restarting; retry shortly"}}', content_type="application/json")
        return web.json_response({"output": [], "status": "completed"})

    url = await another_server(aiohttp_server, restarting)
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(5)])
    result = await gym_vllm.collect(url, source, str(tmp_path / "out.jsonl"), concurrency=2)
    assert (result.written, result.failed) == (5, 0) and all(count == 3 for count in asked.values())
    source = write_jsonl(tmp_path / "never.jsonl", [{"input": "never"}] * 20)
    result = await gym_vllm.collect(url, source, str(tmp_path / "never-out.jsonl"), concurrency=1)
    assert result.failed == 8 and "8 requests in a row could not reach" in result.stopped
    assert asked["never"] == 8 * 4  # each line: the first try and three more
    err = capsys.readouterr().err
    assert "line 1: HTTP 429: restarting; retry shortly" in err, err  # the fourth try's answer


async def test_a_reply_no_file_can_hold_is_a_failed_line_and_the_run_goes_on(aiohttp_server, tmp_path):
    """Another server's Response with a lone surrogate escape (valid JSON, no UTF-8 for it) once crashed the run
    (UnicodeEncodeError writing the rollout); it is that line's failure, and the rest are collected."""
    from aiohttp import web

    async def responses(request: web.Request) -> web.Response:
        text = "\\udc00" if (await request.json())["input"] == "bad" else "fine"
        return web.Response(body=b'{"output": [{"type": "message", "text": "%s"}], "status": "completed"}' % text.encode(),
                            content_type="application/json")

    url = await another_server(aiohttp_server, responses)
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": "ok"}, {"input": "bad"}, {"input": "ok"}])
    code, stderr = await run_collect("--url", url, "--input", source,
                                     "--output", tmp_path / "out.jsonl", "--concurrency", 1)
    assert code == 1 and f"{source} line 2: HTTP 200: the reply holds a lone UTF-16 surrogate" in stderr, stderr
    assert "Traceback" not in stderr and keys(read_rollouts(tmp_path / "out.jsonl")) == [(0, 0), (2, 0)]


async def test_resume_after_sigkill_has_every_rollout_exactly_once(stub, tmp_path):
    fake, url = stub
    fake.delay = 0.2
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(30)])
    out = tmp_path / "out.jsonl"
    args = ("--url", url, "--input", source, "--output", out, "--num-repeats", 2, "--concurrency", 4)
    process = await start_collect(*args)
    await wait_for_lines(out, 6)
    process.kill()
    await process.wait()
    with out.open("ab") as file:  # what a kill in the middle of a write leaves
        file.write(b'{"_ng_task_index": 29, "_ng_rollout_index": 1, "respo')
    kept = out.read_bytes().count(b"\n")
    assert 6 <= kept < 60
    sent_before = len(fake.requests)

    fake.delay = 0
    code, stderr = await run_collect(*args)
    assert code == 0, stderr
    assert "dropped a partial last line" in stderr and f"{kept} already in" in stderr
    rollouts = read_rollouts(out)
    assert len(rollouts) == 60 and keys(rollouts) == [(i, r) for i in range(30) for r in range(2)]
    assert len(fake.requests) - sent_before == 60 - kept  # nothing already written was sent again


async def test_ctrl_c_stops_cleanly_and_says_how_to_resume(stub, tmp_path):
    fake, url = stub
    fake.delay = 0.3
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(40)])
    out = tmp_path / "out.jsonl"
    args = ("--url", url, "--input", source, "--output", out, "--concurrency", 2)
    process = await start_collect(*args)
    await wait_for_lines(out, 2)
    code, stderr = await run_collect(*args)  # a second collector on the same output is refused
    assert code == 2 and f"gym_vllm collect: error: another collect is writing to {out}" in stderr
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 130 and "Traceback" not in stderr
    assert "interrupted: " in stderr and "run the same command again" in stderr
    assert len(read_rollouts(out)) < 40  # whole lines only

    fake.delay = 0
    code, stderr = await run_collect(*args)
    assert code == 0, stderr
    assert keys(read_rollouts(out)) == [(i, 0) for i in range(40)]


async def test_progress_line_on_a_terminal(stub, tmp_path):
    fake, url = stub
    fake.delay = 0.1
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": f"q{i}"} for i in range(10)])
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full pty buffer would block the writer
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    process = await start_collect("--url", url, "--input", source, "--output", tmp_path / "out.jsonl", "--concurrency", 2,
                                  stderr=slave)
    os.close(slave)
    await asyncio.wait_for(process.wait(), 60)
    await asyncio.to_thread(reader.join, 5)
    os.close(master)
    shown = b"".join(chunks).decode()
    assert process.returncode == 0, shown
    assert re.search(r"\r\x1b\[K\d+/10 done \(\d+%\), 0 failed, [\d.]+ rollouts/s, ETA \S+", shown), shown
    assert "\r\x1b[K10/10 done (100%)" in shown and "10 rollouts written" in shown


@pytest.mark.parametrize("case", ["missing input", "bad url", "unreachable url", "not a rollout file", "same file",
                                  "refused key", "zero concurrency"])
async def test_usage_errors_are_one_line_and_exit_2(fake_upstreams, proxy, tmp_path, case):
    [(_, upstream)] = await fake_upstreams(1)
    url = await proxy(server_config(upstream, server_api_key="sk-proxy-key"))
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": "q"}])
    out = tmp_path / "out.jsonl"
    args = {"--url": url, "--input": source, "--output": out, "--api-key": "sk-proxy-key"}
    expected = {
        "missing input": ({"--input": tmp_path / "nope.jsonl"}, f"cannot read --input {tmp_path / 'nope.jsonl'}: No such file"),
        "bad url": ({"--url": "localhost:8080/v1"}, "--url 'localhost:8080/v1' is not an http(s) URL"),
        "unreachable url": ({"--url": "http://127.0.0.1:9/v1"}, "cannot reach http://127.0.0.1:9/v1"),
        "not a rollout file": ({}, f"--output {out} is not a collect output (line 1: no integer `_ng_task_index`"),
        "same file": ({"--output": source}, f"--output {source} is the input file"),
        "refused key": ({"--api-key": "sk-wrong-key"}, "refused the API key (HTTP 401 on GET /models)"),
        "zero concurrency": ({"--concurrency": 0}, "argument --concurrency: must be at least 1"),
    }
    override, message = expected[case]
    if case == "not a rollout file":
        out.write_text('{"some": "other data"}\n')
    code, stderr = await run_collect(*(str(part) for item in {**args, **override}.items() for part in item))
    assert code == 2 and message in stderr, stderr
    if case != "zero concurrency":  # argparse prints its usage line first
        assert stderr.count("\n") == 1 and stderr.startswith("gym_vllm collect: error: "), stderr
    assert "sk-wrong-key" not in stderr and "sk-proxy-key" not in stderr
    if case == "not a rollout file":
        assert out.read_text() == '{"some": "other data"}\n'  # never appended to


async def test_api_key_from_the_environment(fake_upstreams, proxy, tmp_path):
    [(_, upstream)] = await fake_upstreams(1)
    url = await proxy(server_config(upstream, server_api_key="sk-proxy-key"))
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": "q"}])
    code, stderr = await run_collect("--url", url, "--input", source, "--output", tmp_path / "out.jsonl",
                                     env=collect_env(OPENAI_API_KEY="sk-proxy-key"))
    assert code == 0 and "sk-proxy-key" not in stderr, stderr
    assert len(read_rollouts(tmp_path / "out.jsonl")) == 1


async def test_the_readme_command(stub, tmp_path):
    fake, url = stub
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Collecting rollouts"):]
    command = re.search(r"```bash\n(python -m gym_vllm collect .*)\n```", section).group(1)
    example = re.search(r"```json\n(.*?)\n```", section, re.S).group(1)
    (tmp_path / "prompts.jsonl").write_text(example + "\n")
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "gym_vllm", "collect"]
    swap = {"http://127.0.0.1:8080/v1": url, "prompts.jsonl": str(tmp_path / "prompts.jsonl"),
            "rollouts.jsonl": str(tmp_path / "rollouts.jsonl")}
    code, stderr = await run_collect(*(swap.get(arg, arg) for arg in argv[4:]))
    assert code == 0, stderr
    rollouts = read_rollouts(tmp_path / "rollouts.jsonl")
    assert keys(rollouts) == [(i, r) for i in range(2) for r in range(4)]
    assert all(r["expected_answer"] == "51" for r in rollouts if r["_ng_task_index"] == 0)
    assert len(fake.requests) == 8


# --- real vLLM ---------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_real_rollouts_with_token_ids(vllm_engine, proxy, tmp_path):
    url = await proxy(server_config(vllm_engine, return_token_id_information=True))
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"responses_create_params": {"input": "Hello", "max_output_tokens": 6, "temperature": 1.0}, "id": "a"},
        {"input": [{"role": "user", "content": "Count to three"}], "max_output_tokens": 6, "temperature": 1.0},
    ])
    out = tmp_path / "out.jsonl"
    code, stderr = await run_collect("--url", url, "--input", source, "--output", out, "--num-repeats", 2)
    assert code == 0, stderr
    rollouts = read_rollouts(out)
    assert keys(rollouts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rollout in rollouts:
        response = rollout["response"]
        assert response["model"] == "tiny" and response["status"] in ("completed", "incomplete")
        assert 0 < response["usage"]["output_tokens"] <= 6
        last = response["output"][-1]
        assert last["type"] == "message"
        assert len(last["generation_token_ids"]) == len(last["generation_log_probs"]) == response["usage"]["output_tokens"]
        assert len(last["prompt_token_ids"]) == response["usage"]["input_tokens"]
    assert [r["id"] for r in rollouts if r["_ng_task_index"] == 0] == ["a", "a"]
