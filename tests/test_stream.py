"""The streaming state machine with plain data: chunks in, events out (sans-I/O), checked against the SDK's types."""

import dataclasses
import json
import random

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

import gym_vllm
from gym_vllm import ApiError
from test_conversion import BASE, NO_PARSER, TRAIN

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def chunk(delta=None, finish_reason=None, **extra):
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m", "choices": [choice], **extra}


def text_chunks(pieces, finish_reason="stop", usage=True):
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    chunks.append(chunk({}, finish_reason))
    if usage:
        chunks.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m", "choices": [],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    return chunks


def run(chunks, request=None, config=BASE):
    machine = gym_vllm.ResponsesStream(request or {"input": "q", "stream": True}, config)
    events = machine.start()
    for c in chunks:
        events += machine.feed(c)
    return events + machine.finish()


def check_lifecycle(events):
    """Every invariant strict clients rely on; returns the final response."""
    for event in events:
        EVENT.validate_python(event)  # the SDK's own event types, strictly
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    response_ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(response_ids) == 1
    open_index, done_items = None, []
    texts: dict = {}
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_index is None, "an item was added before the previous one was done"
            open_index = event["output_index"]
            assert open_index == len(done_items)
            added = event["item"]
        elif kind == "response.output_item.done":
            assert event["output_index"] == open_index and event["item"]["id"] == added["id"]
            done_items.append(event["item"])
            open_index = None
        elif kind == "error":
            continue
        else:
            assert event["output_index"] == open_index, event
            assert event["item_id"] == added["id"]
            if kind.endswith(".delta"):
                key = (open_index, kind, event.get("content_index", event.get("summary_index")))
                texts[key] = texts.get(key, "") + event["delta"]
            if kind in ("response.output_text.done", "response.reasoning_text.done", "response.reasoning_summary_text.done"):
                key = (open_index, kind.replace(".done", ".delta"), event.get("content_index", event.get("summary_index")))
                assert texts.get(key, "") == event["text"]
            if kind == "response.function_call_arguments.done":
                assert texts.get((open_index, "response.function_call_arguments.delta", None), "") == event["arguments"]
    final = events[-1]["response"]
    Response.model_validate(final)
    if events[-1]["type"] != "response.failed":
        assert open_index is None
        assert final["output"] == done_items  # same items, same ids as streamed
    return final


def normalized(response):
    """A response without the values that differ between two calls by design (ids, created_at)."""
    response = {k: v for k, v in response.items() if k not in ("id", "created_at")}
    response["output"] = [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]
    return response


def non_streaming(text, finish_reason="stop", config=BASE, request=None, **message):
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, **message}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    return gym_vllm.chat_response_to_responses(chat, request or {"input": "q", "stream": True}, config)


def types(events):
    return [e["type"] for e in events]


# --- event sequences ----------------------------------------------------------------------


def test_plain_text_event_order():
    events = run(text_chunks(["Hel", "lo"]))
    assert types(events) == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    final = check_lifecycle(events)
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["status"] == "completed"
    assert final["usage"]["input_tokens"] == 10


def test_leading_think_becomes_a_reasoning_item_before_the_message():
    events = run(text_chunks(["<th", "ink>plan ", "it</th", "ink>\n\nAns", "wer"]))
    final = check_lifecycle(events)
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "plan it"}]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "plan it"}]
    assert final["output"][1]["content"][0]["text"] == "\n\nAnswer"
    reasoning_events = [t for t in types(events) if "reasoning" in t]
    assert reasoning_events == [
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"]
    # the reasoning item is done before the message is added
    assert types(events).index("response.output_item.done") < types(events).index("response.output_text.delta")


def test_think_after_text_stays_text_and_unterminated_think_stays_text():
    mid = check_lifecycle(run(text_chunks(["Hi ", "<think>x</think>", " there"])))
    assert [i["type"] for i in mid["output"]] == ["message"] and mid["output"][0]["content"][0]["text"] == "Hi <think>x</think> there"
    open_ended = run(text_chunks(["<think>never ", "closed"], finish_reason="length"))
    final = check_lifecycle(open_ended)
    assert [i["type"] for i in final["output"]] == ["message"] and final["output"][0]["content"][0]["text"] == "<think>never closed"
    assert final["status"] == "incomplete" and final["output"][0]["status"] == "incomplete"
    assert types(open_ended)[-1] == "response.incomplete"
    assert normalized(final) == normalized(non_streaming("<think>never closed", "length"))


def test_parser_off_streams_think_as_text():
    final = check_lifecycle(run(text_chunks(["<think>r</think>", "a"]), config=NO_PARSER))
    assert final["output"][0]["content"][0]["text"] == "<think>r</think>a"


def test_tool_calls_stream_as_function_call_items():
    chunks = [chunk({"role": "assistant", "content": ""}),
              chunk({"content": "<think>r</think>"}),
              chunk({"tool_calls": [{"index": 0, "id": "chatcmpl-tool-a", "type": "function", "function": {"name": "f"}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "chatcmpl-tool-b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
              chunk({}, "tool_calls")]
    events = run(chunks)
    final = check_lifecycle(events)
    assert [i["type"] for i in final["output"]] == ["reasoning", "function_call", "function_call"]
    assert [(i["call_id"], i["name"], i["arguments"], i["status"]) for i in final["output"][1:]] == [
        ("chatcmpl-tool-a", "f", "{\"a\": 1}", "completed"), ("chatcmpl-tool-b", "g", "{}", "completed")]
    calls = [{"id": "chatcmpl-tool-a", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
             {"id": "chatcmpl-tool-b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    expected = non_streaming("<think>r</think>", "tool_calls", tool_calls=calls)
    final["usage"] = expected["usage"]  # this stream had no usage chunk
    assert normalized(final) == normalized(expected)


def test_tool_calls_are_told_apart_by_their_id_too_and_never_split():
    """Found by a review: a second call that reuses index 0 with its own id and name (as some tool parsers number every
    call) was glued onto the first (its name dropped, the arguments joined); a delta for a call whose item was already
    closed became a nameless call of its own, the first call's arguments cut. The first is two calls, as without
    streaming; the second cannot be relayed whole after the fact: a 502, never split arguments."""
    same_index = [chunk({"tool_calls": [{"index": 0, "id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
                  chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "g", "arguments": "{\"x\""}}]}),
                  chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
                  chunk({}, "tool_calls")]
    final = check_lifecycle(run(same_index))
    assert [(i["call_id"], i["name"], i["arguments"]) for i in final["output"]] == [("c0", "f", "{}"), ("c1", "g", '{"x": 1}')]
    back = [chunk({"tool_calls": [{"index": 0, "id": "c0", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "c1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})]
    with pytest.raises(ApiError, match="a delta for call 0 came after a later call began"):
        run(back)


def test_upstream_failure_mid_stream():
    machine = gym_vllm.ResponsesStream({"input": "q", "stream": True}, BASE)
    events = machine.start() + machine.feed(chunk({"content": "partial"}))
    events += machine.fail(gym_vllm.upstream_error("vLLM broke off the stream"))
    assert types(events)[-2:] == ["error", "response.failed"]
    final = check_lifecycle(events)
    assert final["status"] == "failed" and final["error"]["message"] == "vLLM broke off the stream"
    assert final["output"][0]["content"][0]["text"] == "partial" and final["output"][0]["status"] == "incomplete"
    with pytest.raises(ApiError):  # a stream that stops without a finish_reason is a failure, not a completion
        gym_vllm.ResponsesStream({"input": "q"}, BASE).finish()


def test_empty_reply_and_context_overflow():
    empty = check_lifecycle(run(text_chunks([])))
    assert [i["type"] for i in empty["output"]] == ["message"] and empty["output"][0]["content"][0]["text"] == ""
    machine = gym_vllm.ResponsesStream({"input": "q", "stream": True}, TRAIN)
    overflow = check_lifecycle(machine.start() + machine.context_overflow())
    assert normalized(overflow) == normalized(gym_vllm.context_overflow_response({"input": "q", "stream": True}, TRAIN))


def test_upstream_reasoning_field():
    chunks = [chunk({"reasoning": "fro"}), chunk({"reasoning": "m vllm"}), chunk({"content": "answer"}), chunk({}, "stop")]
    final = check_lifecycle(run(chunks))
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["summary"][0]["text"] == "from vllm"
    with pytest.raises(ApiError) as info:
        run(chunks, config=NO_PARSER)
    assert "--reasoning-parser" in info.value.message


def test_token_ids_accumulate_onto_the_last_item():
    pieces = [("<think>r</think>", [7, 8], -0.5), ("A", [9], -0.25), ("B", [10], -1.0)]
    chunks = [chunk({"role": "assistant", "content": ""}, prompt_token_ids=[1, 2, 3])]
    for text, ids, logprob in pieces:
        c = chunk({"content": text})
        c["choices"][0]["token_ids"] = ids
        c["choices"][0]["logprobs"] = {"content": [{"token": f"token_id:{i}", "logprob": logprob, "bytes": [], "top_logprobs": []} for i in ids]}
        chunks.append(c)
    chunks.append(chunk({}, "stop"))
    events = run(chunks, config=TRAIN)
    final = check_lifecycle(events)
    last = final["output"][-1]
    assert (last["prompt_token_ids"], last["generation_token_ids"], last["generation_log_probs"]) == (
        [1, 2, 3], [7, 8, 9, 10], [-0.5, -0.5, -0.25, -1.0])
    assert [e for e in events if e["type"] == "response.output_item.done"][-1]["item"]["generation_token_ids"] == [7, 8, 9, 10]
    assert "generation_token_ids" not in final["output"][0]
    broken = chunks[:-1] + [chunk({"content": "C"}), chunk({}, "stop")]
    broken[-2]["choices"][0]["token_ids"] = [11]  # an id without its log prob
    machine = gym_vllm.ResponsesStream({"input": "q"}, TRAIN)
    machine.start()
    for c in broken:
        machine.feed(c)
    with pytest.raises(ApiError):
        machine.finish()
    assert types(machine.fail(gym_vllm.upstream_error("x")))[-1] == "response.failed"  # and the stream can still end cleanly
    for entry in (5, None, "token_id:11", [1]):  # kept by feed() as it came (the others are read), refused at the end
        broken = chunks[:-1] + [chunk({"content": "C"}), chunk({}, "stop")]
        broken[-2]["choices"][0]["token_ids"] = [11]
        broken[-2]["choices"][0]["logprobs"] = {"content": [entry]}
        machine = gym_vllm.ResponsesStream({"input": "q"}, TRAIN)
        machine.start()
        for c in broken:
            machine.feed(c)
        with pytest.raises(ApiError, match="`choices\\[0\\].logprobs` should be"):
            machine.finish()


def test_malformed_chunks_raise_api_errors():
    for bad in ([1], {"choices": "x"}, {"choices": [{"delta": "x"}]}, {"choices": [{"delta": {"content": 5}}]},
                {"choices": [{"delta": {"tool_calls": [5]}}]}, {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": 3}}]}}]},
                {"choices": [{"delta": {}, "finish_reason": ["stop"]}]},  # a TypeError, a 500
                {"choices": [{"delta": {"tool_calls": True}}]},  # a TypeError mid-stream
                {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": 5}}]}}]}):  # a function_call named 5
        with pytest.raises(ApiError) as info:
            gym_vllm.ResponsesStream({"input": "q"}, BASE).feed(bad)
        assert info.value.status == 502
    with pytest.raises(ApiError) as info:  # ids that are not a list were skipped (a 502 without streaming)
        gym_vllm.ResponsesStream({"input": "q"}, TRAIN).feed({"choices": [{"delta": {"content": "x"}, "token_ids": "[5]"}]})
    assert "`choices[0].token_ids` should be a list of integers or null" in info.value.message


def test_malformed_chat_chunks_that_need_a_rewrite_raise_api_errors():
    """Chunks the chat relay rewrites (they mention reasoning) of a wrong shape: each was an AttributeError or a
    TypeError mid-stream, a broken HTTP stream."""
    for bad in [["reasoning"], {"choices": 5, "reasoning": 1}, {"choices": [{"delta": {"reasoning": ["x"]}}]},
                {"choices": [{"delta": {"reasoning": "x", "content": 5}}]}, {"choices": [{"index": [0], "delta": {"reasoning": "x"}}]}]:
        with pytest.raises(ApiError) as info:
            gym_vllm.ChatStreamRelay(BASE).rewrite(bad)
        assert info.value.status == 502, bad
    relay = gym_vllm.ChatStreamRelay(BASE)  # content that is not a string after reasoning, in a later chunk
    relay.rewrite(chunk({"reasoning": "x"}))
    with pytest.raises(ApiError):
        relay.rewrite(chunk({"content": 5}))


def test_chat_relay_keeps_each_choice_s_think_block_apart():
    """n > 1 streams interleave their choices: one flag for all of them closed choice 0's block with choice 1's text
    and left choice 1's reasoning untagged."""
    relay = gym_vllm.ChatStreamRelay(BASE)
    texts = {0: "", 1: ""}
    for index, delta in [(0, {"reasoning": "r0"}), (1, {"reasoning": "r1"}), (0, {"content": "c0"}), (1, {"reasoning": "s1"}),
                         (1, {"content": "c1"})]:
        rewritten = relay.rewrite({"choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        texts[index] += rewritten["choices"][0]["delta"].get("content") or ""
    assert texts == {0: "<think>r0</think>c0", 1: "<think>r1s1</think>c1"} and not relay.needs(b"{}")


# --- equivalence with the non-streaming path, on many random chunkings ------------------------

TEXTS = [
    "Hello world",
    "<think>plan</think>Answer",
    "\n<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 42.  ",
    "   <think></think>x",
    "<think>only reasoning</think>",
    "<think>unterminated reasoning",
    "<thin",
    "<",
    "   ",
    "",
    "</think>stray close",
    "<think>a<think>nested</think>rest",
    "text with <b>tags</b> and </think>",
    "<think>ü 🙂 unicode</think>ünïcödé",
]


def random_pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_stream_final_equals_non_streaming_for_every_chunking(text, finish_reason):
    rng = random.Random(text + finish_reason)
    request = {"input": "q", "stream": True, "instructions": "I", "metadata": {"k": "v"}, "max_output_tokens": 5}
    expected = normalized(non_streaming(text, finish_reason, request=request))
    for _ in range(60):
        pieces = random_pieces(text, rng)
        events = run(text_chunks(pieces, finish_reason), request=request)
        final = check_lifecycle(events)
        assert normalized(final) == expected, pieces


def test_every_split_point_of_the_tags():
    text = "<think>abc</think>def"
    expected = normalized(non_streaming(text))
    for i in range(1, len(text)):
        for j in range(i + 1, len(text) + 1):
            final = check_lifecycle(run(text_chunks([text[:i], text[i:j], text[j:]])))
            assert normalized(final) == expected, (i, j)


# --- chat streaming relay --------------------------------------------------------------------


def test_chat_relay_wraps_reasoning_as_think_text():
    relay = gym_vllm.ChatStreamRelay(BASE)
    contents = []
    for c in [chunk({"role": "assistant", "reasoning": "a"}), chunk({"reasoning": "b"}), chunk({"content": "x"}), chunk({"content": "y"}, "stop")]:
        raw = gym_vllm._dumps(c).encode()
        if relay.needs(raw):
            c = relay.rewrite(c)
        contents.append(c["choices"][0]["delta"].get("content"))
    assert "".join(filter(None, contents)) == "<think>ab</think>xy"
    only_reasoning = gym_vllm.ChatStreamRelay(BASE)
    out = [only_reasoning.rewrite(c)["choices"][0]["delta"].get("content") for c in [chunk({"reasoning": "r"}), chunk({}, "length")]]
    assert "".join(filter(None, out)) == "<think>r</think>"
    with pytest.raises(ApiError):
        gym_vllm.ChatStreamRelay(NO_PARSER).rewrite(chunk({"reasoning": "r"}))
    assert not gym_vllm.ChatStreamRelay(BASE).needs(b'{"choices":[{"delta":{"content":"x"}}]}')


def test_stream_machine_uses_dataclass_config():
    # the same config object drives both paths: a replaced one is honoured
    config = dataclasses.replace(BASE, model="other")
    assert check_lifecycle(run(text_chunks(["a"]), config=config))["model"] == "other"


def test_fast_sse_formatting_is_byte_identical_to_the_encoder():
    rng = random.Random(7)
    alphabet = 'ab "\\\n\t\u0000\u001fé🙂</>{}'
    machine = gym_vllm.ResponsesStream({"input": "q"}, BASE)
    events = machine.start()
    for _ in range(300):
        events += machine.feed(chunk({"content": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))}))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 250
    for event in events:
        assert gym_vllm._sse_event(event) == f"event: {event['type']}\ndata: {gym_vllm._dumps(event)}\n\n".encode()


def vllm_chunk_bytes(delta, finish_reason=None, token_ids_key=True, chunk_id="chatcmpl-7f3a", model="tiny", **extra) -> bytes:
    """A chunk as vLLM writes it (compact, its key order; `token_ids: null` since vLLM 0.11)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if token_ids_key:
        choice["token_ids"] = None
    value = {"id": chunk_id, "object": "chat.completion.chunk", "created": 1700000000, "model": model, "choices": [choice], **extra}
    return gym_vllm._dumps(value).encode()


def sse_of_stream(datas, config, shortcut):
    """The bytes a /v1/responses stream sends for vLLM's `data:` payloads, through _ResponsesSSE (with its shortcut for
    text chunks) or decoding and feeding every chunk; the error the stream ends with, if any; feed's calls."""
    framing = responses_framing(config)
    machine = framing.machine
    feeds = []
    feed = machine.feed
    machine.feed = lambda chunk: feeds.append(chunk) or feed(chunk)
    out = [framing.start()]
    try:
        for data in datas:
            out.append(framing.convert(data) if shortcut else gym_vllm._sse_bytes(machine.feed(gym_vllm._parse_chunk(data))))
        out.append(framing.finish())
    except ApiError as exc:
        return b"".join(out), (exc.status, exc.message), len(feeds)
    return b"".join(out), None, len(feeds)


PLAIN_TEXT = ['a', 'b', ' ', 'é', '🙂', 'x\u2028', '>', '/', 'think']
# Texts whose JSON json or vLLM would not write so (the shortcut writes events from a text's bytes only where they are
# what _json_string writes), one that ends the string early, and canonical ones among them.
ODD_ESCAPES = [b'"o\\/k"', b'"o\\u00e9k"', b'"o\\u000ak"', b'"o\\u001Fk"', b'"o\\u001fk"', b'"\\ud800"', b'"\\ud83d\\ude42"',
               b'"o\\qk"', b'"o","k"', b'"o\\"', b'"o\\\\"', b'"o\\"k"', b'"\\n\\"\\\\"']
SPECIAL_TEXT = ['"', '\\', '\n', '\t', '\x1f', '<', '<think>', '</think>']


@pytest.mark.parametrize("config", [BASE, NO_PARSER, TRAIN], ids=["parser", "no-parser", "token-ids"])
def test_the_text_chunk_shortcut_writes_what_decoding_and_feeding_would(config):
    """_ResponsesSSE's shortcut for vLLM's text chunks (recognized by their bytes) sends byte for byte what decoding
    each chunk and feeding it to the machine sends, or fails the same way, for random streams: texts with quotes,
    backslashes, control and non-ASCII characters, think tags; chunks of other shapes between (reasoning, tool calls,
    finish, usage, another id, no token_ids key); invalid UTF-8 or a raw control character in the text."""
    rng = random.Random(5)
    shortcut_taken = 0
    for _ in range(300):
        datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}, model=rng.choice(["tiny", "tiny", "tiny", 'q"uoted']))]
        for _ in range(rng.randint(0, 30)):
            text = "".join(rng.choice(PLAIN_TEXT if rng.random() < 0.9 else SPECIAL_TEXT) for _ in range(rng.randint(0, 4)))
            kind = rng.random()
            if kind < 0.75:
                datas.append(vllm_chunk_bytes({"content": text}))
            elif kind < 0.8:
                datas.append(vllm_chunk_bytes({"content": text}, token_ids_key=False))
            elif kind < 0.84:
                datas.append(vllm_chunk_bytes({"content": text}, chunk_id="chatcmpl-other"))
            elif kind < 0.86:
                datas.append(vllm_chunk_bytes({"reasoning": text or "r"}))
            elif kind < 0.9:
                datas.append(vllm_chunk_bytes({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": text}}]}))
            elif kind < 0.94:
                datas.append(vllm_chunk_bytes({"content": text}, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}))
            elif kind < 0.96:
                datas.append(vllm_chunk_bytes({"content": "ok"}).replace(b'"ok"', rng.choice([b'"o\xffk"', b'"o\x01k"', b'"\xed\xa0\x80"',
                                                                                         *ODD_ESCAPES])))
            else:
                datas.append(vllm_chunk_bytes({"content": text}, "stop"))
        datas.append(vllm_chunk_bytes({}, rng.choice(["stop", "length"])))
        with_shortcut, without = sse_of_stream(datas, config, True), sse_of_stream(datas, config, False)
        assert with_shortcut[:2] == without[:2], datas
        shortcut_taken += without[2] - with_shortcut[2]
    assert shortcut_taken > 800  # the shortcut was taken (about 1,000 times), not skipped


def test_the_text_chunk_shortcut_on_a_real_engine_stream_shape():
    """Chunks as in vllm-cpu.md §4c: every text chunk after the one that opened the message takes the shortcut, and the
    events are the same."""
    head = b'{"id":"chatcmpl-b129","object":"chat.completion.chunk","created":1763900000,"model":"tiny","choices":[{"index":0,"delta":'
    datas = [head + b'{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}',
             head + b'{"content":"<think>a"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
             head + b'{"content":"</think>"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
             *[head + b'{"content":"\xc3\xa9tu %d"},"logprobs":null,"finish_reason":null,"token_ids":null}]}' % i for i in range(5)],
             head + b'{"content":"tu"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}',
             b'{"id":"chatcmpl-b129","object":"chat.completion.chunk","created":1763900000,"model":"tiny","choices":[],'
             b'"usage":{"prompt_tokens":13,"total_tokens":16,"completion_tokens":3},"system_fingerprint":"vllm-0.32.0-7c58b63e"}']
    with_shortcut, without = sse_of_stream(datas, BASE, True), sse_of_stream(datas, BASE, False)
    assert with_shortcut[:2] == without[:2] and without[1] is None
    assert (without[2], with_shortcut[2]) == (len(datas), len(datas) - 4)  # "étu 1" to "étu 4"
    assert "étu 4" in with_shortcut[0].decode()


# --- a read's run of whole events converted at once (_relay_read, run_in, convert_run) ------------------------------

THINK_OPENINGS = ["<think>", "<think>", " <think>", "<thi", "\n<think>a", "<think>\n"]
THINK_CLOSINGS = [["</think>"], ["</th", "ink>"], ["<", "/think>x"], ["a</think>b"], ["</think", ">\n\nc"], ["</", "thin"]]


def think_texts(rng):
    """A random stream's texts where it leads with a `<think>` block: its opening, then when its closing comes (perhaps
    split across chunks, perhaps never), as {position: text} of the chunks after the first."""
    if rng.random() < 0.5:
        return {}
    if rng.random() < 0.1:  # the block ends across the chunk that opened it and the next
        return {0: "<think>r</th", 1: "ink>s"}
    texts = {0: rng.choice(THINK_OPENINGS)}
    at = rng.randint(1, 50)
    for offset, text in enumerate(rng.choice(THINK_CLOSINGS)):
        texts[at + offset] = text
    return texts


def upstream_reasoning(rng):
    """The texts of the reasoning chunks a random stream leads with, where vLLM's `--reasoning-parser` ran (a quarter
    of them): any text, an empty one among them."""
    if rng.random() < 0.75:
        return []
    return ["".join(rng.choice(PLAIN_TEXT if rng.random() < 0.9 else SPECIAL_TEXT) for _ in range(rng.randint(0, 4)))
            for _ in range(rng.randint(1, 20))]


def random_stream_datas(rng, text_only=False):
    """vLLM `data:` payloads of a random stream: mostly text chunks, and (unless `text_only`) chunks of other shapes;
    half of them lead with a `<think>` block (think_texts)."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""})]
    datas += [vllm_chunk_bytes({"reasoning": text}) for text in upstream_reasoning(rng)]
    think = think_texts(rng)
    for position in range(rng.randint(0, 60)):
        text = "".join(rng.choice(PLAIN_TEXT if rng.random() < 0.95 else SPECIAL_TEXT) for _ in range(rng.randint(0, 4)))
        if position in think:
            datas.append(vllm_chunk_bytes({"content": think[position]}))
            continue
        kind = 0.0 if text_only else rng.random()
        if kind < 0.8:
            datas.append(vllm_chunk_bytes({"content": text or "t"}))
        elif kind < 0.83:
            datas.append(vllm_chunk_bytes({"content": text}, token_ids_key=False))
        elif kind < 0.86:
            datas.append(vllm_chunk_bytes({"reasoning": text or "r"}))
        elif kind < 0.89:
            datas.append(vllm_chunk_bytes({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": text}}]}))
        elif kind < 0.92:
            datas.append(vllm_chunk_bytes({"content": "[DONE] " + text}))  # the marker inside a text is only text
        elif kind < 0.94:
            datas.append(vllm_chunk_bytes({"content": "ok"}).replace(b'"ok"', rng.choice([b'"o\xffk"', b'"o\x01k"', *ODD_ESCAPES])))
        elif kind < 0.95:
            datas.append(b'{"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}')
        elif kind < 0.96:
            datas.append(vllm_chunk_bytes({"content": text or "t"}, chunk_id="chatcmpl-other"))  # the same tail
        elif kind < 0.97:  # a head of the same length: another choice's text, or no delta at all
            datas.append(vllm_chunk_bytes({"content": text or "t"}).replace(*rng.choice([(b'"index":0', b'"index":1'),
                                                                                         (b'"delta"', b'"DELTA"')])))
        elif kind < 0.98:
            datas.append(vllm_chunk_bytes({"content": ""}))
        else:
            datas.append(vllm_chunk_bytes({"content": text}, "stop"))
    datas.append(vllm_chunk_bytes({}, rng.choice(["stop", "length"])))
    return datas


def sse_text(rng, datas, done=True, noise=False):
    """The SSE bytes vLLM writes for `datas`; with `noise`, in the other spellings the format allows (`data:X`, more
    spaces, CRLF, comments, another field's line), and anything after `[DONE]`."""
    events = []
    for data in datas:
        if noise and rng.random() < 0.15:
            events.append(rng.choice([b"data:%b\n\n", b"data:  %b \n\n", b"data: %b\r\n\r\n", b": ping\n\ndata: %b\n\n",
                                      b"event: chunk\ndata: %b\n\n", b"data: %b\n\n\n"]) % data)
        else:
            events.append(b"data: %b\n\n" % data)
    if done:
        events.append(rng.choice([b"data: [DONE]\n\n", b"data:[DONE]\r\n\r\n"]) if noise else b"data: [DONE]\n\n")
        if noise and rng.random() < 0.3:  # nothing after [DONE] is read
            events += [b"data: %b\n\n" % data for data in (datas[1:] or datas)[:rng.randint(1, 12)]]
    return b"".join(events)


def random_reads(rng, raw):
    """`raw` cut into reads as a socket may deliver them: at random places, at event ends, or in one piece."""
    style = rng.random()
    if style < 0.3:
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 40))))
    elif style < 0.9:
        ends = [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
        cuts = sorted(rng.sample(ends[:-1], min(len(ends) - 1, rng.randint(0, 30))))
    else:
        cuts = []
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


def relayed(framing, reads, at_once=True):
    """What _relay_stream sends for these reads (its loop without the I/O), and the error the stream ended with; with
    `at_once` false, what it sent before round 10: every `data:` payload found line by line and converted on its own."""
    out, lines, failure = [framing.start()], gym_vllm._DataLines(), None
    try:
        for block in reads:
            converted = []
            try:
                if at_once:
                    gym_vllm._relay_read(block, lines, framing, converted)
                else:
                    for data in lines.payloads(block):
                        converted.append(framing.convert(data))
            finally:
                out += converted
            if lines.done:
                break
        else:
            raise gym_vllm.upstream_error("vLLM closed the stream before `data: [DONE]`")
        out.append(framing.finish())
    except ApiError as exc:
        failure = (exc.status, exc.message)
        out.append(framing.fail(exc))
    return b"".join(out), failure


class Feeding(gym_vllm._ResponsesSSE):
    """The reference: every chunk decoded and fed to the machine, no shortcut and no run."""

    def convert(self, data):
        return self._written(self.machine.feed(gym_vllm._parse_chunk(data)))

    def run_in(self, block):
        return 0, 0

    def convert_run(self, block):
        return None


def taken_by(framing, method):
    """What `framing.<method>` takes from now on (each result that is not None), as a list: whether a shortcut ran."""
    taken, original = [], getattr(framing, method)

    def recording(*args):
        result = original(*args)
        if result is not None:
            taken.append(result)
        return result

    setattr(framing, method, recording)
    return taken


def responses_framing(config, kind=gym_vllm._ResponsesSSE, request=None):
    """A `/v1/responses` framing for `request` (a plain stream by default) that gives the same item ids and times each
    time it is made, so that two of them can be compared byte for byte."""
    gym_vllm._random_hex.clear()
    random.seed(11)
    machine = gym_vllm.ResponsesStream(request or {"input": "q", "stream": True}, config)
    machine.created = 1.0
    return kind(machine)


def reads_of(raw, size):
    """An SSE stream's bytes in reads of `size` whole events each, as a busy proxy reads them."""
    events = [event + b"\n\n" for event in raw.split(b"\n\n") if event]
    return [b"".join(events[i:i + size]) for i in range(0, len(events), size)]


def one_chunk_at_a_time(framing, raw):
    """The reference: the stream's `data:` payloads found line by line, each converted on its own (`convert`)."""
    return relayed(framing, [raw], at_once=False)


@pytest.mark.parametrize("config", [BASE, NO_PARSER, TRAIN], ids=["parser", "no-parser", "token-ids"])
def test_a_responses_read_converted_at_once_is_what_its_chunks_one_by_one_give(config):
    """A /v1/responses stream relayed read by read (runs of text chunks converted at once) sends byte for byte what
    converting every chunk on its own sends, and that what decoding and feeding every chunk sends, and counts the same
    events, for random streams cut into random reads: chunks of every shape, texts with every kind of character, a
    leading `<think>` block ended anywhere (or not at all), the other spellings SSE allows, `[DONE]` in a text, missing
    or followed by more, reads that end inside an event or a line."""
    rng = random.Random(8)
    runs = 0
    for _ in range(400):
        datas = random_stream_datas(rng, text_only=rng.random() < 0.3)
        raw = sse_text(rng, datas, done=rng.random() < 0.95, noise=rng.random() < 0.3)
        framing = responses_framing(config)
        reference = one_chunk_at_a_time(framing, raw)
        assert framing.sent == reference[0].count(b"\n\n")
        assert one_chunk_at_a_time(responses_framing(config, Feeding), raw) == reference, raw
        framing = responses_framing(config)
        converted = taken_by(framing, "convert_run")
        assert relayed(framing, random_reads(rng, raw)) == reference, raw
        assert framing.sent == reference[0].count(b"\n\n")
        runs += sum(run.count(b"\n\n") > 1 for run in converted)
    assert runs > 300  # runs of several text chunks were converted at once, not all one by one


@pytest.mark.parametrize("config, held", [
    (BASE, [{"reasoning": "a"}, {"reasoning": "b"}, {"reasoning": "c"}]),  # vLLM's reasoning field: held
    (NO_PARSER, [{"content": "<think>a"}, {"content": "b"}, {"content": "c"}]),  # a leading <think> block: held
    (TRAIN, [{"content": "<think>a"}, {"content": "b"}, {"content": "c"}]),
], ids=["reasoning", "think", "token-ids"])
@pytest.mark.parametrize("done", [True, False], ids=["done", "cut"])
def test_a_chunk_with_another_created_is_read_alike_both_ways(config, held, done):
    """The Response's `created_at` is vLLM's `created` of the first chunk, whichever way its chunks are read: a chunk
    of another head (another id and `created`) among chunks held before any item (not fed: taken by their bytes) gave
    its `created` on one path only, and the later envelopes (`response.completed`, `response.failed`) differed."""
    def data(delta, finish_reason=None, other=False, **extra):
        if config is TRAIN and delta.get("content"):
            raw = vllm_token_chunk_bytes(delta["content"], 5)
        else:
            raw = vllm_chunk_bytes(delta, finish_reason, **extra)
        return raw.replace(b'"chatcmpl-7f3a"', b'"chatcmpl-other"').replace(b"1700000000", b"1700000999") if other else raw
    datas = [data({"role": "assistant", "content": ""}, prompt_token_ids=[1, 2]), data(held[0]), data(held[1], other=True), data(held[2])]
    if done:
        datas += [data({"content": "</think>x"} if "content" in held[0] else {"content": "x"}), data({}, "stop")]
    raw = b"".join(b"data: %b\n\n" % d for d in datas) + (b"data: [DONE]\n\n" if done else b"")
    reference = one_chunk_at_a_time(responses_framing(config, Feeding), raw)
    last = json.loads(reference[0].split(b"\n\n")[-2].split(b"\ndata: ", 1)[1])
    assert last["type"] == ("response.completed" if done else "response.failed")
    assert last["response"]["created_at"] == 1700000000
    assert one_chunk_at_a_time(responses_framing(config), raw) == reference
    for size in (1, 2, 6):
        assert relayed(responses_framing(config), reads_of(raw, size)) == reference


@pytest.mark.parametrize("config, chunk, runs_counted", [(BASE, lambda i: vllm_chunk_bytes({"content": f"w{i}"}), 0),
                                                          (TRAIN, lambda i: vllm_token_chunk_bytes(f"w{i}", i), 2)],
                         ids=["text", "token-ids"])
def test_a_read_that_is_one_run_is_taken_at_once_without_looking_for_the_run(config, chunk, runs_counted):
    """Most reads are a run of text chunks and nothing else: `convert_run` takes such a read first, with no `run_in`
    (its searches cost more than the run at 64 streams, where a read holds about two events). Not in a token-ID
    stream, whose runs of fewer than _TOKEN_RUN_MIN chunks go one by one faster: `run_in` counts them first."""
    framing = responses_framing(config)
    first = b"".join(b"data: %b\n\n" % chunk(i) for i in range(2))
    reads = [b"data: %b\n\n" % vllm_chunk_bytes({"role": "assistant", "content": ""}) + first,
             b"".join(b"data: %b\n\n" % chunk(i) for i in range(2, 8)), b"data: %b\n\n" % chunk(8)]
    looked_for, runs = taken_by(framing, "run_in"), taken_by(framing, "convert_run")
    assert relayed(framing, reads) == one_chunk_at_a_time(responses_framing(config), b"".join(reads))
    assert len(looked_for) == 1 + runs_counted  # the first read (the role chunk before the run): as before
    assert [run.count(b"event: response.output_text.delta") for run in runs] == ([6] if runs_counted else [6, 1])


def test_a_read_of_reasoning_chunks_is_held_at_once():
    """vLLM's own reasoning field (`--reasoning-parser`): a read of nothing but its chunks is held in one step (a run,
    as a read of text chunks is converted), as its chunks one by one would be; the answer's first chunk then sends the
    reasoning item whole."""
    def reasoning(i):
        return b"data: %b\n\n" % vllm_chunk_bytes({"reasoning": f"r{i} "})

    reads = [b"data: %b\n\n" % vllm_chunk_bytes({"role": "assistant", "content": ""}) + reasoning(0),
             b"".join(map(reasoning, range(1, 7))), reasoning(7),
             b"".join(b"data: %b\n\n" % vllm_chunk_bytes({"content": text}) for text in ("a", "b"))
             + b"data: %b\n\ndata: [DONE]\n\n" % vllm_chunk_bytes({}, "stop")]
    framing = responses_framing(BASE)
    runs = taken_by(framing, "convert_run")
    out, failure = relayed(framing, reads)
    assert (out, failure) == one_chunk_at_a_time(responses_framing(BASE), b"".join(reads)) and failure is None
    assert runs == [b"", b""]  # the second read and the third: held, nothing to send yet
    final = gym_vllm._loads(out.rsplit(b"data: ", 1)[1])["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(f"r{i} " for i in range(8))
    assert final["output"][1]["content"][0]["text"] == "ab"


def sse_events(raw):
    """A chat stream's events as values: `data:` payloads decoded (JSON whitespace aside, two spellings are one; the
    relay passes on what it need not read as it came, invalid JSON too)."""
    events = []
    for event in raw.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), raw
        payload = event[6:].strip()
        try:
            events.append(gym_vllm._loads(payload))
        except (ValueError, UnicodeDecodeError):
            events.append(payload)
    return events


class ChatRewriting(gym_vllm._ChatSSE):
    """The reference: every chunk with reasoning decoded and rewritten, no shortcut."""

    def _reasoning_as_content(self, data):
        return None


@pytest.mark.parametrize("space", [b"\x0c", b"\x0b"], ids=["form-feed", "vertical-tab"])
def test_a_payload_is_stripped_of_json_whitespace_only(space):
    """`data:` payloads lose the whitespace JSON allows around a value, and only that: bytes.strip() also took a form
    feed or a vertical tab, so a chat stream passed such a payload on as it came where it was whole events (invalid
    JSON for the client) and stripped (valid) where it was not; a Responses stream read it as JSON either way."""
    chunk = vllm_chunk_bytes({"content": "hi"}, "stop")
    raw = b"data: %b%b\n\ndata: [DONE]\n\n" % (space, chunk)
    assert gym_vllm._DataLines().payloads(raw) == [space + chunk]
    chat = one_chunk_at_a_time(ChatRewriting(BASE), raw)
    assert relayed(gym_vllm._ChatSSE(BASE), [raw]) == chat and chat[0].startswith(b"data: " + space)
    failed = one_chunk_at_a_time(responses_framing(BASE, Feeding), raw)
    assert failed[1] == (502, "vLLM sent a stream chunk that is not JSON")
    assert relayed(responses_framing(BASE), [raw]) == failed
    assert gym_vllm._DataLines().payloads(b"data: \t %b \r\n\n" % chunk) == [chunk]  # JSON's own whitespace goes


def test_a_chat_read_relayed_at_once_is_what_its_chunks_one_by_one_give():
    """A chat stream relayed read by read (runs with nothing to rewrite passed on as vLLM wrote them, chunks of vLLM's
    reasoning field rewritten from their bytes) sends the events that decoding and rewriting every chunk that needs it
    on its own sends, byte for byte where vLLM wrote them in one spelling, and counts them."""
    rng = random.Random(9)
    passed_on = reasoning_rewritten = 0
    for _ in range(400):
        datas = random_stream_datas(rng, text_only=rng.random() < 0.3)
        noise = rng.random() < 0.3
        raw = sse_text(rng, datas, done=rng.random() < 0.95, noise=noise)
        framing = ChatRewriting(BASE)
        reference = one_chunk_at_a_time(framing, raw)
        assert framing.sent == reference[0].count(b"\n\n")
        framing = gym_vllm._ChatSSE(BASE)
        runs_taken = taken_by(framing, "convert_run")
        shortcuts = taken_by(framing, "_reasoning_as_content")
        out, failure = relayed(framing, random_reads(rng, raw))
        assert failure == reference[1] and framing.sent == out.count(b"\n\n")
        assert sse_events(out) == sse_events(reference[0]), raw
        if not noise:
            assert out == reference[0]
        passed_on += len(runs_taken)
        reasoning_rewritten += len(shortcuts)
    assert passed_on > 300 and reasoning_rewritten > 300


@pytest.mark.parametrize("odd", [*ODD_ESCAPES, b'"o\xffk"', b'"o\x01k"'])
def test_a_chat_reasoning_chunk_whose_bytes_the_shortcut_cannot_vouch_for_is_rewritten(odd):
    """A reasoning chunk in a chat stream whose text is not what `_json_string` writes (another spelling of an escape,
    a quote that ends it early, invalid UTF-8, a raw control character) is decoded and rewritten, as any chunk is, or
    fails the stream as decoding it does; one whose text is (`\\u001f`, `\\"`) is rewritten from its bytes: the
    client gets the same bytes either way."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}), vllm_chunk_bytes({"reasoning": "a"}),
             vllm_chunk_bytes({"reasoning": "ok"}).replace(b'"ok"', odd), vllm_chunk_bytes({"reasoning": "b"}),
             vllm_chunk_bytes({"content": "c"}), vllm_chunk_bytes({}, "stop")]
    raw = b"".join(b"data: %b\n\n" % data for data in datas) + b"data: [DONE]\n\n"
    framing = gym_vllm._ChatSSE(BASE)
    shortcuts = taken_by(framing, "_reasoning_as_content")
    out, failure = one_chunk_at_a_time(framing, raw)
    assert (out, failure) == one_chunk_at_a_time(ChatRewriting(BASE), raw)
    assert failure or datas[3].replace(b'"reasoning":"', b'"content":"') in shortcuts  # "b" at least


def test_whole_events_are_counted_only_where_a_block_is_nothing_else():
    event = b'data: {"a":1}\n\n'
    assert gym_vllm._whole_events(event * 3) == 3
    for block in (b"", event[:-1], b": ping\n\n" + event, event + b"data: [DONE]\n\n", b'data: {"a":\n1}\n\n',
                  event + b"\n", b"\n" + event, b'data:{"a":1}\n\n'):
        assert gym_vllm._whole_events(block) == 0, block


@pytest.mark.parametrize("run_length", [4, 20], ids=["short-read", "long-read"])  # under and over 800 bytes (convert_run)
@pytest.mark.parametrize("odd", [(b'"delta"', b'"DELTA"'), (b'"index":0', b'"index":1'), (b'"chatcmpl-7f3a"', b'"chatcmpl-7f3b"')],
                         ids=["no-delta", "another-choice", "another-id"])
def test_a_chunk_with_another_head_of_the_same_length_in_a_run_is_converted_as_itself(run_length, odd):
    """A chunk in a run of text chunks whose head differs from the stream's but has its length (cutting heads by
    length would take its text for the open message's) gives what converting it on its own gives."""
    first = [vllm_chunk_bytes({"role": "assistant", "content": ""})] + [vllm_chunk_bytes({"content": f"a{i}"}) for i in range(3)]
    run_chunks = [vllm_chunk_bytes({"content": f"b{i}"}) for i in range(run_length)]
    run_chunks[run_length // 2] = run_chunks[run_length // 2].replace(*odd)
    reads = [b"".join(b"data: %b\n\n" % data for data in first),
             b"".join(b"data: %b\n\n" % data for data in run_chunks) + b"data: %b\n\ndata: [DONE]\n\n" % vllm_chunk_bytes({}, "stop")]
    reference = one_chunk_at_a_time(responses_framing(BASE), b"".join(reads))
    assert relayed(responses_framing(BASE), reads) == reference
    if odd[1] == b'"DELTA"':
        assert b'"delta":"b%d"' % (run_length // 2) not in reference[0]


def test_a_run_past_the_written_sequence_numbers_writes_its_own():
    """Sequence numbers are taken from a table of written ones (_DECIMALS); a long stream goes past its end."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""})] + [vllm_chunk_bytes({"content": f"w{i}"}) for i in range(40)]
    datas.append(vllm_chunk_bytes({}, "stop"))
    raw = sse_text(random.Random(1), datas)
    cut = raw.index(b"w3")  # the message is open and the shortcut's tail known by then
    sides = []
    for relay in (False, True):
        framing = responses_framing(BASE)
        framing.machine.sequence = len(gym_vllm._DECIMALS) - 20
        sides.append(relayed(framing, [raw[:cut], raw[cut:]]) if relay else one_chunk_at_a_time(framing, raw))
    assert sides[0] == sides[1] and sides[0][1] is None
    assert b'"sequence_number":%d,' % (len(gym_vllm._DECIMALS) + 10) in sides[1][0]


@pytest.mark.parametrize("config", [BASE, NO_PARSER, TRAIN], ids=["parser", "no-parser", "token-ids"])
def test_every_event_is_written_as_the_standard_encoder_writes_it(config):
    """_sse_event writes each event the fast way for its kind (msgspec where it writes the same, a Response envelope as
    the non-streaming reply does): byte for byte `_dumps`' text, for every event of random streams, whole, failed or
    cut short, with texts of every kind of character, log probs of every magnitude and echoed floats."""
    rng = random.Random(10)
    requests = [{"input": "q", "stream": True},
                {"input": "q", "stream": True, "temperature": 0.7, "top_p": 1e-05, "include": ["message.output_text.logprobs"],
                 "top_logprobs": 0, "metadata": {"k": "null 1e5 0.00001"}, "max_output_tokens": 64}]
    logprobs = [-1.1920928955078125e-07, -0.5, -20.0, -1e-05, -0.0001, -3.4e-12, 0.0, -1234.5678]
    for _ in range(60):
        request = rng.choice(requests)
        machine = gym_vllm.ResponsesStream(request, config)
        events = machine.start()
        try:
            for data in random_stream_datas(rng):
                chunk = gym_vllm._parse_chunk(data)
                if rng.random() < 0.5 and chunk.get("choices"):
                    content = (chunk["choices"][0].get("delta") or {}).get("content") or ""
                    chunk["choices"][0]["logprobs"] = {"content": [
                        {"token": content or "x", "logprob": rng.choice(logprobs), "bytes": [120], "top_logprobs": []}]}
                    if config is TRAIN:
                        chunk["choices"][0]["token_ids"] = [rng.randint(0, 10 ** 6)]
                events += machine.feed(chunk)
            events += machine.finish() if rng.random() < 0.8 else machine.context_overflow()
        except ApiError as exc:
            events += machine.fail(exc)
        for event in events:
            assert gym_vllm._sse_event(event) == f"event: {event['type']}\ndata: {gym_vllm._dumps(event)}\n\n".encode(), event


def test_nothing_after_done_is_relayed_even_where_a_run_of_text_chunks_follows_it():
    """A read that holds `[DONE]` before a run of text chunks (a server writing on after it) ends the stream at
    `[DONE]`, as reading it line by line does: the run after it is not converted."""
    first = [vllm_chunk_bytes({"role": "assistant", "content": ""})] + [vllm_chunk_bytes({"content": f"a{i}"}) for i in range(3)]
    after = [vllm_chunk_bytes({"content": f"b{i}"}) for i in range(4)]
    reads = [b"".join(b"data: %b\n\n" % data for data in first),
             b"data: %b\n\ndata: [DONE]\n\n" % vllm_chunk_bytes({"content": "c"}, chunk_id="chatcmpl-other")
             + b"".join(b"data: %b\n\n" % data for data in after)]
    reference = one_chunk_at_a_time(responses_framing(BASE), b"".join(reads))
    assert relayed(responses_framing(BASE), reads) == reference and b'"delta":"b0"' not in reference[0]


# --- token-ID streams: text chunks that carry their token's id and log-prob entry ----------------------------------

def vllm_token_chunk_bytes(text, token_id, logprob=-0.5, token=None, token_bytes=None, top_logprobs=(), more_ids=(), key="content",
                           **options) -> bytes:
    """A token-ID stream's text chunk as vLLM writes it (`return_token_ids`, `logprobs`, `return_tokens_as_token_ids`):
    vllm-cpu.md §4b-c, the log-prob entry between the delta and the finish reason, the id after it; with `more_ids`,
    several tokens in one chunk, as vLLM sends them when its engine is busy."""
    entries = [{"token": f"token_id:{token_id}" if token is None else token, "logprob": logprob,
                "bytes": list(text.encode()) if token_bytes is None else token_bytes, "top_logprobs": list(top_logprobs)}]
    entries += [{"token": f"token_id:{more}", "logprob": -1.25, "bytes": [], "top_logprobs": []} for more in more_ids]
    data = vllm_chunk_bytes({key: text}, **options)
    return data.replace(b'"logprobs":null,', b'"logprobs":%b,' % gym_vllm._dumps({"content": entries}).encode()).replace(
        b'"token_ids":null', b'"token_ids":%b' % gym_vllm._dumps([token_id, *more_ids]).encode())


ODD_LOGPROBS = [-1.1920928955078125e-07, -20.0, -1e-05, 0.0, -3.4e-120, -9999.0]


def random_token_stream_datas(rng):
    """vLLM `data:` payloads of a random token-ID stream: mostly text chunks with their id and log-prob entry, some
    whose parts the shortcut cannot take as they are (an entry of another shape, an id spelled oddly, invalid UTF-8,
    no id), and chunks of other shapes."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}).replace(b'"token_ids":null}]',
                                                                            b'"token_ids":null}],"prompt_token_ids":[1,2,3]')]
    datas += [vllm_token_chunk_bytes(text, rng.randint(0, 9), key="reasoning") for text in upstream_reasoning(rng)]
    think = think_texts(rng)
    for position in range(rng.randint(0, 60)):
        text = "".join(rng.choice(PLAIN_TEXT if rng.random() < 0.95 else SPECIAL_TEXT) for _ in range(rng.randint(0, 3)))
        token_id = rng.randint(0, 200_000)
        if position in think:
            datas.append(vllm_token_chunk_bytes(think[position], token_id))
            continue
        kind = rng.random() * 1.6 - 0.6  # mostly (and all below 0.75) the chunk of nearly every token
        if kind < 0.75:
            more_ids = [rng.randint(0, 9) for _ in range(rng.randint(1, 3))] if rng.random() < 0.1 else ()  # a busy engine's
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, rng.choice([-0.5, rng.uniform(-30, 0), *ODD_LOGPROBS]),
                                                more_ids=more_ids))
        elif kind < 0.78:
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, token=rng.choice(["a", "é", 'q"', "\n", ""])))
        elif kind < 0.8:
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, top_logprobs=[{"token": "x", "logprob": -1.0, "bytes": [120]}]))
        elif kind < 0.82:
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, token_bytes=[]))
        elif kind < 0.84:  # parts the pattern delimits that do not decode, or decode otherwise
            datas.append(vllm_token_chunk_bytes("ok", 7).replace(*rng.choice([
                (b'"ok"', b'"o\xffk"'), (b'"ok"', rng.choice(ODD_ESCAPES)), (b'"token_ids":[7]', b'"token_ids":[07]'), (b'"logprob":-0.5', b'"logprob":-0.5e999'),
                (b'"logprob":-0.5', b'"logprob":-.5'), (b'"bytes":[111,107]', b'"bytes":[111,,107]'),
                (b'"token":"token_id:7"', b'"token":"\xed\xa0\x80"'), (b'"token_ids":[7]', b'"token_ids":[7,8]'),
                (b'"token_ids":[7]', b'"token_ids":[7,]'), (b'"token_ids":[7]', b'"token_ids":[7,08]')])))
        elif kind < 0.85:  # a character split across two chunks: valid UTF-8 together, in neither alone
            datas += [vllm_token_chunk_bytes("o", 7).replace(b'"o"', b'"o\xc3"'), vllm_token_chunk_bytes("k", 8).replace(b'"k"', b'"\xa9k"')]
        elif kind < 0.87:
            datas.append(vllm_chunk_bytes({"content": text or "t"}))  # no id, no log prob
        elif kind < 0.89:  # another head, of another length or of the stream's
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, chunk_id=rng.choice(["chatcmpl-other", "chatcmpl-7f3b"])).replace(
                *rng.choice([(b"", b""), (b'"index":0', b'"index":1'), (b'"delta"', b'"DELTA"')])))  # the last: no text to take
        elif kind < 0.91:
            datas.append(vllm_token_chunk_bytes("", token_id).replace(  # a partial character, spelled two ways
                *rng.choice([(b'"delta":{"content":""}', b'"delta":{}'), (b"", b"")])))
        elif kind < 0.93:
            datas.append(vllm_chunk_bytes({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": text}}]}))
        elif kind < 0.95:
            datas.append(b'{"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}')
        else:
            datas.append(vllm_token_chunk_bytes(text or "t", token_id, finish_reason="stop"))
    datas.append(vllm_token_chunk_bytes("end", 5, finish_reason=rng.choice(["stop", "length"])))
    return datas


TOKEN_STREAMS = [(TRAIN, {"input": "q", "stream": True}),
                 (TRAIN, {"input": "q", "stream": True, "include": ["message.output_text.logprobs"], "top_logprobs": 0}),
                 (BASE, {"input": "q", "stream": True})]


@pytest.mark.parametrize("config, request_body", TOKEN_STREAMS, ids=["token-ids", "token-ids-and-output-logprobs", "no-token-ids"])
def test_a_token_id_stream_relayed_by_its_shortcuts_is_what_feeding_its_chunks_gives(config, request_body):
    """A token-ID stream's text chunks, taken one by one (`_token_event`) or a read's run at once (`_convert_token_run`),
    give byte for byte what decoding and feeding every chunk gives: the events, the token ids and log probs of the
    last item, the error a stream ends with; for random streams cut into random reads, chunks whose parts do not
    decode (or decode to something else than they look) among them."""
    rng = random.Random(12)
    taken = {"one": 0, "runs": 0}
    for _ in range(300):
        raw = sse_text(rng, random_token_stream_datas(rng), done=rng.random() < 0.95, noise=rng.random() < 0.2)
        reads = random_reads(rng, raw)
        sides = []
        for kind in (Feeding, gym_vllm._ResponsesSSE):
            framing = responses_framing(config, kind, request_body)
            if kind is not Feeding:
                ones, runs = taken_by(framing, "_token_event"), taken_by(framing, "_convert_token_run")
            sides.append((relayed(framing, reads), framing.sent))
        taken["one"] += len(ones)
        taken["runs"] += len(runs)
        assert sides[0] == sides[1], raw
        assert sides[1][1] == sides[1][0][0].count(b"\n\n")
    assert taken["one"] > 1500 and taken["runs"] > 60, taken


def test_a_token_id_stream_gives_the_ids_and_log_probs_it_carried():
    """The token fields of a token-ID stream relayed by its shortcuts: what its chunks carried, in order (one chunk
    with three tokens)."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}).replace(b'"token_ids":null}]', b'"token_ids":null}],"prompt_token_ids":[1,2]')]
    datas += [vllm_token_chunk_bytes(f"w{i}", 100 + i, -i / 8, more_ids=(500, 501) if i == 5 else ()) for i in range(12)]
    datas.append(vllm_token_chunk_bytes("", 99, -2.0, token_bytes=[], finish_reason="length").replace(b'"content":""', b''))
    raw = sse_text(random.Random(1), datas)
    framing = responses_framing(TRAIN)
    out, failure = relayed(framing, [raw[:raw.index(b"w3")], raw[raw.index(b"w3") - 150:][150:]])  # w3 on: one read
    assert failure is None and framing.token_chunks
    final = gym_vllm._loads(out.rsplit(b"data: ", 1)[1])["response"]["output"][-1]
    assert final["generation_token_ids"] == [100, 101, 102, 103, 104, 105, 500, 501] + [100 + i for i in range(6, 12)] + [99]
    assert final["generation_log_probs"] == [-i / 8 for i in range(6)] + [-1.25, -1.25] + [-i / 8 for i in range(6, 12)] + [-2.0]
    assert final["prompt_token_ids"] == [1, 2] and final["content"][0]["text"] == "".join(f"w{i}" for i in range(12))


def test_a_token_id_streams_reasoning_chunks_are_held_as_a_run():
    """vLLM's own reasoning field in a token-ID stream (`--reasoning-parser` with `return_token_ids`, as GRPO on a
    thinking model runs): a read of its chunks is held as one run, their ids and log probs collected in order, byte
    for byte what decoding and feeding every chunk gives."""
    role = vllm_chunk_bytes({"role": "assistant", "content": ""}).replace(b'"token_ids":null}]', b'"token_ids":null}],"prompt_token_ids":[1]')
    reads = [b"data: %b\n\n" % data for data in [role, vllm_token_chunk_bytes("r0", 10, key="reasoning")]]
    reads.append(b"".join(b"data: %b\n\n" % vllm_token_chunk_bytes(f" r{i}", 10 + i, -i / 4, key="reasoning") for i in range(1, 7)))
    reads.append(b"".join(b"data: %b\n\n" % data for data in [
        vllm_token_chunk_bytes("answer", 50), vllm_token_chunk_bytes("", 51, -2.0, token_bytes=[], finish_reason="stop")
        .replace(b'"content":""', b'')]) + b"data: [DONE]\n\n")
    reads = [b"".join(reads[:2])] + reads[2:]
    framing = responses_framing(TRAIN)
    runs = taken_by(framing, "_convert_token_run")
    out, failure = relayed(framing, reads)
    assert (out, failure) == relayed(responses_framing(TRAIN, Feeding), reads) and failure is None
    assert runs == [b""]  # the second read: six chunks held at once
    final = gym_vllm._loads(out.rsplit(b"data: ", 1)[1])["response"]["output"]
    assert final[0]["content"][0]["text"] == "r0" + "".join(f" r{i}" for i in range(1, 7))
    assert final[-1]["generation_token_ids"] == [*range(10, 17), 50, 51]
    assert final[-1]["generation_log_probs"] == [-0.5, *(-i / 4 for i in range(1, 7)), -0.5, -2.0]


def test_a_streams_end_writes_its_log_probs_once(monkeypatch):
    """The last item is in two events at a stream's end (output_item.done, the final response): its log probs, the
    costliest part of it to write as json does, are written once for both, and both carry them."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}).replace(b'"token_ids":null}]', b'"token_ids":null}],"prompt_token_ids":[1]')]
    datas += [vllm_token_chunk_bytes(f"w{i}", 100 + i, -i / 8 - 1e-7) for i in range(6)]
    datas.append(vllm_token_chunk_bytes("", 99, -2.0, token_bytes=[], finish_reason="stop").replace(b'"content":""', b''))
    framing = responses_framing(TRAIN)
    framing.start()
    for data in datas:
        framing.convert(data)
    written = []
    monkeypatch.setattr(gym_vllm, "_number_list_json", lambda values: written.append(values) or gym_vllm._dumps(values).encode())
    events = [gym_vllm._loads(event.split(b"\ndata: ")[1]) for event in framing.finish().split(b"\n\n")[:-1]]
    expected = [-i / 8 - 1e-7 for i in range(6)] + [-2.0]
    assert events[-2]["item"]["generation_log_probs"] == events[-1]["response"]["output"][-1]["generation_log_probs"] == expected
    log_probs_written = [values for values in written if values == expected]  # (the ids are written to check them)
    assert len(log_probs_written) == (1 if gym_vllm._msgspec else 0)  # the standard library's path writes events whole


def test_a_long_reasoning_block_is_held_in_pieces_not_copied_whole_at_every_chunk():
    """Each chunk of a leading `<think>` block is kept as a piece and only its text (with the block's last characters)
    searched for `</think>`: before, the held text was copied and searched whole at every chunk, so that a block of n
    chunks cost n squared."""
    machine = gym_vllm.ResponsesStream({"input": "q", "stream": True}, BASE)
    machine.start()
    assert machine.feed(chunk({"content": "<think>"})) == []
    steps = [f"step {i} </thin" if i % 7 == 0 else f"step {i} <" for i in range(5000)]
    for step in steps:
        assert machine.feed(chunk({"content": step})) == []
    assert machine.held == "<think>" and len(machine.held_pieces) == 5000
    events = machine.feed(chunk({"content": "</think>the answer"}))
    reasoning = next(e for e in events if e["type"] == "response.output_item.added")
    assert reasoning["item"]["type"] == "reasoning"
    assert [e["text"] for e in events if e["type"] == "response.reasoning_text.done"] == ["".join(steps)]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["the answer"]


def test_long_reasoning_from_vllms_parser_and_long_arguments_are_kept_in_pieces():
    """vLLM's own reasoning deltas and a function call's argument deltas are kept as pieces and joined once (+= on a str
    copied the whole text at every chunk): the reasoning item and the call carry all of it, also when the stream fails
    in the middle of the call's arguments."""
    reasoning = [f"thought {i}. " for i in range(3000)]
    arguments = ['{"code": "'] + [f"line {i}\\n" for i in range(3000)]
    chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"reasoning": piece}) for piece in reasoning]
    chunks.append(chunk({"tool_calls": [{"index": 0, "id": "call_9", "function": {"name": "run", "arguments": ""}}]}))
    chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}) for piece in arguments]
    for ends in ("finish", "fail"):
        machine = gym_vllm.ResponsesStream({"input": "q", "stream": True}, BASE)
        events = machine.start()
        for c in chunks:
            events += machine.feed(c)
        assert len(machine.arguments) == len(arguments)
        if ends == "finish":
            events += machine.feed(chunk({}, "tool_calls")) + machine.finish()
            final = check_lifecycle(events)
        else:
            events += machine.fail(gym_vllm.upstream_error("engine died"))
            final = events[-1]["response"]
        assert final["output"][0]["content"][0]["text"] == "".join(reasoning)
        assert final["output"][1]["arguments"] == "".join(arguments)
        assert "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta") == "".join(arguments)


@pytest.mark.parametrize("config", [BASE, NO_PARSER], ids=["parser", "no-parser"])
def test_vllms_reasoning_after_the_message_began_or_without_the_parser_is_a_502_also_by_its_bytes(config):
    """vLLM's reasoning field is held for the reasoning item only before any content; after it (or where the server does
    not expect the field: `uses_reasoning_parser: false`) the stream fails with a 502, whether the chunk is decoded and
    fed or recognized by its bytes (`_reasoning_event`)."""
    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}), vllm_chunk_bytes({"reasoning": "first"}),
             vllm_chunk_bytes({"content": "answer"}), vllm_chunk_bytes({"reasoning": "late"}), vllm_chunk_bytes({}, "stop")]
    raw = sse_text(random.Random(2), datas)
    sides = [one_chunk_at_a_time(responses_framing(config, kind), raw) for kind in (Feeding, gym_vllm._ResponsesSSE)]
    assert sides[0] == sides[1]
    status, message = sides[1][1]
    assert status == 502 and ("precedes all content" in message if config is BASE else "--reasoning-parser" in message)
    assert (b'"text":"first"' in sides[1][0]) == (config is BASE)


@pytest.mark.parametrize("tokens", [False, True], ids=["text", "token-ids"])
def test_vllms_reasoning_chunks_are_held_by_their_bytes(tokens):
    """A stream that leads with vLLM's reasoning field (its `--reasoning-parser`, as for templates that open `<think>`
    in the prompt): those chunks are recognized by their bytes and held, not decoded and fed, with what feeding them
    gives (the reasoning item; with token IDs, their ids and log probs on the last item)."""
    def chunk_of(key, text, token_id):
        return vllm_token_chunk_bytes(text, token_id, key=key) if tokens else vllm_chunk_bytes({key: text})

    datas = [vllm_chunk_bytes({"role": "assistant", "content": ""}).replace(b'"token_ids":null}]', b'"token_ids":null}],"prompt_token_ids":[1]')]
    datas += [chunk_of("reasoning", text, 10 + i) for i, text in enumerate(["step", " one\n", ' "two"', " é"] * 5)]
    datas += [chunk_of("content", f"w{i}", 50 + i) for i in range(6)] + [vllm_chunk_bytes({}, "stop")]
    raw = sse_text(random.Random(3), datas)
    config = TRAIN if tokens else BASE
    reference = one_chunk_at_a_time(responses_framing(config, Feeding), raw)
    framing = responses_framing(config)
    feeds = []
    feed = framing.machine.feed
    framing.machine.feed = lambda chunk: feeds.append(chunk) or feed(chunk)
    assert one_chunk_at_a_time(framing, raw) == reference and reference[1] is None
    assert len(feeds) == 3  # the first chunk (its head), the first text (it ends the reasoning), the finish
    final = gym_vllm._loads(reference[0].rsplit(b"data: ", 1)[1])["response"]
    assert final["output"][0]["content"][0]["text"] == 'step one\n "two" é' * 5
    if tokens:
        assert final["output"][-1]["generation_token_ids"] == [*range(10, 30), *range(50, 56)]
