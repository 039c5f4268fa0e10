"""Pure conversion tests: dicts in, dicts out, no I/O (the h11 way)."""

import dataclasses
import json
import math
import os
import random
import re
import sys

import pytest
from hypothesis import given, settings, strategies as st

import gym_vllm
from gym_vllm import ApiError, ServerConfig

BASE = ServerConfig(name="policy_model", base_url=("http://u/v1",), api_key="k", model="m",
                    return_token_id_information=False, uses_reasoning_parser=True)
TRAIN = dataclasses.replace(BASE, return_token_id_information=True)
NO_PARSER = dataclasses.replace(BASE, uses_reasoning_parser=False)


def convert(request, config=BASE):
    return gym_vllm.responses_request_to_chat(request, config)


def rejects(request, param, config=BASE, status=400):
    with pytest.raises(ApiError) as info:
        convert(request, config)
    assert info.value.status == status
    assert info.value.param == param, info.value.message
    return info.value


# --- request conversion -------------------------------------------------------------------


@pytest.mark.parametrize("request_, messages", [
    ({"input": "hi"}, [{"role": "user", "content": "hi"}]),
    ({"input": "hi", "instructions": "SYS"}, [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"}]),
    ({"input": [{"role": "system", "content": "a"}, {"role": "developer", "content": [{"type": "input_text", "text": "b"}]},
                {"role": "user", "content": "q"}], "instructions": "SYS"},
     [{"role": "system", "content": "SYS\n\na\n\nb"}, {"role": "user", "content": "q"}]),
    ({"input": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}], "instructions": "SYS"},
     [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"}, {"role": "system", "content": "late"}]),
    ({"input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]},
     [{"role": "user", "content": [{"type": "text", "text": "look"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "auto"}}]}]),
    ({"input": [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}]},
     [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}]),
])
def test_messages(request_, messages):
    chat = convert(request_)
    assert chat["messages"] == messages
    assert chat["model"] == "m"


def test_multi_turn_tool_call_history_merges_assistant_side_items():
    request = {"input": [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think A"},
                                                        {"type": "summary_text", "text": "think B"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny at noon."}]},
        {"role": "user", "content": "thanks"},
    ]}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
             {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    with_parser = convert(request)["messages"]
    assert with_parser == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": calls,
         "reasoning_content": "think A\n\nthink B", "reasoning": "think A\n\nthink B"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "user", "content": "thanks"},
    ]
    # Without the parser the reasoning stays inline as <think> blocks, every one of them.
    assert convert(request, NO_PARSER)["messages"][1] == {
        "role": "assistant", "content": "<think>think A</think><think>think B</think>Let me check.", "tool_calls": calls}


def test_reasoning_only_in_content_parts_is_replayed():
    request = {"input": [{"role": "user", "content": "q"},
                         {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "R"}]},
                         {"role": "assistant", "content": "A"}]}
    assert convert(request)["messages"][1]["reasoning_content"] == "R"


def test_refusal_and_chat_shaped_items():
    request = {"input": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                         {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "out"}]}
    assert convert(request)["messages"][1:] == [
        {"role": "assistant", "content": None, "refusal": "no",
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "out"}]


def test_tools_tool_choice_and_parallel_calls():
    tools = [{"type": "function", "name": "get_weather", "description": "w", "parameters": {"type": "object"}, "strict": True},
             {"type": "function", "name": "no_strict", "parameters": {"type": "object"}},
             {"type": "function", "function": {"name": "chat_shaped"}}]
    chat = convert({"input": "q", "tools": tools, "tool_choice": {"type": "function", "name": "get_weather"},
                    "parallel_tool_calls": False})
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "no_strict", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "chat_shaped"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    for choice in ("auto", "none", "required"):
        assert convert({"input": "q", "tools": tools, "tool_choice": choice})["tool_choice"] == choice
    no_tools = convert({"input": "q", "tool_choice": "auto", "parallel_tool_calls": True})
    assert "tool_choice" not in no_tools and "parallel_tool_calls" not in no_tools and "tools" not in no_tools


@pytest.mark.parametrize("request_, param", [
    ({"input": "q", "tool_choice": "required"}, "tool_choice"),
    ({"input": "q", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"input": "q", "tools": [{"type": "function", "name": "f"}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "q", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "q", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "q", "tools": "f"}, "tools"),
    ({"input": "q", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "A", "messages": [{"role": "user", "content": "B"}]}, "messages"),  # replaced what `input` became
    ({"input": "q", "metadata": {"extra_body": '{"n": 3}'}}, "n"),  # the choices after the first were dropped
    ({"input": "q", "background": True}, "background"),
    ({"input": "q", "conversation": "c"}, "conversation"),
    ({"input": "q", "stream": "yes"}, "stream"),
    ({"input": "q", "stream": True, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"input": "q", "truncation": "auto"}, "truncation"),
    ({"input": "q", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "q", "n": 2}, "n"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [5]}, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"content": "no role or type"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"input": "q", "instructions": 3}, "instructions"),
    ({"input": "q", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "q", "max_output_tokens": "10"}, "max_output_tokens"),
    ({"input": "q", "temperature": "hot"}, "temperature"),
    ({"input": "q", "top_logprobs": 30}, "top_logprobs"),
    ({"input": "q", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "q", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "q", "reasoning": {"effort": "low", "mode": "x"}}, "reasoning.mode"),
    ({"input": "q", "metadata": {"extra_body": "{not json"}}, "metadata.extra_body"),
    ({"input": "q", "metadata": {"chat_template_kwargs": "[1]"}}, "metadata.chat_template_kwargs"),
    ({"input": "q", "chat_template_kwargs": [1]}, "chat_template_kwargs"),
])
def test_bad_requests_name_the_field(request_, param):
    error = rejects(request_, param)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_sampling_format_and_passthrough_fields():
    chat = convert({"input": "q", "max_output_tokens": 7, "temperature": 0, "top_p": 0.5, "user": "u1", "seed": 3,
                    "structured_outputs": {"regex": "a+"}, "metadata": {"k": "v"}, "store": False, "top_logprobs": 2,
                    "reasoning": {"effort": "low", "summary": "auto"}, "include": ["message.output_text.logprobs"],
                    "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}}})
    assert chat["max_tokens"] == 7 and chat["temperature"] == 0 and chat["top_p"] == 0.5 and chat["user"] == "u1"
    assert chat["seed"] == 3 and chat["structured_outputs"] == {"regex": "a+"}
    assert chat["logprobs"] is True and chat["top_logprobs"] == 2 and chat["reasoning_effort"] == "low"
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}
    for echo_only in ("metadata", "store", "include", "max_output_tokens", "reasoning", "text"):
        assert echo_only not in chat
    assert convert({"input": "q", "text": {"format": {"type": "json_object"}}})["response_format"] == {"type": "json_object"}
    assert "response_format" not in convert({"input": "q", "text": {"format": {"type": "text"}}})


def test_server_config_is_applied():
    config = dataclasses.replace(BASE, replace_developer_role_with_system=True,
                                 chat_template_kwargs={"enable_thinking": False, "a": 1},
                                 extra_body={"temperature": 0.3, "top_k": 5, "max_output_tokens": None})
    chat = convert({"input": [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}],
                    "temperature": 0.9, "chat_template_kwargs": {"a": 2, "b": 1},
                    "metadata": {"chat_template_kwargs": "{\"b\": 3}", "extra_body": "{\"min_p\": 0.1}"}}, config)
    assert chat["messages"][0] == {"role": "system", "content": "d"}
    assert chat["temperature"] == 0.9  # the request wins over extra_body
    assert chat["top_k"] == 5 and chat["min_p"] == 0.1
    assert "max_output_tokens" not in chat  # null entries of extra_body mean "unset"
    assert chat["chat_template_kwargs"] == {"enable_thinking": False, "a": 2, "b": 3}  # config < request < metadata


def test_chat_endpoint_preparation():
    body = {"model": "whatever", "messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "<think>r1</think>x<think>r2</think>y"}]}
    prepared = gym_vllm.prepare_chat_request(body, BASE)
    assert prepared["model"] == "m"
    assert prepared["messages"][1] == {"role": "assistant", "content": "xy", "reasoning_content": "r1\n\nr2", "reasoning": "r1\n\nr2"}
    assert body["messages"][1]["content"].startswith("<think>")  # the caller's dict is not mutated
    assert gym_vllm.prepare_chat_request(body, NO_PARSER)["messages"][1] == body["messages"][1]
    for bad, param in (({"messages": []}, "messages"), ({"messages": [{"content": "x"}]}, "messages[0]"),
                       ({"messages": [{"role": "user", "content": "q"}], "stream": 1}, "stream")):
        with pytest.raises(ApiError) as info:
            gym_vllm.prepare_chat_request(bad, BASE)
        assert info.value.param == param


# --- token IDs on requests ------------------------------------------------------------------

BUNDLE = {"prompt_token_ids": [1, 2], "generation_token_ids": [3, 4], "generation_log_probs": [-0.5, -0.25]}


def test_training_mode_asks_vllm_for_everything_in_one_call():
    chat = convert({"input": "q"}, TRAIN)
    assert (chat["logprobs"], chat["top_logprobs"], chat["return_tokens_as_token_ids"], chat["return_token_ids"]) == (True, 0, True, True)
    rejects({"input": "q", "n": 2}, "n", TRAIN)
    with pytest.raises(ApiError):
        gym_vllm.prepare_chat_request({"messages": [{"role": "user", "content": "q"}], "n": 2}, TRAIN)
    assert gym_vllm.prepare_chat_request({"messages": [{"role": "user", "content": "q"}], "n": 2}, BASE)["n"] == 2
    for config in (BASE, TRAIN):  # n: null is the default, 1 (it was a 400)
        assert convert({"input": "q", "n": None}, config)["model"] == config.model
        assert gym_vllm.prepare_chat_request({"messages": [{"role": "user", "content": "q"}], "n": None}, config)["n"] is None


def test_token_ids_on_input_items_ride_on_the_rebuilt_assistant_message():
    items = [{"role": "user", "content": "q"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE},
             {"type": "function_call_output", "call_id": "c", "output": "o"}]
    assistant = convert({"input": items}, TRAIN)["messages"][1]
    assert {k: assistant[k] for k in BUNDLE} == BUNDLE
    assert "prompt_token_ids" not in convert({"input": items}, BASE)["messages"][1]


@pytest.mark.parametrize("item, param", [
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "prompt_token_ids": [1]}, "input[0].generation_log_probs"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "generation_log_probs": [-1.0]}, "input[0].generation_log_probs"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "prompt_token_ids": ["x"]}, "input[0].prompt_token_ids"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "generation_token_ids": [3, True]}, "input[0].generation_token_ids"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "generation_token_ids": [3, 4.0]}, "input[0].generation_token_ids"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "generation_log_probs": [-0.5, False]}, "input[0].generation_log_probs"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", **BUNDLE, "generation_log_probs": [-0.5, "x"]}, "input[0].generation_log_probs"),
    ({"role": "user", "content": "q", **BUNDLE}, "input[0].prompt_token_ids"),
])
def test_bad_token_bundles(item, param):
    rejects({"input": [item]}, param, TRAIN)


@pytest.mark.parametrize("values, types, expected", [
    ([], gym_vllm._INTS, True), ([1, 2, 3], gym_vllm._INTS, True), ([1, True], gym_vllm._INTS, False),
    ([True, 1], gym_vllm._INTS, False), ([1, 2.0], gym_vllm._INTS, False), ([None], gym_vllm._INTS, False),
    ([-0.5, -1e-07], gym_vllm._NUMBERS, True), ([-0.5, 0, -1.5], gym_vllm._NUMBERS, True), ([0, -0.5], gym_vllm._NUMBERS, True),
    ([-0.5, False], gym_vllm._NUMBERS, False), ([-0.5, "x"], gym_vllm._NUMBERS, False), (["a", "b"], gym_vllm._STRS, True),
    (["a", b"b"], gym_vllm._STRS, False), ([{}, []], (dict,), False),
])
def test_only_checks_every_element_type(values, types, expected):
    assert gym_vllm._only(values, types) is expected


# --- the <think> parser ---------------------------------------------------------------------


@pytest.mark.parametrize("text, blocks, rest", [
    ("plain", [], "plain"),
    ("<think>r</think>answer", ["r"], "answer"),
    ("\n<think>\nr\n</think>\n\nanswer  ", ["\nr\n"], "\n\n\nanswer  "),
    ("x<think>a</think>y<think>b</think>z", ["a", "b"], "xyz"),
    ("<think>a", [], "<think>a"),
    ("</think>tail", [], "</think>tail"),
    ("<think>a<think>b</think>c</think>d", ["a<think>b"], "c</think>d"),
    ("<think></think>", [""], ""),
    ("  <think>multi\nline</think>  ", ["multi\nline"], "    "),
])
def test_think_parser(text, blocks, rest):
    assert gym_vllm.split_think_blocks(text) == (blocks, rest)


REFERENCE_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)  # the reference parser's pattern


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<think", "think>", "</", "<", ">", "a", " ", "\n", "é"]), max_size=14))
def test_think_parser_splits_like_the_reference_regex(pieces):
    text = "".join(pieces)
    assert gym_vllm.split_think_blocks(text) == (REFERENCE_THINK_BLOCK.findall(text), REFERENCE_THINK_BLOCK.sub("", text))


# --- response conversion --------------------------------------------------------------------


def completion(content="Hello", finish_reason="stop", tool_calls=None, usage=True, **message_extra):
    message = {"role": "assistant", "content": content, "tool_calls": tool_calls or [], **message_extra}
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}
    if usage:
        body["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return body


def output_types(response):
    return [item["type"] for item in response["output"]]


REQUIRED_RESPONSE_KEYS = {"id", "object", "created_at", "model", "output", "parallel_tool_calls", "tool_choice", "tools",
                          "status", "usage", "error", "incomplete_details"}


def test_plain_text_response_shape():
    request = {"input": "q", "instructions": "I", "metadata": {"k": "v"}, "temperature": 0.5, "max_output_tokens": 9}
    response = gym_vllm.chat_response_to_responses(completion(), request, BASE)
    assert REQUIRED_RESPONSE_KEYS <= set(response)
    assert re.fullmatch(r"resp_[0-9a-f]{32}", response["id"])
    assert (response["object"], response["model"], response["status"], response["created_at"]) == ("response", "m", "completed", 1700000000.0)
    assert (response["instructions"], response["metadata"], response["temperature"], response["max_output_tokens"]) == ("I", {"k": "v"}, 0.5, 9)
    assert (response["tool_choice"], response["tools"], response["parallel_tool_calls"]) == ("auto", [], True)
    [message] = response["output"]
    assert message["id"].startswith("msg_") and message["status"] == "completed" and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert response["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                 "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}


def test_reasoning_message_and_tool_calls_in_order():
    calls = [{"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
             {"id": "chatcmpl-tool-2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    response = gym_vllm.chat_response_to_responses(
        completion("<think>plan</think>Calling.<think>more</think>", "tool_calls", calls), {"input": "q"}, BASE)
    assert output_types(response) == ["reasoning", "message", "function_call", "function_call"]
    reasoning = response["output"][0]
    assert reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": "plan"}, {"type": "summary_text", "text": "more"}]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "plan"}, {"type": "reasoning_text", "text": "more"}]
    assert response["output"][1]["content"][0]["text"] == "Calling."
    assert [(c["call_id"], c["name"], c["arguments"], c["status"]) for c in response["output"][2:]] == [
        ("chatcmpl-tool-1", "f", "{\"a\":1}", "completed"), ("chatcmpl-tool-2", "g", "{}", "completed")]
    # reasoning + tool call with no text: no message item (reference parity)
    only = gym_vllm.chat_response_to_responses(completion("<think>p</think>", "tool_calls", calls[:1]), {"input": "q"}, BASE)
    assert output_types(only) == ["reasoning", "function_call"]
    # nothing at all: still an (empty) message
    empty = gym_vllm.chat_response_to_responses(completion(None), {"input": "q"}, BASE)
    assert output_types(empty) == ["message"] and empty["output"][0]["content"][0]["text"] == ""


def test_parser_off_keeps_think_text_and_rejects_upstream_reasoning():
    response = gym_vllm.chat_response_to_responses(completion("<think>r</think>a"), {"input": "q"}, NO_PARSER)
    assert output_types(response) == ["message"] and response["output"][0]["content"][0]["text"] == "<think>r</think>a"
    for field in ("reasoning_content", "reasoning"):
        with pytest.raises(ApiError) as info:
            gym_vllm.chat_response_to_responses(completion("a", **{field: "r"}), {"input": "q"}, NO_PARSER)
        assert info.value.status == 502 and "--reasoning-parser" in info.value.message and "uses_reasoning_parser: true" in info.value.message
    with_parser = gym_vllm.chat_response_to_responses(completion("<think>b</think>a", reasoning="r"), {"input": "q"}, BASE)
    assert [s["text"] for s in with_parser["output"][0]["summary"]] == ["r", "b"]


@pytest.mark.parametrize("finish_reason, status, reason", [
    ("stop", "completed", None), ("tool_calls", "completed", None),
    ("length", "incomplete", "max_output_tokens"), ("content_filter", "incomplete", "content_filter")])
def test_status_from_finish_reason(finish_reason, status, reason):
    response = gym_vllm.chat_response_to_responses(completion(finish_reason=finish_reason), {"input": "q"}, BASE)
    assert response["status"] == status
    assert response["incomplete_details"] == ({"reason": reason} if reason else None)


def test_usage_details_and_missing_usage():
    chat = completion()
    chat["usage"].update(prompt_tokens_details={"cached_tokens": 4}, completion_tokens_details={"reasoning_tokens": 2})
    usage = gym_vllm.chat_response_to_responses(chat, {"input": "q"}, BASE)["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == 4 and usage["output_tokens_details"]["reasoning_tokens"] == 2
    assert gym_vllm.chat_response_to_responses(completion(usage=False), {"input": "q"}, BASE)["usage"] is None


def test_output_text_logprobs_when_asked():
    chat = completion("ab")
    chat["choices"][0]["logprobs"] = {"content": [
        {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]},
        {"token": "b", "logprob": -0.2, "bytes": [98], "top_logprobs": []}]}
    part = gym_vllm.chat_response_to_responses(chat, {"input": "q", "top_logprobs": 1}, BASE)["output"][0]["content"][0]
    assert [(lp["token"], lp["logprob"]) for lp in part["logprobs"]] == [("a", -0.1), ("b", -0.2)]
    assert part["logprobs"][0]["top_logprobs"] == [{"token": "a", "bytes": [97], "logprob": -0.1}]
    # OpenAI's way of asking, `include`, and `top_logprobs: 0` (no alternatives): the log probs were asked of vLLM
    # (top_logprobs 0) or not at all, and the output's were empty either way
    for request in ({"input": "q", "include": ["message.output_text.logprobs"]}, {"input": "q", "top_logprobs": 0}):
        chat_body = convert(request)
        assert (chat_body["logprobs"], chat_body["top_logprobs"]) == (True, 0)
        part = gym_vllm.chat_response_to_responses(chat, request, BASE)["output"][0]["content"][0]
        assert [(lp["token"], lp["logprob"]) for lp in part["logprobs"]] == [("a", -0.1), ("b", -0.2)]
    assert "logprobs" not in convert({"input": "q"})


# --- token IDs on responses -------------------------------------------------------------------


def with_tokens(chat, ids=(5, 6), log_probs=(-0.5, -1.5), prompt=(1, 2, 3), token_ids=True):
    chat["prompt_token_ids"] = list(prompt)
    chat["choices"][0]["token_ids"] = list(ids) if token_ids else None
    chat["choices"][0]["logprobs"] = {"content": [{"token": f"token_id:{i}", "logprob": lp, "bytes": [], "top_logprobs": []}
                                                  for i, lp in zip(ids, log_probs)]}
    return chat


def test_token_ids_go_on_the_last_output_item():
    calls = [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    response = gym_vllm.chat_response_to_responses(with_tokens(completion("<think>r</think>x", "tool_calls", calls)), {"input": "q"}, TRAIN)
    last = response["output"][-1]
    assert last["type"] == "function_call"
    assert (last["prompt_token_ids"], last["generation_token_ids"], last["generation_log_probs"]) == ([1, 2, 3], [5, 6], [-0.5, -1.5])
    assert all("generation_token_ids" not in item for item in response["output"][:-1])
    # ids from the logprob tokens alone when vLLM did not send token_ids
    alone = gym_vllm.extract_token_info(with_tokens(completion(), token_ids=False))
    assert alone["generation_token_ids"] == [5, 6]


def test_token_bundle_already_on_the_message_is_used():
    chat = completion(**BUNDLE)
    assert gym_vllm.extract_token_info(chat) == BUNDLE


@pytest.mark.parametrize("mutate, code", [
    (lambda c: c["choices"][0].update(token_ids=[5, 7]), "token_ids_mismatch"),
    (lambda c: c["choices"][0]["logprobs"]["content"].pop(), "token_ids_mismatch"),
    (lambda c: c["choices"][0].update(logprobs=None), "token_ids_missing"),
    (lambda c: c.update(prompt_token_ids=None), "token_ids_missing"),
    (lambda c: c.update(choices=[]), "upstream_error"),
])
def test_inconsistent_token_data_is_a_502(mutate, code):
    chat = with_tokens(completion())
    mutate(chat)
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_to_responses(chat, {"input": "q"}, TRAIN)
    assert (info.value.status, info.value.code) == (502, code)


@pytest.mark.parametrize("tokens", [["token_id:5", "token_id:06"], ["token_id:5", "token_id:+6"], ["token_id:5", "token_id: 6"]])
def test_token_ids_spelled_unusually_in_logprob_tokens_still_agree(tokens):
    chat = with_tokens(completion())
    for entry, token in zip(chat["choices"][0]["logprobs"]["content"], tokens):
        entry["token"] = token
    assert gym_vllm.extract_token_info(chat)["generation_token_ids"] == [5, 6]


token_texts = st.one_of(st.integers(0, 200).map("token_id:{}".format), st.sampled_from(["token_id:1,token_id:2", "", ",", "token_id:"]),
                        st.text(max_size=4))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), st.lists(st.integers(0, 200), max_size=5)), st.lists(token_texts, max_size=5))
def test_logprob_token_spelling_check_is_exact(ids, tokens):
    expected = ids is not None and tokens == [f"token_id:{i}" for i in ids]
    assert gym_vllm._spelled_as_logprob_tokens(ids, tokens) == expected


def vllm_reply(**changes):
    """A vLLM 0.32-shaped token-ID reply: reasoning in the text, a tool call, log-prob entries with bytes."""
    chat = with_tokens(completion("<think>r</think>x", "tool_calls",
                                  [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]))
    for entry in chat["choices"][0]["logprobs"]["content"]:
        entry.update(bytes=[120, 121], top_logprobs=[])
    chat.update(service_tier=None, prompt_logprobs=None, kv_transfer_params=None)
    chat["choices"][0].update(stop_reason=None)
    for path, value in changes.items():  # "choices.0.logprobs": value
        *parents, key = path.split(".")
        node = chat
        for part in parents:
            node = node[int(part) if part.isdigit() else part]
        node[int(key) if key.isdigit() else key] = value
    return chat


@pytest.mark.parametrize("token", ["token_id: 5", "token_id:1_0", "token_id:\u0663", "token_id:+5", "token_id:5 "])
def test_only_token_ids_as_vllm_spells_them_stand_for_ids(token):
    """Without vLLM's token_ids, ids come from `token_id:<n>` log-prob tokens, ASCII digits only: int() also read
    " 5", "1_0" and "٣" (Arabic-Indic 3), so a text token could pass for an id."""
    chat = with_tokens(completion("x"), ids=(5,), log_probs=(-0.5,), token_ids=False)
    chat["choices"][0]["logprobs"]["content"][0]["token"] = token
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_to_responses(chat, {"input": "q"}, TRAIN)
    assert info.value.code == "token_ids_missing"
    chat["choices"][0]["logprobs"]["content"][0]["token"] = "token_id:5"
    assert gym_vllm.chat_response_to_responses(chat, {"input": "q"}, TRAIN)["output"][-1]["generation_token_ids"] == [5]


@pytest.mark.parametrize("config", [BASE, TRAIN], ids=["plain", "token-ids"])
@pytest.mark.parametrize("changes", [
    {}, {"choices": None}, {"choices": [5]}, {"choices": []}, {"choices.0.logprobs": "x"}, {"choices.0.logprobs.content": [5]},
    {"choices.0.logprobs.content": None}, {"choices.0.logprobs": None}, {"choices.0.token_ids": ["a", "b"]},
    {"choices.0.token_ids": [5, 7]}, {"choices.0.message": None}, {"choices.0.message.content": 5}, {"usage": 5},
    {"prompt_token_ids": None}, {"prompt_token_ids": [1, True]}, {"prompt_token_ids": [1.0]}, {"prompt_token_ids": "1"},
    {"prompt_token_ids": [-1, 2**70]}, {"choices.0.logprobs.content.0.logprob": "x"}, {"created": "soon"}, {"created": 10**309},
    {"choices.0.finish_reason": ["length"]},
], ids=lambda changes: ",".join(changes) or "as-vllm-sends-it")
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")], ids=["compact", "spaced"])
def test_decoding_only_what_a_response_reads_converts_the_same(config, changes, separators):
    """The same answer, byte for byte, or the same error, whether vLLM's reply is decoded in full or only as far as a
    Response reads it (prompt ids kept as their text where that text is compact)."""
    raw = json.dumps(vllm_reply(**changes), separators=separators).encode()

    def convert(chat):
        gym_vllm._random_hex.clear()  # the same item ids on both sides
        random.seed(7)
        try:
            return gym_vllm.response_json(gym_vllm.chat_response_to_responses(chat, {"input": "q"}, config))
        except ApiError as exc:
            return exc.status, exc.code, exc.message

    assert convert(gym_vllm._loads(raw, gym_vllm.CompletionForResponse)) == convert(gym_vllm._loads(raw))


@pytest.mark.parametrize("created", ["soon", True, 10**309, -10**309, math.inf, math.nan], ids=repr)
def test_a_created_that_is_not_a_finite_number_is_a_502_not_an_internal_error(created):
    """An int too big for a float was an OverflowError (a 500); an infinity or NaN was written as Infinity or NaN."""
    for convert in (gym_vllm.chat_response_to_responses, gym_vllm.chat_response_for_client):
        with pytest.raises(ApiError) as info:
            convert(vllm_reply(created=created), {"input": "q"}, BASE)
        assert (info.value.status, info.value.message) == (
            502, "vLLM returned a malformed chat completion: `created` should be a finite number or null")
    largest = int(sys.float_info.max)  # the largest float, as an int: compared exactly, it is in range
    assert gym_vllm.chat_response_to_responses(vllm_reply(created=largest), {"input": "q"}, BASE)["created_at"] == float(largest)


def test_a_finish_reason_that_is_not_a_string_is_a_502_not_an_internal_error():
    with pytest.raises(ApiError) as info:  # it was a TypeError (unhashable list), a 500
        gym_vllm.chat_response_to_responses(vllm_reply(**{"choices.0.finish_reason": ["length"]}), {"input": "q"}, BASE)
    assert (info.value.status, info.value.message) == (
        502, "vLLM returned a malformed chat completion: `choices[0].finish_reason` should be a string or null")


def test_ids_are_unique_and_a_forked_child_draws_its_own():
    ids = [gym_vllm._new_id("msg") for _ in range(1000)]  # several blocks of 128
    assert len(set(ids)) == 1000 and all(re.fullmatch(r"msg_[0-9a-f]{32}", i) for i in ids)
    gym_vllm._new_id("msg")  # the parent holds a part-used block when it forks
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        os.write(write_end, " ".join(gym_vllm._new_id("msg") for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        child_ids = set(pipe.read().split())
    parent_ids = {gym_vllm._new_id("msg") for _ in range(5)}
    assert len(child_ids) == 5 and not child_ids & parent_ids


def test_chat_endpoint_response_postprocessing():
    chat = with_tokens(completion("x", reasoning_content="r"))
    out = gym_vllm.chat_response_for_client(chat, {"messages": []}, TRAIN)
    message = out["choices"][0]["message"]
    assert message["content"] == "<think>r</think>x" and "reasoning_content" not in message
    assert (message["prompt_token_ids"], message["generation_token_ids"], message["generation_log_probs"]) == ([1, 2, 3], [5, 6], [-0.5, -1.5])
    assert out["choices"][0]["logprobs"] is None and "token_ids" not in out["choices"][0] and "prompt_token_ids" not in out
    kept = gym_vllm.chat_response_for_client(with_tokens(completion("x")), {"logprobs": True}, TRAIN)
    assert kept["choices"][0]["logprobs"] is not None  # the client asked for them itself
    plain = gym_vllm.chat_response_for_client(completion("<think>r</think>x"), {}, BASE)
    assert plain["choices"][0]["message"]["content"] == "<think>r</think>x"
    with pytest.raises(ApiError):
        gym_vllm.chat_response_for_client(completion("x", reasoning="r"), {}, NO_PARSER)


def test_chat_endpoint_rewraps_the_reasoning_of_every_choice():
    """n > 1: choices[1:] kept vLLM's reasoning fields, unlike the first (and a parser mismatch went unnoticed)."""
    chat = completion("x", reasoning_content="r")
    second = completion("y", reasoning="s")["choices"][0]
    chat["choices"] += [{**second, "index": 1}, {"index": 2, "message": {"role": "assistant", "content": "z"}}]
    out = gym_vllm.chat_response_for_client(chat, {"messages": [], "n": 3}, BASE)
    assert [c["message"]["content"] for c in out["choices"]] == ["<think>r</think>x", "<think>s</think>y", "z"]
    assert out["choices"][2] is chat["choices"][2] and "reasoning" not in out["choices"][1]["message"]
    chat["choices"][1]["message"]["reasoning"] = ["s"]
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_for_client(chat, {}, BASE)
    assert "`choices[1].message.reasoning` should be a string or null" in info.value.message
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_for_client({**completion("x"), "choices": [completion("x")["choices"][0],
                                                                          completion("y", reasoning="s")["choices"][0]]}, {}, NO_PARSER)
    assert info.value.code == "reasoning_parser_mismatch"


def test_chat_endpoint_checks_the_token_ids_it_reads_and_relays_the_ones_it_does_not():
    """With token IDs off, vLLM's own id fields (a client's `return_token_ids`) are not read: relayed as vLLM wrote
    them, as a direct connection would give them. With token IDs on they are read, so checked: a 502."""
    chat = with_tokens(completion("x"))
    chat["choices"][0]["token_ids"] = chat["prompt_token_ids"] = "not ids"
    relayed = gym_vllm.chat_response_for_client(chat, {}, BASE)
    assert relayed["choices"][0]["token_ids"] == relayed["prompt_token_ids"] == "not ids"
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_for_client(chat, {}, TRAIN)
    assert info.value.status == 502 and "choices[0].token_ids" in info.value.message


# --- context length -------------------------------------------------------------------------


@pytest.mark.parametrize("message, overflow", [
    ("This model's maximum context length is 1024 tokens. However, your prompt contains at least 1025 input tokens, "
     "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
     "(parameter=input_tokens, value=1025)", True),
    ("This model's maximum context length is 1024 tokens. However, your prompt contains 200050 characters (more than "
     "16384 characters, which is the upper bound for 1024 input tokens). (parameter=input_text, value=200050)", True),
    ("max_tokens=2000 cannot be greater than max_model_len=1024. Please request fewer output tokens.", True),
    ("max_tokens=100000 cannot be greater than max_model_len=max_total_tokens=4096. Please request fewer output tokens.", True),
    ("max_tokens must be at least 1, got 0.", False),  # mentions max_tokens but is a real client error
    ("n must be 1 when using greedy sampling, got 2.", False),
])
def test_context_overflow_detection(message, overflow):
    assert gym_vllm.is_context_overflow(400, message) is overflow
    assert gym_vllm.is_context_overflow(500, message) is False


def test_context_overflow_reply():
    response = gym_vllm.context_overflow_response({"input": "q", "max_output_tokens": 5}, BASE)
    assert REQUIRED_RESPONSE_KEYS <= set(response)
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert output_types(response) == ["message"] and response["output"][0]["content"][0]["text"] == ""
    chat = gym_vllm.context_overflow_chat_response(BASE)
    assert chat["choices"][0]["finish_reason"] == "length" and chat["choices"][0]["message"]["content"] is None


# --- backends ---------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_session_table_is_bounded_lru():
    table = gym_vllm.SessionTable(max_entries=3, idle_timeout_s=100, clock=Clock())
    for i in range(10):
        table.set(f"s{i}", i)
        assert len(table) <= 3
    assert [table.get(f"s{i}") for i in range(10)] == [None] * 7 + [7, 8, 9]
    table.get("s7")  # touch: s8 becomes the oldest
    table.set("s10", 10)
    assert table.get("s8") is None and table.get("s7") == 7


def test_session_table_idle_expiry():
    clock = Clock()
    table = gym_vllm.SessionTable(max_entries=100, idle_timeout_s=10, clock=clock)
    table.set("old", 0)
    clock.now = 5
    table.set("young", 1)
    clock.now = 12
    assert table.get("old") is None and table.get("young") == 1
    clock.now = 30
    table.set("new", 2)  # setting sweeps idle entries from the front
    assert len(table) == 1


def test_balancer_round_robin_with_affinity():
    balancer = gym_vllm.Balancer(["http://a/v1", "http://b/v1", "http://c/v1"], gym_vllm.SessionTable(10, 100))
    first = [balancer.upstream_for(f"s{i}").base_url for i in range(6)]
    assert first == ["http://a/v1", "http://b/v1", "http://c/v1"] * 2
    assert [balancer.upstream_for(f"s{i}").base_url for i in range(6)] == first  # sessions keep their upstream
    single = gym_vllm.Balancer(["http://a/v1"], gym_vllm.SessionTable(10, 100))
    assert single.upstream_for("x").root_url == "http://a"
    assert len(single.sessions) == 0  # one upstream: no table work at all


@pytest.mark.parametrize("top", [[1, 2], "x", [{"token": "a"}, 3]])
def test_malformed_top_logprobs_are_a_502(top):
    """A client that asked for top_logprobs gets them from vLLM's entries: entries of another shape are vLLM's fault,
    a 502, never a 500."""
    chat = completion("x")
    chat["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": top}]}
    with pytest.raises(ApiError) as info:
        gym_vllm.chat_response_to_responses(chat, {"input": "q", "top_logprobs": 2}, BASE)
    assert info.value.status == 502 and "logprobs.content" in info.value.message
