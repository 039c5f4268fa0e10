"""Streaming over real sockets with the official SDK, against the fake upstream (faults) and real vLLM."""

import asyncio
import json
import re
import time

import aiohttp
import pytest
from aiohttp import web

import gym_vllm

from conftest import assert_openai_error, server_config, strict_client
from test_stream import Feeding, check_lifecycle, normalized, reads_of, relayed, responses_framing, taken_by
from test_vllm import FORCED_CALL, WEATHER_TOOL


async def read_sse(response: aiohttp.ClientResponse) -> list[dict]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return events


async def post_stream(base, body, **kwargs):
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"stream": True, **body}, **kwargs) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
            return await read_sse(answer)


# --- fake upstream: shapes and faults ------------------------------------------------------------


async def test_sdk_stream_helper_and_create_stream(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    client = strict_client(await proxy(server_config(url, return_token_id_information=True)))
    async with client.responses.stream(model="tiny", input="hi") as stream:
        seen = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "Hello from stub"
    tokens = final.output[-1].model_dump()
    assert tokens["prompt_token_ids"] == [1, 2, 3, 4] and len(tokens["generation_token_ids"]) == len(tokens["generation_log_probs"]) > 0
    assert fake.requests[-1]["stream"] is True and fake.requests[-1]["stream_options"] == {"include_usage": True}
    events = [event async for event in await client.responses.create(model="tiny", input="hi", stream=True)]
    assert [e.type for e in events][-1] == "response.completed" and events[-1].response.usage.total_tokens == 10


async def test_stream_equals_non_streaming(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    streamed = check_lifecycle(await post_stream(base, {"input": "hi"}))
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"input": "hi", "stream": False}) as answer:
            plain = await answer.json()
    assert normalized(streamed) == normalized(plain)


async def test_lines_split_across_network_reads(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    final = check_lifecycle(await post_stream(base, {"input": "ragged"}))
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["summary"][0]["text"] == "stub reasoning" and final["output"][1]["content"][0]["text"] == "Hello from stub"
    client = strict_client(base)
    chunks = [c async for c in await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "ragged"}], stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "<think>stub reasoning</think>Hello from stub"


@pytest.mark.parametrize("command, fragment", [("drop_mid", "broke off the stream"), ("error_mid", "engine died"),
                                               ("eof_mid", "before `data: [DONE]`")])
async def test_upstream_failure_mid_stream_ends_with_response_failed(fake_upstreams, proxy, command, fragment):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    events = await post_stream(base, {"input": command})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert fragment in events[-2]["message"]
    final = check_lifecycle(events)
    assert final["status"] == "failed"
    assert all(item["status"] == "incomplete" for item in final["output"])  # the held-back <think> never reached the client
    async with aiohttp.ClientSession() as http:  # chat streams end with an error chunk, then [DONE]
        async with http.post(base + "/chat/completions", json={"messages": [{"role": "user", "content": command}], "stream": True}) as answer:
            lines = [line async for line in answer.content if line.strip()]
    assert lines[-1] == b"data: [DONE]\n" and fragment in json.loads(lines[-2][6:])["error"]["message"]


def sse_of(*chunks: str) -> bytes:
    return b"".join(b'data: {"created":1,"choices":[{"index":0,"delta":%s,"finish_reason":null}]}\n\n' % c.encode()
                    for c in chunks) + b"data: [DONE]\n\n"


async def test_a_chunk_that_cannot_be_written_as_json_fails_the_stream_not_the_server(fake_upstreams, proxy):
    """A chunk with a lone surrogate escape (no UTF-8 text carries it) or a `created` no float holds ends a Responses
    stream with `error` and `response.failed` naming it; before the fix the first was a UnicodeEncodeError and the
    second an OverflowError, the stream cut short. A chat chunk relayed as it came keeps its escape, as vLLM wrote it;
    one the relay must rewrite (reasoning) fails like a Responses stream."""
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    surrogate = '{"content":"a\\ud800"}'
    fake.verbatim = sse_of('{"role":"assistant","content":""}', '{"content":"ok "}', surrogate)
    events = await post_stream(base, {"input": "q"})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert "lone UTF-16 surrogate escape" in events[-2]["message"] and check_lifecycle(events)["status"] == "failed"
    fake.verbatim = sse_of('{"role":"assistant","content":""}').replace(b'"created":1', b'"created":1' + b"0" * 309)
    events = await post_stream(base, {"input": "q"})
    assert "`created` should be a finite number or null" in events[-2]["message"] and events[-1]["type"] == "response.failed"
    async with aiohttp.ClientSession() as http:
        for delta, passed_on in ((surrogate, True), ('{"reasoning_content":"\\udc00"}', False)):
            fake.verbatim = sse_of(delta)
            async with http.post(base + "/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "stream": True}) as answer:
                lines = [line async for line in answer.content if line.strip()]
            assert lines[-1] == b"data: [DONE]\n"
            if passed_on:
                assert lines[0] == sse_of(delta).split(b"\n")[0] + b"\n"
            else:
                assert "lone UTF-16 surrogate escape" in json.loads(lines[-2][6:])["error"]["message"]


async def test_a_bug_mid_stream_ends_the_stream_in_its_own_way(fake_upstreams, proxy, monkeypatch, caplog):
    """An exception no check foresaw, raised after the headers went out, used to reach the middleware, which wrote a 500
    into the open stream (a broken chunked body). The stream now ends as a failed one: `error` and `response.failed`,
    or an error chunk and [DONE]; the cause is logged on one line."""
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))

    def broken(self, chunk):
        raise KeyError("a bug")

    monkeypatch.setattr(gym_vllm.ResponsesStream, "feed", broken)
    monkeypatch.setattr(gym_vllm.ChatStreamRelay, "needs", lambda self, raw: True)
    monkeypatch.setattr(gym_vllm.ChatStreamRelay, "rewrite", broken)
    events = await post_stream(base, {"input": "hi"})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "internal error in gym_vllm: KeyError" and check_lifecycle(events)["status"] == "failed"
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as answer:
            lines = [line async for line in answer.content if line.strip()]
    assert lines[-1] == b"data: [DONE]\n" and json.loads(lines[-2][6:])["error"]["message"] == "internal error in gym_vllm: KeyError"
    assert sum("internal error mid-stream: KeyError('a bug')" in r.getMessage() for r in caplog.records) == 2


async def test_errors_before_the_stream_starts_are_plain_json(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url, uses_reasoning_parser=False))
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"input": "fail500", "stream": True}) as answer:
            assert answer.status == 502 and assert_openai_error(502, await answer.json())["code"] == "upstream_error"
    events = await post_stream(base, {"input": "reasoning"})  # parser off, vLLM sends reasoning: fails in-stream
    assert events[-1]["type"] == "response.failed" and "--reasoning-parser" in events[-2]["message"]
    overflow = check_lifecycle(await post_stream(base, {"input": "ctx"}))
    assert overflow["status"] == "incomplete" and overflow["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_prompt_too_long_for_a_stream_is_an_incomplete_stream(fake_upstreams, proxy):
    """The context-overflow answer, streamed: the Responses lifecycle ending in response.incomplete, or one chat chunk
    with finish_reason length and [DONE]; every event counted in /metrics."""
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    events = await post_stream(base, {"input": "ctx"})
    final = check_lifecycle(events)
    assert events[-1]["type"] == "response.incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/chat/completions", json={"messages": [{"role": "user", "content": "ctx"}], "stream": True}) as answer:
            lines = [line async for line in answer.content if line.strip()]
        async with http.get(base.removesuffix("/v1") + "/metrics") as answer:
            metrics = await answer.text()
    assert lines[-1] == b"data: [DONE]\n" and json.loads(lines[0][6:])["choices"][0]["finish_reason"] == "length"
    counted = dict(re.findall(r'gym_vllm_stream_events_total\{[^}]*endpoint="([^"]+)"[^}]*\} (\d+)', metrics))
    assert counted == {"/v1/responses": str(len(events)), "/v1/chat/completions": str(len(lines))}


async def test_chat_stream_relay(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    client = strict_client(await proxy(server_config(url)))
    chunks = [c async for c in await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "reasoning"}], stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "<think>separate reasoning</think>answer"
    assert chunks[-1].usage.total_tokens == 10


@pytest.mark.parametrize("command, seen", [("slow", b"output_text.delta"), ("slow_think", b"response.in_progress")],
                         ids=["sending", "holding-reasoning"])
async def test_client_disconnect_closes_the_upstream(fake_upstreams, command, seen):
    """A client that hangs up mid-stream ends the upstream request, even where nothing cancels the handler (the CLI's
    server does, test_a_client_that_gives_up_ends_its_upstream_request; an application embedding build_app in an
    aiohttp runner of its own may not): found by the next write, or, while the proxy holds a reasoning block back and
    writes nothing, at the next read."""
    [(fake, url)] = await fake_upstreams(1)
    runner = web.AppRunner(gym_vllm.build_app(server_config(url)), handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = "http://127.0.0.1:%d/v1" % runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"input": command, "stream": True}) as answer:
            async for line in answer.content:
                if seen in line:
                    break
        hung_up = asyncio.get_running_loop().time()
    for _ in range(60):
        if getattr(fake, "stream_closed", None):
            break
        await asyncio.sleep(0.05)
    await runner.cleanup()
    assert fake.stream_closed is not None and fake.stream_closed - hung_up < 2.0


@pytest.mark.parametrize("path, body", [("/responses", {"input": "flood", "stream": True}),
                                        ("/chat/completions", {"messages": [{"role": "user", "content": "flood"}], "stream": True})])
async def test_a_slow_reader_stalls_the_upstream_instead_of_buffering(fake_upstreams, proxy, path, body):
    """A client that reads nothing stalls vLLM's stream (nothing buffers without bound) and is not taken for a silent
    engine: the 2 s it waits are four idle timeouts (0.5 s), and the stream goes on when it reads again."""
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url, stream_idle_timeout_s=0.5))
    async with aiohttp.ClientSession() as http:
        async with http.post(base + path, json=body) as answer:
            await answer.content.readline()
            await asyncio.sleep(1.5)  # the client reads nothing: every buffer on the way fills, then the writer waits
            stalled_at = fake.flood_sent
            await asyncio.sleep(0.5)
            assert fake.flood_sent == stalled_at < 16_000_000  # of the 64 MB the upstream wanted to send
            received, last = 0, b""
            async for data in answer.content.iter_any():  # and reading resumes the flow
                received += len(data)
                last = data
                assert data.find(b"upstream_timeout") < 0
                if received > 20_000_000:
                    break
    assert fake.flood_sent > stalled_at and last.find(b"yyyy") >= 0


# --- real vLLM ------------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_real_stream_with_the_sdk_helper(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine, return_token_id_information=True)))
    async with client.responses.stream(model="tiny", input="Think first", temperature=0, max_output_tokens=64,
                                       extra_body={"structured_outputs": {"regex": "<think>abc</think>hello world"}}) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "abc" and final.output_text == "hello world" == "".join(deltas)
    assert len(deltas) > 1  # token by token, not one buffered blob
    tokens = final.output[-1].model_dump()
    assert len(tokens["generation_token_ids"]) == len(tokens["generation_log_probs"]) == final.usage.output_tokens
    # the same request without streaming gives the same response and the same tokens
    plain = await client.responses.create(model="tiny", input="Think first", temperature=0, max_output_tokens=64,
                                          extra_body={"structured_outputs": {"regex": "<think>abc</think>hello world"}})
    plain_tokens = plain.output[-1].model_dump()
    assert plain_tokens["generation_token_ids"] == tokens["generation_token_ids"]
    assert plain_tokens["prompt_token_ids"] == tokens["prompt_token_ids"]
    assert plain_tokens["generation_log_probs"] == pytest.approx(tokens["generation_log_probs"], abs=1e-4)

    def without_log_probs(response):
        response = normalized(response.model_dump())
        response["output"][-1].pop("generation_log_probs")
        for part in response["output"][-1]["content"]:
            part.pop("parsed", None)  # the SDK's stream helper adds it to what it parses
        return response

    assert without_log_probs(plain) == without_log_probs(final)


@pytest.mark.vllm
async def test_real_stream_events_tool_call_and_length_stop(vllm_engine, proxy):
    base = await proxy(server_config(vllm_engine))
    client = strict_client(base)
    events = [e async for e in await client.responses.create(model="tiny", input="Weather?", tools=[WEATHER_TOOL], temperature=0,
                                                               max_output_tokens=64, stream=True, extra_body={"structured_outputs": FORCED_CALL})]
    final = events[-1].response
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert any(e.type == "response.function_call_arguments.delta" for e in events)
    check_lifecycle([e.model_dump(exclude_unset=True) for e in events])
    cut = check_lifecycle(await post_stream(base, {"input": "Hi", "max_output_tokens": 5}))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    chunks = [c async for c in await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                                    max_tokens=5, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].usage.completion_tokens == 5


async def engine_metric(engine_base: str, name: str) -> float:
    """One of vLLM's own Prometheus figures (`vllm:<name>`), summed over its labels."""
    async with aiohttp.ClientSession() as http:
        async with http.get(engine_base.removesuffix("/v1") + "/metrics") as answer:
            text = await answer.text()
    return sum(float(m) for m in re.findall(r"^vllm:%s\{[^}]*\} (\S+)$" % re.escape(name), text, re.M))


async def running_requests(engine_base: str) -> float:
    return await engine_metric(engine_base, "num_requests_running")


async def settled_metric(engine_base: str, name: str, limit_s: float = 20) -> float:
    """A vLLM counter once it has stopped moving for half a second: vLLM updates its figures after its engine steps, so
    a read right after an event can come before them (on a busy machine, by more than a second)."""
    started, value = time.monotonic(), await engine_metric(engine_base, name)
    while True:
        await asyncio.sleep(0.5)
        latest = await engine_metric(engine_base, name)
        if latest == value:
            return value
        assert time.monotonic() - started < limit_s, f"vllm:{name} still moving after {limit_s} s"
        value = latest


@pytest.mark.vllm
async def test_real_engine_aborts_when_the_client_hangs_up(vllm_engine, proxy):
    """A stream's client that hangs up after its first delta ends the generation: vLLM generates far fewer tokens than
    were asked for (900, ~2 s on the test machine; its `num_requests_running` gauge lags too much to be read here)."""
    base = await proxy(server_config(vllm_engine))
    before = await settled_metric(vllm_engine, "generation_tokens_total")
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"input": "Hi", "stream": True, "max_output_tokens": 900,
                                                        "ignore_eos": True}) as answer:
            async for line in answer.content:
                if b"output_text.delta" in line:
                    break
    generated = await settled_metric(vllm_engine, "generation_tokens_total") - before
    assert 0 < generated < 900, f"vLLM generated {generated} tokens after the client hung up"


@pytest.mark.vllm
async def test_real_engine_aborts_a_reply_whose_client_hung_up(vllm_engine):
    """Not streamed either: a client that hangs up before its answer came ends the generation (the CLI's server cancels
    the handler, which closes the request to vLLM): vLLM generates far fewer tokens than were asked for."""
    runner = await gym_vllm.start_server(server_config(vllm_engine), "127.0.0.1", 0)
    before = await engine_metric(vllm_engine, "generation_tokens_total")
    try:
        async with aiohttp.ClientSession() as http:
            body = {"input": "Hi", "max_output_tokens": 1000, "ignore_eos": True}  # ~2 s on the test machine
            waiting = asyncio.create_task(http.post("http://127.0.0.1:%d/v1/responses" % runner.addresses[0][1], json=body))
            started = time.monotonic()
            while await running_requests(vllm_engine) < 1:
                assert time.monotonic() - started < 10 and not waiting.done()
                await asyncio.sleep(0.05)
            waiting.cancel()  # the client hangs up
        while await running_requests(vllm_engine) > 0:
            assert time.monotonic() - started < 20
            await asyncio.sleep(0.05)
        assert await engine_metric(vllm_engine, "generation_tokens_total") - before < 900, "vLLM kept generating after the client hung up"
    finally:
        await runner.cleanup()


async def test_real_stream_through_the_relay_gives_what_the_engine_wrote(vllm_engine, proxy):
    """A real engine's long stream through the relay, with the SDK: valid events in order, their deltas the text of the
    same greedy request without streaming, and of the final response."""
    client = strict_client(await proxy(server_config(vllm_engine, uses_reasoning_parser=False)))
    request = {"model": "tiny", "input": "Tell a long story", "temperature": 0, "max_output_tokens": 400,
               "extra_body": {"ignore_eos": True}}
    events = [event async for event in await client.responses.create(stream=True, **request)]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text
    assert text == (await client.responses.create(**request)).output_text


async def test_a_real_engine_stream_read_at_once_is_what_its_chunks_one_by_one_give(vllm_engine):
    """The bytes a real engine streams, in reads of several chunks (how a busy proxy reads them; a lone one reads one
    chunk at a time), converted a run at once: byte for byte what converting each chunk on its own gives, and what
    decoding and feeding each chunk gives. Reads of 3: about a fifth of the tiny model's chunks carry part of a character
    (`"delta":{}`), which sends a read chunk by chunk."""
    config = server_config(vllm_engine, uses_reasoning_parser=False)
    request = {"input": "Tell a long story", "stream": True, "temperature": 0, "max_output_tokens": 200, "ignore_eos": True}
    chat_body = gym_vllm.responses_request_to_chat(request, config)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{vllm_engine}/chat/completions", data=gym_vllm.request_json(chat_body),
                             headers={"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"}) as answer:
            assert answer.status == 200
            raw = await answer.read()
    reads = reads_of(raw, 3)

    def framing(kind=gym_vllm._ResponsesSSE):
        return responses_framing(config, kind, request)

    reference = relayed(framing(), [raw], at_once=False)
    assert relayed(framing(Feeding), [raw]) == reference
    at_once = framing()
    runs = taken_by(at_once, "convert_run")
    assert relayed(at_once, reads) == reference and reference[1] is None
    assert len(runs) >= 5 and reference[0].count(b"response.output_text.delta") >= 190


async def test_a_real_engine_token_id_stream_relayed_by_its_shortcuts_is_what_feeding_its_chunks_gives(vllm_engine):
    """A real engine's token-ID streams (`return_token_id_information`), 4 at once (a busy engine sends several tokens in
    some chunks), in reads of 6 chunks: their text chunks taken one by one and a read's run at once give byte for byte
    the events, token ids and log probs that decoding and feeding every chunk gives. The engine may only write the
    tokens of plain words (`allowed_token_ids`): many of the tiny model's other tokens are parts of a character
    (`"delta":{}`), which go feed's way."""
    config = server_config(vllm_engine, uses_reasoning_parser=False, return_token_id_information=True)
    headers = {"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(vllm_engine.removesuffix("/v1") + "/tokenize", headers=headers,
                             json={"model": "tiny", "prompt": "the quick brown fox jumps over a lazy dog", "add_special_tokens": False}) as answer:
            assert answer.status == 200
            words = (await answer.json())["tokens"]
        request = {"input": "Tell a long story", "stream": True, "temperature": 0, "max_output_tokens": 120, "ignore_eos": True,
                   "allowed_token_ids": words}
        chat_body = gym_vllm.request_json(gym_vllm.responses_request_to_chat(request, config))

        async def stream() -> bytes:
            async with http.post(f"{vllm_engine}/chat/completions", data=chat_body, headers=headers) as answer:
                assert answer.status == 200
                return await answer.read()

        raws = await asyncio.gather(*(stream() for _ in range(4)))
    taken = []
    for raw in raws:
        reads = reads_of(raw, 6)
        sides = []
        for kind in (Feeding, gym_vllm._ResponsesSSE):
            framing = responses_framing(config, kind, request)
            if kind is not Feeding:
                taken += [taken_by(framing, "_convert_token_run")]
            sides.append(relayed(framing, reads))
        assert sides[0] == sides[1] and sides[1][1] is None
        final = gym_vllm._loads(sides[1][0].rsplit(b"data: ", 1)[1])["response"]["output"][-1]
        assert len(final["generation_token_ids"]) == len(final["generation_log_probs"]) == 120
        assert set(final["generation_token_ids"]) <= set(words) and final["prompt_token_ids"]
    assert sum(map(len, taken)) >= 30
