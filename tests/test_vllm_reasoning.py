"""A real `vllm serve` with its own reasoning parser (`--reasoning-parser deepseek_r1`), as thinking models are served:
vLLM sends what comes before the first `</think>` in its `reasoning` field, not in the content.

The tiny model writes gibberish. Sampling is seeded and limited to a few tokens (`allowed_token_ids`: letters, a quote,
a backslash, a newline, the two bytes of `é` and `</think>`), so every reply is reproducible, has escapes and split
characters in it, and most replies end their reasoning part way (`REPLIES` says which seeds do).
"""

import json
import urllib.request

import aiohttp
import openai
import pytest

import gym_vllm

from conftest import VLLM_API_KEY, assert_openai_error, server_config, strict_client
from test_stream import ChatRewriting, Feeding, reads_of, relayed, responses_framing, taken_by

pytestmark = pytest.mark.vllm

HEADERS = {"Authorization": f"Bearer {VLLM_API_KEY}", "Content-Type": "application/json"}
SEEDS = range(6)


@pytest.fixture(scope="module")
def allowed_tokens(vllm_reasoning_engine) -> list[int]:
    body = {"model": "tiny", "prompt": 'the quick "brown" fox\njumps\\ over é</think>', "add_special_tokens": False}
    request = urllib.request.Request(vllm_reasoning_engine.removesuffix("/v1") + "/tokenize", json.dumps(body).encode(), HEADERS)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["tokens"]


def sampled(seed: int, allowed: list[int], tokens: int = 40) -> dict:
    """The sampling fields of a request, for /v1/responses (`extra_body`) and vLLM alike."""
    return {"temperature": 1.0, "seed": seed, "allowed_token_ids": allowed, "max_tokens": tokens}


async def direct_reply(engine: str, seed: int, allowed: list[int]) -> dict:
    """vLLM's own chat completion of the request the tests send through gym_vllm, with its token ids and log probs."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine}/chat/completions", headers=HEADERS, json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], **sampled(seed, allowed),
                "logprobs": True, "top_logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True}) as answer:
            assert answer.status == 200
            return await answer.json()


def responses_request(seed: int, allowed: list[int]) -> dict:
    fields = sampled(seed, allowed)
    return {"model": "tiny", "input": "hi", "max_output_tokens": fields.pop("max_tokens"),
            "temperature": fields.pop("temperature"), "extra_body": fields}


def without_ids(items: list) -> list[dict]:
    return [{k: v for k, v in item.model_dump().items() if k != "id"} for item in items]


async def test_vllms_reasoning_field_is_the_reasoning_item_streamed_or_not(vllm_reasoning_engine, proxy, allowed_tokens):
    """What vLLM's parser puts in `reasoning` is the reasoning item's text, its content the message's; with token IDs the
    last item carries vLLM's ids and log probs of every generated token, the reasoning's included. A stream's final
    response holds the same items (its reasoning held while vLLM sends it, then sent as one item), its events in order."""
    transitions = 0
    for ids in (False, True):
        client = strict_client(await proxy(server_config(vllm_reasoning_engine, return_token_id_information=ids)))
        for seed in SEEDS:
            direct = await direct_reply(vllm_reasoning_engine, seed, allowed_tokens)
            message, choice = direct["choices"][0]["message"], direct["choices"][0]
            response = await client.responses.create(**responses_request(seed, allowed_tokens))
            reasoning = response.output[0]
            assert reasoning.type == "reasoning" and message["reasoning"]
            assert [part.text for part in reasoning.content] == [message["reasoning"]] == [part.text for part in reasoning.summary]
            assert response.output_text == (message["content"] or "")
            assert [item.type for item in response.output] == ["reasoning"] + ["message"] * bool(message["content"])
            transitions += bool(message["content"])
            if ids:
                bundle = response.output[-1].model_dump()
                assert bundle["generation_token_ids"] == choice["token_ids"] and len(choice["token_ids"]) == 40
                assert bundle["prompt_token_ids"] == direct["prompt_token_ids"]
                assert bundle["generation_log_probs"] == [entry["logprob"] for entry in choice["logprobs"]["content"]]
            else:
                assert "generation_token_ids" not in response.output[-1].model_dump()

            events = [event async for event in await client.responses.create(stream=True, **responses_request(seed, allowed_tokens))]
            assert [event.sequence_number for event in events] == list(range(len(events)))
            assert events[-1].type == "response.incomplete"  # 40 tokens: the length limit
            assert without_ids(events[-1].response.output) == without_ids(response.output)
            deltas = [event.delta for event in events if event.type == "response.reasoning_text.delta"]
            assert "".join(deltas) == message["reasoning"]
            text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
            assert text == response.output_text
    assert transitions >= 4, "too few of the seeded replies end their reasoning: pick other SEEDS"


async def test_vllms_reasoning_field_reaches_chat_clients_as_a_think_block(vllm_reasoning_engine, proxy, allowed_tokens):
    """`/v1/chat/completions` clients get vLLM's reasoning back as a `<think>` block before the content (the reference's
    way), streamed or not."""
    client = strict_client(await proxy(server_config(vllm_reasoning_engine)))
    for seed in SEEDS[:3]:
        message = (await direct_reply(vllm_reasoning_engine, seed, allowed_tokens))["choices"][0]["message"]
        expected = f"<think>{message['reasoning']}</think>{message['content'] or ''}"
        request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **sampled(seed, allowed_tokens)}
        fields = {k: request[k] for k in ("model", "messages", "temperature", "seed", "max_tokens")}
        extra = {"allowed_token_ids": allowed_tokens}
        reply = await client.chat.completions.create(**fields, extra_body=extra)
        assert reply.choices[0].message.content == expected
        assert not (reply.choices[0].message.model_extra or {}).get("reasoning")
        chunks = [chunk async for chunk in await client.chat.completions.create(stream=True, **fields, extra_body=extra)]
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected


async def test_a_server_that_expects_no_reasoning_field_refuses_it(vllm_reasoning_engine, proxy, allowed_tokens):
    """`uses_reasoning_parser: false` in front of an engine that runs one: a 502 that names the mismatch and both
    fixes, streamed or not, never a reply without its reasoning."""
    client = strict_client(await proxy(server_config(vllm_reasoning_engine, uses_reasoning_parser=False)))
    with pytest.raises(openai.APIStatusError) as error:
        await client.responses.create(**responses_request(0, allowed_tokens))
    body = assert_openai_error(502, error.value.response.json())
    assert body["code"] == "reasoning_parser_mismatch" and "--reasoning-parser" in body["message"]
    events = [event async for event in await client.responses.create(stream=True, **responses_request(0, allowed_tokens))]
    assert events[-1].type == "response.failed" and "--reasoning-parser" in events[-1].response.error.message


async def stream_bytes(engine: str, request: dict, config) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine}/chat/completions", headers=HEADERS,
                             data=gym_vllm.request_json(gym_vllm.responses_request_to_chat(request, config))) as answer:
            assert answer.status == 200
            return await answer.read()


@pytest.mark.parametrize("ids", [False, True], ids=["text", "token-ids"])
async def test_a_real_reasoning_stream_relayed_by_its_shortcuts_is_what_feeding_its_chunks_gives(vllm_reasoning_engine, allowed_tokens, ids):
    """The bytes vLLM streams with its reasoning parser, in reads of 1, 3 and 8 chunks: the reasoning chunks held by
    their shortcuts (one by one, and a read's run at once) and the answer's after them give byte for byte the events
    (token ids and log probs included) that decoding and feeding every chunk gives."""
    config = server_config(vllm_reasoning_engine, return_token_id_information=ids)
    held_one_by_one, held_as_runs = [], []
    for seed in SEEDS:
        request = {"input": "hi", "stream": True, **sampled(seed, allowed_tokens, tokens=60)}
        raw = await stream_bytes(vllm_reasoning_engine, request, config)
        assert reads_of(raw, 1)[1].find(b'"delta":{"reasoning":"') > 0  # vLLM's parser at work
        for size in (1, 3, 8):
            reads = reads_of(raw, size)
            sides = []
            for kind in (Feeding, gym_vllm._ResponsesSSE):
                framing = responses_framing(config, kind, request)
                if kind is not Feeding:
                    held_one_by_one.append(taken_by(framing, "_reasoning_event"))
                    held_as_runs.append(taken_by(framing, "_convert_token_run" if ids else "convert_run"))
                sides.append(relayed(framing, reads))
            assert sides[0] == sides[1] and sides[1][1] is None
            assert sides[1][0].count(b"event: response.reasoning_text.done") == 1
    # Measured (they move a little: a busy engine sends two tokens in some chunks): ~100 (text) and ~430 (token IDs)
    # chunks held one by one; 225 reads held as runs of text chunks (two make one), 10-12 of token-ID chunks, whose runs
    # need 4 chunks (reads of 8) and no `"delta":{}` among them (the first byte of `é`, `</think>`: decoded and fed).
    assert sum(map(len, held_one_by_one)) >= 30 and sum(events == b"" for run in held_as_runs for events in run) >= 5


async def test_a_real_reasoning_stream_relayed_to_a_chat_client_by_its_shortcut_is_what_rewriting_its_chunks_gives(
        vllm_reasoning_engine, allowed_tokens):
    """The bytes vLLM streams with its reasoning parser, relayed to a `/v1/chat/completions` client in reads of 1 and 3
    chunks: its reasoning chunks rewritten from their bytes (`"reasoning"` becomes `"content"` inside the `<think>`
    block) give byte for byte what decoding and rewriting each gives."""
    config = server_config(vllm_reasoning_engine)
    rewritten = []
    for seed in SEEDS:
        body = gym_vllm.prepare_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                              **sampled(seed, allowed_tokens, tokens=60)}, config)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{vllm_reasoning_engine}/chat/completions", headers=HEADERS, data=gym_vllm.request_json(body)) as answer:
                assert answer.status == 200
                raw = await answer.read()
        for size in (1, 3):
            reads = reads_of(raw, size)
            framing = gym_vllm._ChatSSE(config)
            rewritten.append(taken_by(framing, "_reasoning_as_content"))
            out, failure = relayed(framing, reads)
            assert (out, failure) == relayed(ChatRewriting(config), reads) and failure is None
            assert out.count(b"<think>") == 1
    assert sum(map(len, rewritten)) >= 100  # measured 348: every reasoning chunk but the first (and `"delta":{}`'s)
