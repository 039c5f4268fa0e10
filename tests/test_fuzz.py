"""Random JSON into the converters: the answer is a valid chat body or a 400 ApiError, never another exception."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gym_vllm
from gym_vllm import ApiError
from test_conversion import BASE, completion

TRAIN = dataclasses.replace(BASE, return_token_id_information=True, replace_developer_role_with_system=True)
KEYS = ["type", "role", "content", "text", "summary", "call_id", "name", "arguments", "output", "tool_call_id",
        "tool_calls", "image_url", "refusal", "function", "parameters", "format", "effort", "prompt_token_ids",
        "generation_token_ids", "generation_log_probs", "chat_template_kwargs", "extra_body"]
VALUES = ["message", "user", "assistant", "system", "developer", "tool", "reasoning", "function_call",
          "function_call_output", "input_text", "output_text", "input_image", "refusal", "function", "summary_text",
          "json_schema", "json_object", "text", "auto", "required", "none"]
scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(VALUES) | st.text(max_size=5)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), children, max_size=5), max_leaves=25)
request_keys = st.sampled_from(["input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
                                "temperature", "text", "reasoning", "metadata", "top_logprobs", "include", "n", "stream",
                                "truncation", "chat_template_kwargs", "messages", "logprobs"])
requests = st.dictionaries(request_keys, json_values, max_size=6) | json_values


def check(convert, request):
    try:
        chat = convert(request)
    except ApiError as error:
        assert error.status == 400 and error.message
    else:
        assert isinstance(chat["messages"], list) and chat["model"] == "m"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_responses_request_fuzz(request):
    check(lambda r: gym_vllm.responses_request_to_chat(r, BASE), request)
    check(lambda r: gym_vllm.responses_request_to_chat(r, TRAIN), request)


ITEM_TYPES = ["message", "reasoning", "function_call", "function_call_output", "item_reference"]
items = st.fixed_dictionaries({"type": st.sampled_from(ITEM_TYPES), "role": st.sampled_from(VALUES)},
                              optional={key: json_values for key in KEYS if key not in ("type", "role")})


@settings(max_examples=600, deadline=None)
@given(st.fixed_dictionaries({"input": st.lists(items, min_size=1, max_size=4)}))
def test_input_items_fuzz(request):
    check(lambda r: gym_vllm.responses_request_to_chat(r, TRAIN), request)


@settings(max_examples=800, deadline=None)
@given(requests)
def test_chat_request_fuzz(body):
    check(lambda b: gym_vllm.prepare_chat_request(b, TRAIN, metadata=b.get("metadata") if isinstance(b, dict) and isinstance(b.get("metadata"), dict) else None)
          if isinstance(b, dict) else gym_vllm.responses_request_to_chat(b, BASE), body)


@settings(max_examples=800, deadline=None)
@given(json_values, json_values)
def test_upstream_response_fuzz(message_extra, choice_extra):
    """Whatever an upstream sends back, the converter answers a Response or a 502, nothing else."""
    chat = completion()
    if isinstance(message_extra, list):  # a token bundle on the message, of random shapes
        chat["choices"][0]["message"].update(zip(gym_vllm.TOKEN_FIELDS, message_extra + [[]] * 3))
    if isinstance(message_extra, dict):
        chat["choices"][0]["message"].update(message_extra)
    if isinstance(choice_extra, dict):
        chat["choices"][0].update(choice_extra)
    for config in (BASE, TRAIN):
        try:
            response = gym_vllm.chat_response_to_responses(chat, {"input": "q"}, config)
            gym_vllm.chat_response_for_client(chat, {}, config)
        except ApiError as error:
            assert error.status == 502
        else:
            assert response["output"]


# --- the HTTP layer: random bodies over a real socket --------------------------------------------


@pytest.fixture(scope="module")
def live_proxy():
    """A fake upstream and the proxy, served from a background event loop for the whole module."""
    import asyncio
    import threading

    from aiohttp.test_utils import TestServer

    from conftest import FakeUpstream, server_config

    loop = asyncio.new_event_loop()
    started = threading.Event()
    servers = {}

    async def start():
        upstream = TestServer(FakeUpstream().app())
        await upstream.start_server()
        proxy = TestServer(gym_vllm.build_app(server_config(f"http://127.0.0.1:{upstream.port}/v1", return_token_id_information=True)))
        await proxy.start_server()
        servers.update(upstream=upstream, proxy=proxy)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    started.wait(10)
    yield f"http://127.0.0.1:{servers['proxy'].port}"
    for server in (servers["proxy"], servers["upstream"]):
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def http_post(url: str, data: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@settings(max_examples=300, deadline=None)
@given(requests, st.sampled_from(["/v1/responses", "/v1/chat/completions"]), st.booleans())
def test_http_fuzz_never_a_5xx_or_a_traceback(live_proxy, body, path, truncate):
    import json

    from conftest import assert_openai_error

    raw = json.dumps(body).encode()
    status, answer = http_post(live_proxy + path, raw[: len(raw) // 2] if truncate else raw)
    if status == 200:
        assert answer.get("object") in ("response", "chat.completion"), answer
    else:
        assert status < 500, answer
        assert_openai_error(status, answer)
