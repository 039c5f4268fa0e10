"""The optional speed-ups: msgspec for JSON decoding and uvloop, each identical in effect to the stdlib path."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import subprocess
import sys
import typing

import pytest
from hypothesis import given, settings, strategies as st

import gym_vllm
from conftest import REPO

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)


def finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(finite, value.values()))
    return all(map(finite, value)) if isinstance(value, list) else True


def json_loads(raw):
    """json.loads as the proxy must read JSON, both codecs: bytes decoded as strict UTF-8 (json.loads' surrogatepass
    makes lone surrogates of invalid UTF-8), and no NaN or infinity (not JSON; a reply would carry them on)."""
    value = json.loads(raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw)
    if not finite(value):
        raise ValueError("not a finite number")
    return value


def same(a, b) -> bool:
    """Equal, and with the same types and key order (1 == 1.0 == True would hide a difference)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outcome(loads, raw: bytes):
    try:
        return "ok", loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "error", None


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing to compare")
@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([{}, {"ensure_ascii": False}, {"indent": 1}]))
def test_fast_decoding_gives_what_json_gives(value, options):
    raw = json.dumps(value, **options).encode()
    (kind, value), (want_kind, want) = outcome(gym_vllm._loads, raw), outcome(json_loads, raw)
    assert kind == want_kind and (kind == "error" or same(value, want))  # an infinity (written Infinity) is refused


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing to compare")
@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity, -Infinity]", b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b'{"a":1,"a":2}',
                                 '{"k": "ü"}'.encode("utf-16"), b"123456789012345678901234567890", b"-0.0", b"[1,]",
                                 b'"a\nb"', b"\xff", b"", b"{} x", b" {\"a\": [1.5e-7]} \n"])
def test_fast_decoding_agrees_with_json_on_edge_cases(raw):
    (kind, value), (want_kind, want) = outcome(gym_vllm._loads, raw), outcome(json_loads, raw)
    assert kind == want_kind and (kind == "error" or same(value, want))


REPLY_WITH_INVALID_UTF8 = b'{"created":1,"choices":[{"message":{"content":"ok \xff"},"finish_reason":"stop"}]}'


@pytest.mark.parametrize("raw, schema", [(b'{"input":"caf\xe9"}', None), (b'{"k\xff":1}', None), (b'["ok", "\xed\xa0\x80"]', None),
                                         (REPLY_WITH_INVALID_UTF8, None), (REPLY_WITH_INVALID_UTF8, "CompletionForResponse")])
def test_invalid_utf8_in_a_string_is_reported_as_json_reports_it(raw, schema):
    """At its place in the body, both codecs: msgspec raises its own UnicodeDecodeError for a string's invalid UTF-8,
    naming its place in the string (a client's 400 said `position 3` there, `position 13` without msgspec). With a
    schema, in a field it reads (what it skips is checked only as JSON syntax: above)."""
    with pytest.raises(UnicodeDecodeError) as expected:
        raw.decode("utf-8")
    with pytest.raises(UnicodeDecodeError) as got:
        gym_vllm._loads(raw, getattr(gym_vllm, schema) if schema else None, sendable=True)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("literal", [b"1" + b"0" * 210 + b"e99", b"-1" + b"0" * 300 + b".5e9", b"-" + b"9" * 250 + b"e60"])
def test_every_float_literal_too_large_for_a_double_is_refused(literal):
    """Not only those with a 3-digit exponent or 309 digits: 1, 210 zeros and e99 is 1e309, which json read as an
    infinity, sent on as `Infinity` (a request's temperature to vLLM, a log prob to the client), which is not JSON."""
    with pytest.raises(ValueError, match="too large for a float"):
        gym_vllm._loads(b'{"temperature": %b}' % literal)
    assert gym_vllm._loads(b"[1%be99]" % (b"0" * 209)) == [1e308]  # one digit fewer: a double


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-be"])
def test_a_lone_surrogate_escape_is_found_in_any_encoding_json_reads(encoding):
    """A UTF-16 or UTF-32 body (json reads them) spells `\\ud800` in bytes the UTF-8 search missed: it went on to
    be written for vLLM, a UnicodeEncodeError, a 500 where a UTF-8 body gets the 400."""
    raw = '{"input": "\\ud800"}'.encode(encoding)
    with pytest.raises(gym_vllm.LoneSurrogate):
        gym_vllm._loads(raw, sendable=True)
    assert gym_vllm._loads('{"input": "\\ud83d\\ude00"}'.encode(encoding), sendable=True) == {"input": "\U0001f600"}


@given(st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_fast_decoding_accepts_and_rejects_what_json_does(raw):
    (kind, value), (want_kind, want) = outcome(gym_vllm._loads, raw), outcome(json_loads, raw)
    assert kind == want_kind and (kind == "error" or same(value, want))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_encoding_writes_what_json_dumps_writes(value):
    assert gym_vllm._dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_encoding_without_the_c_accelerator_writes_the_same(value):
    original = json.encoder.c_make_encoder
    json.encoder.c_make_encoder = None  # as on a Python built without _json, while the fallback encodes too
    try:
        encoded = gym_vllm._json_encoder()(value)
    finally:
        json.encoder.c_make_encoder = original
    assert encoded == gym_vllm._dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing is skipped")
def test_schema_decoding_builds_only_what_the_schema_names():
    reply = {"id": "c", "created": 1, "choices": [{"index": 0, "message": {"content": "x", "extra": [1]}, "finish_reason": "length",
             "token_ids": [5], "logprobs": {"content": [{"token": "token_id:5", "logprob": -0.5, "bytes": [120],
                                                         "top_logprobs": []}]}}], "usage": None, "prompt_token_ids": [1]}
    lean = gym_vllm._loads(json.dumps(reply).encode(), gym_vllm.CompletionForResponse)
    text = gym_vllm._msgspec.Raw  # the token ids are kept as their text
    assert lean == {"created": 1, "choices": [{"message": {"content": "x", "extra": [1]}, "finish_reason": "length",
                                              "token_ids": text(b"[5]"),
                                              "logprobs": {"content": [gym_vllm._LogprobRead("token_id:5", -0.5)]}}],
                    "usage": None, "prompt_token_ids": text(b"[1]")}
    for other_shape in (b'{"choices": 5, "x": 1}', b'{"choices": [{"logprobs": {"content": [1]}}]}', b'[1]', b'{"created": NaN}'):
        assert outcome(lambda raw: gym_vllm._loads(raw, gym_vllm.CompletionForResponse), other_shape) == outcome(json_loads, other_shape)


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing is kept as text")
@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(st.integers(0, 2**70), max_size=8), st.lists(st.integers(-3, 3) | st.booleans(), max_size=4),
                 st.lists(st.floats(-2, 2) | st.text(max_size=2), max_size=3), st.none() | st.text(max_size=3) | st.integers()),
       st.sampled_from([(",", ":"), (", ", ": "), (" ,", ":")]))
def test_prompt_ids_kept_as_text_are_checked_and_written_as_json_writes_them(ids, separators):
    """A reply's prompt ids stay their JSON text only where it is exactly json's text of a list of ints (`[1,22]`);
    any other text (spaces, a sign: `-0` is json's `0`) is decoded, and anything but a list of ints is a 502."""
    raw = json.dumps({"prompt_token_ids": ids}, separators=separators).encode()
    kept = gym_vllm._loads(raw, gym_vllm.CompletionForResponse)["prompt_token_ids"]
    assert isinstance(kept, gym_vllm._msgspec.Raw)
    if ids is None:
        assert kept in gym_vllm._NULLS
        return
    if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
        with pytest.raises(gym_vllm.ApiError, match="`prompt_token_ids` should be a list of integers"):
            gym_vllm._token_ids(kept, "prompt_token_ids")
        return
    checked = gym_vllm._token_ids(kept, "prompt_token_ids")
    compact = json.dumps(ids, separators=(",", ":")).encode()
    assert (checked is kept) == (bytes(kept) == compact and b"-" not in compact)
    assert gym_vllm._msgspec_encode({"ids": checked}) == b'{"ids":' + compact + b"}"
    assert gym_vllm._token_ids(ids, "prompt_token_ids") == ids and gym_vllm._token_ids(ids, "prompt_token_ids") is not ids  # a list: checked, copied


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing is kept as text")
def test_generated_ids_kept_as_text_are_counted_and_compared_as_ints():
    text = gym_vllm._msgspec.Raw
    assert [gym_vllm._id_count(text(t)) for t in (b"[]", b"[5]", b"[5,61]")] == [0, 1, 2]
    # Log-prob tokens that name the same ids in another spelling: not vLLM's, but the same ids, so no mismatch.
    reply = {"created": 1, "choices": [{"message": {"content": "x"}, "finish_reason": "stop", "token_ids": [5, 61],
             "logprobs": {"content": [{"token": "token_id:05", "logprob": -0.5}, {"token": "token_id:61", "logprob": -1.0}]}}],
             "prompt_token_ids": [1]}
    chat = gym_vllm._loads(json.dumps(reply, separators=(",", ":")).encode(), gym_vllm.CompletionForResponse)
    assert isinstance(chat["choices"][0]["token_ids"], text)
    assert gym_vllm.extract_token_info(chat)["generation_token_ids"] == [5, 61]


@pytest.mark.parametrize("text", [b"[-0]", b"[1e400]", b"[1.5]", b"[[1]]", b'["1"]', b"[true]", b"{}", b'"x"', b"1"])
def test_prompt_ids_text_of_another_kind_is_decoded_and_refused_or_respelled(text):
    kept = gym_vllm._JsonText(text) if gym_vllm._msgspec else json.loads(text)
    if text == b"[-0]":
        assert gym_vllm._token_ids(kept, "prompt_token_ids") == [0]  # json writes 0, as the decoded int
        return
    with pytest.raises(gym_vllm.ApiError, match="`prompt_token_ids` should be a list of integers"):
        gym_vllm._token_ids(kept, "prompt_token_ids")


# Floats of every spelling: exponent forms both ways, the -5 exponent msgspec writes as 0.0000…, NaN and infinities.
any_number = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.floats(1e-9, 1e-3).map(lambda x: -x),
                       st.floats(1e15, 1e17), st.sampled_from([1e-05, -1.2e-05, 9.99e-05, 1e-07, 1e16, 0.0, -0.0]))
any_json = st.recursive(st.none() | st.booleans() | any_number | st.text(max_size=6),
                        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
                        max_leaves=12)


def numbers_as_json(values) -> bytes:
    return json.dumps(values, separators=(",", ":")).encode()


@settings(max_examples=1000, deadline=None)
@given(st.lists(any_number, max_size=12))
def test_number_lists_are_written_as_json_writes_them(values):
    assert gym_vllm._number_list_json(values) == numbers_as_json(values)


@pytest.mark.parametrize("value", [1e16, 1.5e16, 1e22, 1.7976931348623157e308, 1e-05, -1.2345e-05, 9.999999999999999e-05,
                                   -1.1920928955078125e-07, 1e-07, 1e-10, 5e-324, 0.0001, 123.00001, 10.00001, -0.0,
                                   float("inf"), float("nan"), 2**64, -7])
def test_number_lists_in_every_float_spelling(value):
    for values in ([value], [-0.5, value, 3], [value, value]):
        assert gym_vllm._number_list_json(values) == numbers_as_json(values)


@st.composite
def converted_responses(draw):
    """(vLLM reply, request, config) for chat_response_to_responses: any reply, any echoed request parameters."""
    content = draw(st.sampled_from(["", "x", "<think>r</think>x", "<think>a\"\\b</think>\n"])) + draw(st.text(max_size=12))
    calls = draw(st.lists(st.fixed_dictionaries({"id": st.text(max_size=4), "type": st.just("function"), "function":
                 st.fixed_dictionaries({"name": st.text(max_size=4), "arguments": st.text(max_size=8)})}), max_size=2))
    ids = draw(st.lists(st.integers(0, 2**70), max_size=6))
    entries = [{"token": f"token_id:{i}", "logprob": draw(any_number), "bytes": [1],
                "top_logprobs": [{"token": "t", "logprob": draw(any_number), "bytes": []}]} for i in ids]
    chat = {"created": draw(st.one_of(st.integers(0, 2**40), st.floats(0.5, 1e20))),
            "choices": [{"message": {"content": content, "tool_calls": calls, "refusal": draw(st.none() | st.text(max_size=4))},
                         "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls"])),
                         "logprobs": {"content": entries}, "token_ids": ids}],
            "usage": draw(st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)})),
            "prompt_token_ids": draw(st.lists(st.integers(0, 2**70), max_size=4))}
    echoed = st.sampled_from(["instructions", "metadata", "tool_choice", "tools", "temperature", "top_p", "max_output_tokens",
                              "top_logprobs", "reasoning", "text", "truncation", "user", "parallel_tool_calls"])
    request = {"input": "q", **draw(st.dictionaries(echoed, any_json, max_size=6))}
    return chat, request, dataclasses.replace(CONFIG, return_token_id_information=draw(st.booleans()))


CONFIG = gym_vllm.server_config_from_dict("s", {"base_url": "http://u/v1", "api_key": "k", "model": "m", "return_token_id_information": False,
                                               "uses_reasoning_parser": True})


@settings(max_examples=500, deadline=None)
@given(converted_responses())
def test_responses_are_written_as_json_writes_them(conversion):
    response = gym_vllm.chat_response_to_responses(*conversion)
    assert gym_vllm.response_json(response) == gym_vllm._dumps(response).encode()


@settings(max_examples=500, deadline=None)
@given(converted_responses(), st.sampled_from([(",", ":"), (", ", ": ")]), st.sampled_from(["same", "other", "none"]))
def test_replies_decoded_as_a_response_reads_them_give_the_same_bytes(conversion, separators, tokens):
    """vLLM's reply as JSON (compact, as vLLM writes it, or spaced), decoded in full or only as far as a Response reads
    it (token ids kept as their text): the same Response, byte for byte, or the same error. `tokens`: the log-prob
    tokens spell the ids (vLLM's case), spell other ids, or are not ids at all."""
    chat, request, config = conversion
    chat["created"] = chat["created"] or 1  # 0: the time of the conversion
    choice = chat["choices"][0]
    for entry, token_id in zip(choice["logprobs"]["content"], choice["token_ids"]):
        entry["token"] = {"same": f"token_id:{token_id}", "other": f"token_id:{token_id + 1}", "none": "x"}[tokens]
    raw = json.dumps(chat, separators=separators).encode()

    def written(decode):
        gym_vllm._random_hex.clear()  # the same item ids on both sides
        random.seed(7)
        try:
            return gym_vllm.response_json(gym_vllm.chat_response_to_responses(decode(raw), request, config))
        except gym_vllm.ApiError as exc:
            return exc.status, exc.code, exc.message
        except ValueError:  # not JSON (NaN, an infinity): the handler's 502
            return "not JSON"

    schema = None if gym_vllm.wants_output_logprobs(request) else gym_vllm.CompletionForResponse  # as handle_responses asks
    assert written(lambda raw: gym_vllm._loads(raw, schema)) == written(json_loads)


messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]), "content": st.text(max_size=12)},
                          optional={"name": st.text(max_size=4), "n": any_number, "reasoning": st.none() | st.text(max_size=4)}),
    st.dictionaries(st.text(max_size=6), any_json, max_size=4)), max_size=5)


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries({"messages": messages}, optional={"model": st.text(max_size=4), "temperature": any_number,
                                                             "max_tokens": st.integers(), "tools": any_json, "seed": any_json}))
def test_request_bodies_are_written_as_json_writes_them(body):
    assert gym_vllm.request_json(body) == gym_vllm._dumps(body).encode()


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing to compare")
@settings(max_examples=1000, deadline=None)
@given(any_json)
def test_values_are_written_as_json_writes_them(value):
    assert gym_vllm._msgspec_encode(gym_vllm._exact(value)) == gym_vllm._dumps(value).encode()


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing to compare")
@pytest.mark.parametrize("value", [
    [1e-07], {"a": [1, 1e16]}, {"minimum": 1e-05}, [-1.2e-05, 0.5], [float("nan")], {"x": float("inf")}, [1e22, -0.0],
    {"alike": [0.5, 2, 0.0001, 123.25, 1e15], "text": "1e-5, null, 0.00001, e-mail"}, [None], [2**70, -0.0],
    [[1e-07, 2], [], [1e16, [0.00001]]], 1e-07, -1.2e-05, 1e16, float("-inf"), [True, 1e-07], [1e-07, "1e-7"],
    [1e-07, {}], [0.5, None], ["e-1"], [1, 2, 3], [False, [1e16, True], 1e-07], [{}, [], 0.00001, None, 1e-07]])
def test_values_in_every_float_spelling(value):
    assert gym_vllm._msgspec_encode(gym_vllm._exact(value)) == gym_vllm._dumps(value).encode()


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing to compare")
def test_tool_definitions_and_token_histories_are_written_without_json(monkeypatch):
    """The two large parts of a request body that json used to write: tool definitions, and the token ids and log
    probs of earlier turns (NeMo RL sends them back every turn: 3.7x fewer instructions for four turns of 256 tokens)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "e.g. Paris", "maxLength": 80}},
        "required": ["city"]}}}]
    turn = {"role": "assistant", "content": "4", "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5, 6, 7],
            "generation_log_probs": [-1.1920928955078125e-07, -1.2e-05, -0.25, 0]}
    body = {"messages": [{"role": "user", "content": "2+2?"}, turn], "model": "m", "tools": tools, "temperature": 0.7}
    expected = gym_vllm._dumps(body).encode()
    monkeypatch.setattr(gym_vllm, "_dumps", None)  # json would fail: msgspec alone writes them
    assert gym_vllm.request_json(body) == expected


def test_converted_request_bodies_are_written_as_json_writes_them():
    history = [{"type": "message", "role": "user", "content": "q é \u2028 \"x\""},
               {"type": "reasoning", "summary": [{"type": "summary_text", "text": "r"}],
                "prompt_token_ids": [1], "generation_token_ids": [2, 3], "generation_log_probs": [-1e-07, -0.25]},
               {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c", "output": "4"}]
    request = {"input": history, "instructions": "be brief", "temperature": 1e-05, "top_p": 0.9, "seed": 3,
               "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "minimum": 1e16}}]}
    body = gym_vllm.responses_request_to_chat(request, dataclasses.replace(CONFIG, return_token_id_information=True))
    assert gym_vllm.request_json(body) == gym_vllm._dumps(body).encode()


def test_an_overflow_response_is_written_as_json_writes_it():
    response = gym_vllm.context_overflow_response({"input": "q", "temperature": 1e-05}, CONFIG)
    assert gym_vllm.response_json(response) == gym_vllm._dumps(response).encode()


def test_responses_without_msgspec_are_written_by_json():
    code = ("import gym_vllm; r = gym_vllm.context_overflow_response({'input': 'q', 'top_p': 1e16}, gym_vllm.server_config_from_dict("
            "'s', {'base_url': 'http://u/v1', 'api_key': 'k', 'model': 'm', 'return_token_id_information': False, 'uses_reasoning_parser': True})); "
            "print(gym_vllm.JSON_CODEC, gym_vllm.response_json(r) == gym_vllm._dumps(r).encode(), b'1e+16' in gym_vllm.response_json(r))")
    assert run_python(code, GYM_VLLM_JSON="stdlib").stdout.split() == ["json", "True", "True"]


def test_schema_types_resolve_without_the_module_namespace():
    """msgspec resolves string annotations in sys.modules[__module__]; under `python -m cProfile -m gym_vllm` that is
    cProfile's module, and every token-ID request was a 500 (NameError). The schema's types must be objects."""
    def names_to_resolve(annotation):
        if isinstance(annotation, (str, typing.ForwardRef)):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from names_to_resolve(arg)

    log_prob_entry = (gym_vllm._LogprobRead,) if gym_vllm.JSON_CODEC == "msgspec" else ()  # a Struct: needs msgspec
    for schema in (gym_vllm.CompletionForResponse, gym_vllm._ChoiceRead, gym_vllm._LogprobsRead, *log_prob_entry):
        assert schema.__annotations__ and not [name for annotation in schema.__annotations__.values()
                                               for name in names_to_resolve(annotation)], schema


def test_schema_decoding_without_msgspec_decodes_everything():
    code = ("import gym_vllm; print(gym_vllm._loads(b'{\"choices\": [{\"index\": 0}], \"x\": 1}', gym_vllm.CompletionForResponse))")
    assert run_python(code, GYM_VLLM_JSON="stdlib").stdout.strip() == "{'choices': [{'index': 0}], 'x': 1}"


def stdlib_decoder(monkeypatch) -> typing.Callable:
    """`_loads` as built without msgspec."""
    monkeypatch.setattr(gym_vllm, "_msgspec", None)
    return gym_vllm._json_decoder()


def sendable_outcome(loads, raw: bytes):
    try:
        return "ok", loads(raw, sendable=True)
    except gym_vllm.LoneSurrogate:
        return "lone surrogate", None


def utf8_encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


surrogate_texts = st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010) | st.sampled_from("a\\\"é😀"),
                          max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(surrogate_texts, max_size=3))
def test_client_text_with_a_lone_surrogate_is_refused_by_both_decoders(texts):
    """Only json makes a str with a lone surrogate (msgspec refuses the escape), so the sendable check runs only after
    json: either way, a value holding one is refused and every other value decodes as json decodes it."""
    raw = json.dumps({"input": texts}).encode()  # a lone surrogate is written as its escape, a pair as two escapes
    want = json.loads(raw)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for loads in (gym_vllm._loads, stdlib_decoder(monkeypatch)):
            kind, value = sendable_outcome(loads, raw)
            assert kind == ("ok" if utf8_encodable(want) else "lone surrogate")
            assert kind != "ok" or same(value, want)


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed")
@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"a\\udfffb"', b'["\\ud83d", "\\ude00"]', b'"\\ude00\\ud83d"',
                                 b'"\\ud83d\\u0041"', b'{"\\uDC00": 1}'])
def test_msgspec_refuses_lone_surrogate_escapes(raw):
    """What lets `_loads(raw, sendable=True)` skip the search after msgspec: it never makes such a str."""
    with pytest.raises(gym_vllm._msgspec.DecodeError):
        gym_vllm._msgspec.json.decode(raw)
    with pytest.raises(gym_vllm.LoneSurrogate):
        gym_vllm._loads(raw, sendable=True)
    assert not utf8_encodable(json.loads(raw))


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_nesting_too_deep_is_bad_json_not_a_crash(raw):
    with pytest.raises(ValueError, match="nested too deeply"):
        gym_vllm._loads(raw)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env})


def test_stdlib_json_can_be_chosen():
    assert run_python("import gym_vllm; print(gym_vllm.JSON_CODEC)", GYM_VLLM_JSON="stdlib").stdout.strip() == "json"


def test_event_loop_choice():
    code = ("import asyncio, gym_vllm\n"
            "async def kind(): return type(asyncio.get_running_loop()).__module__\n"
            "print(gym_vllm.run_until_done(kind))")
    assert run_python(code, GYM_VLLM_LOOP="asyncio").stdout.strip().startswith("asyncio")
    default = run_python(code).stdout.strip()
    installed = importlib.util.find_spec("uvloop") is not None
    assert default.startswith("uvloop" if installed else "asyncio")


@pytest.mark.parametrize("variable, value", [("GYM_VLLM_LOOP", "trio"), ("GYM_VLLM_JSON", "off")])
@pytest.mark.parametrize("cli", [["gym_vllm"], ["local_vllm"], ["gym_vllm", "collect", "--url", "http://127.0.0.1:1/v1"]])
def test_unknown_speed_up_settings_are_one_line_cli_errors(tmp_path, cli, variable, value):
    config = tmp_path / "c.yaml"
    config.write_text("p:\n  responses_api_models:\n    vllm_model:\n      base_url: http://127.0.0.1:1/v1\n      api_key: k\n"
                      "      model: m\n      return_token_id_information: false\n      uses_reasoning_parser: true\n")
    (tmp_path / "in.jsonl").write_text('{"input": "hi"}\n')
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")] if "collect" in cli else ["--config", str(config)]
    result = subprocess.run([sys.executable, "-m", *cli, *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), variable: value})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"error: {variable}={value!r} is not one of" in line


def test_unknown_event_loop_is_a_one_line_cli_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("p:\n  responses_api_models:\n    vllm_model:\n      base_url: http://127.0.0.1:1/v1\n      api_key: k\n"
                      "      model: m\n      return_token_id_information: false\n      uses_reasoning_parser: true\n")
    result = subprocess.run([sys.executable, "-m", "gym_vllm", "--config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "GYM_VLLM_LOOP": "trio"})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gym_vllm: error: GYM_VLLM_LOOP='trio' is not one of")


def test_clis_run_with_startup_objects_frozen_and_rare_collections():
    code = ("import gc, gym_vllm\n"
            "async def main(): return gc.get_threshold(), gc.get_freeze_count() > 1000\n"
            "print(gym_vllm.run_until_done(main))")
    assert run_python(code).stdout.strip() == str((gym_vllm.GC_THRESHOLDS, True))


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing is kept as text")
@pytest.mark.parametrize("ids", [b'["\xff"]', b"[1, " + b"9" * 5000 + b"]"])
def test_kept_token_id_text_that_cannot_be_decoded_is_a_502(ids):
    """msgspec keeps a Raw without checking its UTF-8 or its ints' size: decoding it later is a 502, never a 500."""
    raw = b'{"choices":[{"message":{"content":"x"},"token_ids":[5],"logprobs":{"content":[{"token":"token_id:5",' \
          b'"logprob":-0.5}]}}],"prompt_token_ids":' + ids + b"}"
    with pytest.raises(gym_vllm.ApiError) as info:
        gym_vllm.extract_token_info(gym_vllm._loads(raw, gym_vllm.CompletionForResponse))
    assert info.value.status == 502 and "prompt_token_ids" in info.value.message


def _digits(count: int) -> bytes:
    return b"9" * count


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: nothing is kept as text")
@pytest.mark.parametrize("ids", [
    b"[1," + _digits(4300) + b"]",                       # the longest int json reads
    b"[1," + _digits(4301) + b"]",                       # one digit too many: json refuses it
    b"[" + _digits(5000) + b"]",
    b"[" + b",".join([_digits(2149)] * 3) + b"," + _digits(4301) + b"]",  # the long run after stretches with commas
    b"[" + _digits(3000) + b",7]",                       # over half the limit: decoded, and the same
    b"[" + b",".join([b"123456"] * 2000) + b"]",         # a long prompt of ordinary ids, kept
])
def test_long_digit_runs_in_kept_ids_are_answered_as_json_decoding_them_would(ids):
    """Compact id text is relayed as it came only where json could read every id: an int over Python's 4,300 digits
    is the same 502 with msgspec as with the standard library, one at the limit the same 200."""
    raw = b'{"created":1,"choices":[{"message":{"content":"x"},"token_ids":[5],"logprobs":{"content":[{"token":"token_id:5",' \
          b'"logprob":-0.5}]}}],"prompt_token_ids":' + ids + b"}"
    config = gym_vllm.server_config_from_dict("p", {"base_url": "http://127.0.0.1:1/v1", "api_key": "k", "model": "m",
                                                    "return_token_id_information": True,
                                                    "uses_reasoning_parser": False})

    def written(reply):
        gym_vllm._random_hex.clear()
        random.seed(7)
        try:
            return gym_vllm.response_json(gym_vllm.chat_response_to_responses(reply, {}, config))
        except gym_vllm.ApiError as exc:
            return exc.status, exc.message

    kept = gym_vllm._loads(raw, gym_vllm.CompletionForResponse)
    try:
        stdlib = written(json_loads(raw))
    except ValueError:  # json refuses the whole reply (the handler's 502 for a reply that is not JSON): so must this
        assert written(kept) == (502, "vLLM returned a malformed chat completion: `prompt_token_ids` should be a list "
                                      "of integers or null")
    else:
        assert written(kept) == stdlib and stdlib.__class__ is bytes
    if ids.endswith(b"6]"):
        assert kept["prompt_token_ids"].__class__ is gym_vllm._JsonText  # ordinary ids stay text


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: every reply is decoded in full")
@pytest.mark.parametrize("unread", [b'"\xff"', _digits(5000)])
def test_a_field_no_response_reads_is_checked_only_as_json_syntax(unread):
    """What CompletionForResponse skips is not decoded, so text json would refuse there (invalid UTF-8, an int over
    4,300 digits) does not fail the reply; the same text in a field that is read is a 502 (above)."""
    raw = b'{"created":1,"choices":[{"message":{"content":"x"},"finish_reason":"stop"}],"usage":null,"extra":%s}' % unread
    with pytest.raises(ValueError):
        json.loads(raw)
    reply = gym_vllm._loads(raw, gym_vllm.CompletionForResponse)
    assert "extra" not in reply and reply["choices"][0]["message"] == {"content": "x"}
    with pytest.raises(ValueError):
        gym_vllm._loads(raw[:-1] + b",}", gym_vllm.CompletionForResponse)  # not JSON at all: still refused


@pytest.mark.skipif(gym_vllm.JSON_CODEC == "json", reason="msgspec is not installed: entries are always objects")
def test_logprob_entries_are_of_one_kind():
    """A schema decodes every entry as a _LogprobRead or none (the whole reply or nothing): a list that mixes them, made
    by hand (or a stream's, which keeps an entry that is not an object), is malformed (a 502), never read half by
    attribute and half by key. A list of dicts is checked whole by _first_choice, one of _LogprobRead as it is read."""
    entry = gym_vllm._LogprobRead("token_id:5", -0.5)
    assert gym_vllm._logprob_entries([entry, entry]) and gym_vllm._logprob_entries([{}, {}]) and gym_vllm._logprob_entries([])
    assert not gym_vllm._logprob_entries([{}, entry]) and not gym_vllm._logprob_entries([5, entry])
    assert gym_vllm._logprob_fields([entry, gym_vllm._LogprobRead()]) == ([-0.5, None], ["token_id:5", None])
    for mixed in ([entry, {}], [entry, 5], [entry, None, entry], [{}, entry], ["token_id:5", entry]):
        reply = {"choices": [{"message": {"content": "x"}, "token_ids": [5] * len(mixed), "logprobs": {"content": mixed}}],
                 "prompt_token_ids": [1]}
        with pytest.raises(gym_vllm.ApiError, match="`choices\\[0\\].logprobs` should be \\{content"):
            gym_vllm.extract_token_info(reply)
