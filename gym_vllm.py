"""gym_vllm: the OpenAI Responses API in front of self-hosted vLLM, for agent rollouts and RL training.

Run it::

    python -m gym_vllm --config configs/vllm_model.yaml [--env env.yaml] [--host H] [--port P]
    python -m gym_vllm --help          # every option, and every config key with its type, default and meaning

Collect rollouts from a JSONL of requests (NeMo Gym's format; re-run to resume)::

    python -m gym_vllm collect --url http://127.0.0.1:8080/v1 --input in.jsonl --output out.jsonl

Use it from the official SDK::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    response = client.responses.create(model="any", input="Hello")

Embed it in your own event loop::

    import gym_vllm
    [config] = gym_vllm.load_config(["configs/vllm_model.yaml"])
    runner = await gym_vllm.start_server(config)      # serving now
    ...
    await runner.cleanup()

The module reads top to bottom in data-flow order: errors, JSON in and out, config, request conversion
(Responses -> Chat Completions), response conversion (Chat Completions -> Responses, the ``<think>``
parser, token IDs), stream conversion, backends (round-robin with session affinity), metrics (Prometheus
text), HTTP (aiohttp handlers), embedding API, rollout collection (``python -m gym_vllm collect``), CLI.
Every conversion is a pure function (dict in, dict out); I/O lives in the HTTP and collection sections only.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import difflib
import errno
import functools
import gc
import hashlib
import hmac
import itertools
import importlib.metadata
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import signal
import sys
import textwrap
import time
import urllib.parse
from typing import Any, Callable, Iterable, Mapping, Sequence, TypedDict

import aiohttp
import yaml
from aiohttp import web

__all__ = [
    "ApiError",
    "ConfigError",
    "ServerConfig",
    "ServerBlock",
    "ConfigKey",
    "ConfigPlace",
    "SERVER_KEYS",
    "config_key_rows",
    "load_config",
    "load_server_blocks",
    "server_config_from_dict",
    "responses_request_to_chat",
    "prepare_chat_request",
    "chat_response_to_responses",
    "chat_response_for_client",
    "context_overflow_response",
    "context_overflow_chat_response",
    "is_context_overflow",
    "split_think_blocks",
    "extract_token_info",
    "ResponsesStream",
    "ChatStreamRelay",
    "SessionTable",
    "Upstream",
    "Balancer",
    "build_app",
    "start_server",
    "serve",
    "collect",
    "collect_main",
    "CollectResult",
    "CollectError",
    "parse_input_line",
    "rollout_record",
    "resume_state",
    "main",
]

log = logging.getLogger("gym_vllm")


def _package_version() -> str:
    try:
        return importlib.metadata.version("gym-vllm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "0+unknown"


__version__ = _package_version()

TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


# ============================================================================================
# Errors: every failure a client can see is one of these, rendered as OpenAI error JSON.
# ============================================================================================


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def upstream_error(message: str, code: str = "upstream_error", status: int = 502) -> ApiError:
    return ApiError(status, message, code=code)


class ConfigError(Exception):
    """A config problem, reported as one line naming the file (and line, where YAML knows it), the key and the fix."""


# ============================================================================================
# JSON in and out: the standard library's, or msgspec's when installed, with the same results.
# ============================================================================================

def _json_encoder() -> Callable[[Any], str]:
    """`json.dumps(value, ensure_ascii=False, separators=(",", ":"))`: the same text, faster.

    JSONEncoder.encode builds its C encoder on every call (argument parsing, a closure): built once here, a call costs
    ~0.7 us less. Everything encoded here is a tree built from decoded JSON, never a cycle, so the encoder keeps no
    cycle bookkeeping (an id per container): 2% of a request."""
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
    if json.encoder.c_make_encoder is None:  # a Python built without the _json accelerator
        return encoder.encode
    # The arguments JSONEncoder.iterencode passes: markers (None: no cycle check), default, the string encoder, indent,
    # key and item separators, sort_keys, skipkeys, allow_nan.
    encode_chunks = json.encoder.c_make_encoder(None, encoder.default, json.encoder.encode_basestring, None, ":", ",",
                                                False, False, True)
    return lambda value: "".join(encode_chunks(value, 0))


_dumps = _json_encoder()
_json_string = json.encoder.encode_basestring  # what _dumps does with a str, minus two calls


def _optional_msgspec() -> Any:
    """msgspec when installed (vLLM depends on it; `pip install gym-vllm[fast]` otherwise) unless GYM_VLLM_JSON=stdlib,
    else None: the standard library does everything, with the same results."""
    if os.environ.get("GYM_VLLM_JSON", "auto") == "stdlib":
        return None
    try:
        import msgspec
    except ImportError:
        return None
    return msgspec


_msgspec = _optional_msgspec()
JSON_CODEC = "msgspec" if _msgspec else "json"  # named in benchmark headers and the CLI's debug log


# What a request (a client's body, an input line of `collect`) or a reply (vLLM's, or a server's for `collect`) holds when
# it cannot be sent on or written as UTF-8. vLLM's text is decoded from UTF-8 and never holds one: a reply that does is
# a 502 (or a failed rollout), not a 500 (or a crashed `collect`).
_LONE_SURROGATE_ESCAPE = "holds a lone UTF-16 surrogate escape (like \\ud800) in a string"
LONE_SURROGATE = _LONE_SURROGATE_ESCAPE + "; no UTF-8 text can carry it: send a complete pair or the character itself"
LONE_SURROGATE_IN_REPLY = _LONE_SURROGATE_ESCAPE + ", which no UTF-8 text can carry"


def _holds_lone_surrogate(raw: bytes | str, value: Any) -> bool:
    """Whether `value`, decoded from `raw`, holds a str that cannot be encoded as UTF-8.

    `"\\ud800"` is valid JSON and json.loads makes it such a str: refused where it comes in, not a 500 (or a crashed
    `collect`) when it is sent on. Checked in full only when `raw` has a surrogate escape at all; pairs, which clients
    that escape non-ASCII send for emoji, are fine."""
    markers = (b"\\ud", b"\\uD") if isinstance(raw, bytes) else ("\\ud", "\\uD")
    if raw.find(markers[0]) < 0 and raw.find(markers[1]) < 0:  # find, not in: see _respelled
        return False
    try:
        _dumps(value).encode()
    except UnicodeEncodeError:
        return True
    return False


class LoneSurrogate(ValueError):
    """Valid JSON that holds a str no UTF-8 text can carry (LONE_SURROGATE)."""


# JSON has no NaN or infinities, and a reply must never hold one (json would write NaN, Infinity: not JSON). json.loads
# reads the literals NaN, Infinity, -Infinity and reads a float too large for a double (1e400) as an infinity; msgspec
# refuses all of them, and so does json here. Only a float literal with a 3-digit exponent, or with 210 digits in a row
# (with an exponent of at most 99, one is too large from 210 digits before its point: 1, 210 zeros and e99), may be
# such a float (or a string's text, or a small number): only then is the text read again, each float checked.
_FLOAT_TOO_LARGE = re.compile(r"[eE][-+]?[0-9]{3}|[0-9]{210}")


def _refuse_constant(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{literal[:24]}{'…' if len(literal) > 24 else ''} is too large for a float")
    return value


def _json_decoder() -> Callable[..., Any]:
    """`decode(raw, schema=None, sendable=False)`: msgspec's decoder when there is msgspec, else json.loads. Values are
    identical either way: msgspec is stricter (NaN, 1e400, a BOM, lone surrogates), and what it refuses json decides.
    Nesting too deep for either is a ValueError, like any other bad JSON, never a crash.

    With msgspec and a TypedDict `schema`, only what the schema names is decoded (objects it does not describe are
    skipped, not built); a document of another shape is decoded in full, as without a schema.

    `sendable`: what is decoded is sent on or written as UTF-8 (a request, vLLM's reply), so a str holding a lone
    surrogate escape raises LoneSurrogate. Only json makes such a str: what msgspec decodes needs no search of the whole
    text for one (~1 us a KB, 20 us for a 4-turn token history)."""
    msgspec = _msgspec

    def loads(raw: bytes | str, schema: type | None = None, sendable: bool = False) -> Any:
        try:
            if msgspec is not None:
                try:
                    return (typed_decoder(schema) if schema else fast)(raw)
                # ValidationError, a document of another shape, is a DecodeError too; invalid UTF-8 in a string is
                # msgspec's own UnicodeDecodeError, whose message json gives as every other's (its place in the body)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    if schema:
                        return loads(raw, sendable=sendable)
            # Decoded strictly here: json.loads would decode bytes with `surrogatepass`, making a lone surrogate of
            # UTF-8 that encodes one (ED A0 80), which is invalid UTF-8 and which msgspec refuses as such.
            text = raw.decode(json.detect_encoding(raw)) if raw.__class__ is bytes else raw
            value = json.loads(text, parse_constant=_refuse_constant)
            if _FLOAT_TOO_LARGE.search(text) is not None:  # perhaps a float json reads as an infinity: read exactly
                json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        if sendable and _holds_lone_surrogate(text, value):  # the text: a UTF-16 body's bytes spell `\ud` apart
            raise LoneSurrogate(LONE_SURROGATE)
        return value

    if msgspec is None:
        return loads
    fast = msgspec.json.Decoder().decode
    typed_decoder = functools.lru_cache(maxsize=8)(lambda schema: msgspec.json.Decoder(schema).decode)
    return loads


# JSON bodies in: 3-4x faster with msgspec (vLLM's log-prob replies are tens of KB).
_loads = _json_decoder()

# msgspec writes every str, int, bool and null as json does, and every float with the same shortest digits, but spells
# the exponent forms differently (1e16 for 1e+16, 1e-7 for 1e-07, 0.00001 for 1e-05) and infinities and NaN as null.
# Encoding with it is exact where no float can be, and in lists of numbers once those spellings are rewritten.
_msgspec_encode = _msgspec.json.Encoder().encode if _msgspec else None
_FLOAT_SPELLINGS = (  # msgspec's spelling -> json's (float.__repr__), within a list of numbers
    (re.compile(rb"e(?=[0-9])"), rb"e+"),                                # 1e16 -> 1e+16
    (re.compile(rb"e-(?=[0-9](?![0-9]))"), rb"e-0"),                      # 1e-7 -> 1e-07
)
# An exponent that is not one negative digit (1e16, 1e-10): where one, replacing every `e-` by `e-0` would be wrong.
_EXPONENT_BUT_ONE_NEGATIVE_DIGIT = re.compile(rb"e(?:[0-9]|-[0-9][0-9])")
# `e-` as a pattern: sre replaces it ~35% faster than bytes.replace, which restarts its search setup at every match.
_E_MINUS = re.compile(rb"e-")
# 0.000012 -> 1.2e-05, 0.00001 -> 1e-05 (exponent -5 only); the look-behind comes second, so that the search starts
# from the literal `0.0000` (10x faster). The two patterns above use no group: a template with groups costs ~1 us a
# call (Python 3.11 expands it in Python), a function ~0.5 us a match; these numbers are rarer.
_EXPONENT_MINUS_5 = re.compile(rb"0\.0000(?<![0-9.]0\.0000)([0-9])([0-9]*)")


def _exponent_minus_5(match: re.Match) -> bytes:
    first, rest = match.groups()
    return first + b"." + rest + b"e-05" if rest else first + b"e-05"


class _NoText:
    """Without msgspec no JSON value is kept as its text: the class of no value."""


# A JSON value that msgspec keeps as its text where a decoding schema asks (a reply's token ids), and writes back as it
# came; `value in _NULLS`: null, decoded or kept as text.
_JsonText = _msgspec.Raw if _msgspec else _NoText
_NULLS = (None, _msgspec.Raw(b"null")) if _msgspec else (None,)
# A log-prob entry of vLLM's reply as a Response reads it (CompletionForResponse): its token and log prob, absent
# ones None; other fields skipped. No cycle can go through one: the collector need not track it (gc=False).
_LogprobRead = (_msgspec.defstruct("_LogprobRead", [("token", Any, None), ("logprob", Any, None)], gc=False)
                if _msgspec else _NoText)
# A JSON list of log-prob entries (a token-ID stream's, _ResponsesSSE.read_entries) as _LogprobRead.
_read_logprob_entries = _msgspec.json.Decoder(list[_LogprobRead]).decode if _msgspec else None


def _respelled(raw: bytes) -> bytes | None:
    """msgspec's text of numbers (or of lists of them) with every float spelled as json spells it; None where it holds
    `null` (an infinity or NaN, which json writes as Infinity or NaN). Every check is a pass over the text (~1 us for 64
    log probs): one-byte searches (memchr) come first, and text with no `.` (token ids) needs no search for `0.0000`,
    the slow one (~0.5 us a KB of digits).

    `raw.find(x) >= 0`, not `x in raw`: bytes' `in` first tries `x` as an integer, and makes and drops a TypeError
    (~0.1 us, a tenth of a token-ID reply's searches)."""
    if raw.find(b"n") >= 0:
        return None
    if raw.find(b"e") >= 0:
        if _EXPONENT_BUT_ONE_NEGATIVE_DIGIT.search(raw) is None:  # -6..-9, as in most log probs: a search and a
            raw = _E_MINUS.sub(b"e-0", raw)                      # replace cost 40% less than the two rewrites
        else:
            for pattern, spelling in _FLOAT_SPELLINGS:
                raw = pattern.sub(spelling, raw)
    if raw.find(b".") >= 0 and raw.find(b"0.0000") >= 0:
        raw = _EXPONENT_MINUS_5.sub(_exponent_minus_5, raw)
    return raw


def _number_list_json(values: list) -> bytes:
    """`_dumps(values).encode()` for a list of ints and floats, such as log probs, ~3x faster with msgspec: json spells
    a float with float.__repr__, whose shortest-digits search costs ~0.4 us a float."""
    if _msgspec_encode is None:
        return _dumps(values).encode()
    return _respelled(_msgspec_encode(values)) or _dumps(values).encode()


_PLAIN_VALUES = frozenset({str, int, bool, type(None)})  # written alike by json and msgspec
_INTS, _NUMBERS, _STRS = (int,), (int, float), (str,)


def _only(values: list, types: tuple) -> bool:
    """Every element's exact type is one of `types` (bool is not an int here). Token lists run to thousands of
    entries: their types are listed and counted in C, with no Python frame per element (unlike `all(<generator>)`).
    Counting the first element's type is a pointer comparison per element, a third fewer instructions than making a
    set of the types, which only lists of mixed types need (log probs with an integer 0)."""
    kinds = list(map(type, values))
    return not kinds or kinds[0] in types and (kinds.count(kinds[0]) == len(kinds) or set(kinds).issubset(types))


# Where json and msgspec can write a value apart, msgspec's text shows an exponent (1e-7, 1e16 where json writes 1e-07,
# 1e+16), the -5 exponent written out (0.00001 where json writes 1e-05) or null (also NaN and infinities). Inside
# strings they are false alarms, which cost only json's writing. Three searches: one regular expression with the three
# alternatives costs 4x more, as it tries each at every byte.
_EXPONENT = re.compile(rb"e[-0-9]")


def _written_alike(value: Any) -> bool:
    """Whether json and msgspec write `value` alike without looking inside: a str, int, bool, null, an empty container
    or a float with no exponent in either spelling."""
    kind = value.__class__
    return (kind in _PLAIN_VALUES or (kind in (list, dict) and not value)
            or (kind is float and (1e-4 <= abs(value) < 1e16 or value == 0)))


def _exact(value: Any) -> Any:
    """`value` for msgspec to write exactly as json does: itself when `_written_alike`, else its JSON text (a
    msgspec.Raw) as msgspec writes it (~6x faster than json for a tool definition), where

    - text with no string in it (lists of numbers: token ids, log probs) has its floats respelled by `_respelled`:
      every exponent and `0.0000` in it is a number's (true and false have no `e` before a digit or `-`), which one
      memchr pass tells, with no second pass over a history's token ids element by element (`_token_bundle`'s);
    - any other text that shows a spelling json writes apart is written by json instead."""
    if _written_alike(value):
        return value
    raw = _msgspec_encode(value)
    if raw.find(b'"') < 0:
        raw = _respelled(raw) or _dumps(value).encode()
    elif raw.find(b"null") >= 0 or raw.find(b"0.0000") >= 0 or _EXPONENT.search(raw):  # find: see _respelled
        raw = _dumps(value).encode()
    return _msgspec.Raw(raw)


def request_json(body: dict) -> bytes:
    """A request body for vLLM as JSON: exactly `_dumps(body).encode()`, several times faster with msgspec on long
    histories. Messages whose values are all strings (or null, int, bool) are written as they are; the values of any
    other message (content parts, tool calls, the token ids and log probs of earlier turns) and the top-level values
    (tool definitions, response formats) as `_exact` makes them."""
    if _msgspec_encode is None:
        return _dumps(body).encode()
    exact = {}
    for key, value in body.items():
        if key == "messages" and value.__class__ is list:
            value = [message if message.__class__ is dict and set(map(type, message.values())) <= _PLAIN_VALUES
                     else {k: v if v.__class__ in _PLAIN_VALUES else _exact(v) for k, v in message.items()}
                     if message.__class__ is dict else _exact(message) for message in value]
        elif value.__class__ not in _PLAIN_VALUES:  # most values are: checked here before a call
            value = _exact(value)
        exact[key] = value
    return _msgspec_encode(exact)


# ============================================================================================
# Config: NeMo Gym's shape, `<server>: {responses_api_models: {vllm_model: {...}}}`.
# ============================================================================================

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One model server: where it listens, which vLLM endpoints it fronts, and how it converts.

    Each field but `name` and `source` is a YAML key; SERVER_KEYS below says what it takes and means.
    """

    name: str
    base_url: tuple[str, ...]
    api_key: str
    model: str
    return_token_id_information: bool
    uses_reasoning_parser: bool
    replace_developer_role_with_system: bool = False
    chat_template_kwargs: dict | None = None
    extra_body: dict | None = None
    propagate_context_overflow_errors: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    connect_timeout_s: float = 10.0
    # Generations can run for many minutes; a bound still keeps a wedged engine from hanging a rollout forever.
    request_timeout_s: float | None = 3600.0
    max_request_body_mb: float = 64.0
    session_table_size: int = 100_000
    session_idle_timeout_s: float = 3600.0
    stream_idle_timeout_s: float | None = 600.0
    health_check_interval_s: float | None = 5.0
    eject_after_failures: int = 3
    readmit_after_successes: int = 2
    max_attempts: int = 3
    max_concurrent_requests_per_upstream: int = 0
    server_api_key: str | None = None
    shutdown_timeout_s: float = 30.0
    source: str = dataclasses.field(default="<python>", compare=False)

    def __repr__(self) -> str:  # keeps the api_key out of logs and tracebacks
        fields = ", ".join(
            f"{f.name}={'***' if f.name in ('api_key', 'server_api_key') and getattr(self, f.name) else repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
        )
        return f"ServerConfig({fields})"


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One YAML key of a server block. Validation, `--help` and README.md's tables all read these.

    The default (or "required") comes from the config dataclass's field, so it is written once.
    """

    name: str
    types: tuple       # accepted Python types; type(None): null is allowed
    expected: str      # completes "expected ..., got <value>"
    meaning: str
    field: str = ""    # the dataclass field it fills, where that name differs

    @property
    def field_name(self) -> str:
        return self.field or self.name


_TYPE_WORDS = {str: "string", bool: "bool", int: "int", float: "number", dict: "mapping", list: "list"}


def _default_of(key: ConfigKey, config_class: type) -> Any:
    """The default of the dataclass field a key fills; dataclasses.MISSING for a required key."""
    return {field.name: field.default for field in dataclasses.fields(config_class)}[key.field_name]


def _required_keys(keys: Iterable[ConfigKey], config_class: type) -> tuple[str, ...]:
    return tuple(key.name for key in keys if _default_of(key, config_class) is dataclasses.MISSING)


def _yaml_text(value: Any) -> str:
    """A default as YAML writes it: `true`, `null`, `3600`, `["a", "b"]`."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def config_key_rows(keys: Iterable[ConfigKey], config_class: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for each key: the rows of `--help`'s key groups and README.md's tables."""
    rows = []
    for key in keys:
        words = [_TYPE_WORDS[t] for t in key.types if t is not type(None) and not (t is int and float in key.types)]
        type_text = " or ".join(words) + (" or null" if type(None) in key.types else "")
        default = _default_of(key, config_class)
        rows.append((key.name, type_text, "required" if default is dataclasses.MISSING else _yaml_text(default), key.meaning))
    return rows


SERVER_KEYS: dict[str, ConfigKey] = {key.name: key for key in (
    ConfigKey("base_url", (str, list), "a URL, a list of URLs or a comma-separated string",
              "vLLM's OpenAI base URL(s), e.g. `http://127.0.0.1:8000/v1`: one, a list, or `\"a,b\"`"),
    ConfigKey("api_key", (str,), "a string", "the `--api-key` of `vllm serve` (never logged, never in error bodies)"),
    ConfigKey("model", (str,), "a string", "model name sent to vLLM and reported in replies"),
    ConfigKey("return_token_id_information", (bool,), "true or false",
              "token IDs and log probs on every reply, for RL training"),
    ConfigKey("uses_reasoning_parser", (bool,), "true or false", "split `<think>…</think>` into reasoning items"),
    ConfigKey("replace_developer_role_with_system", (bool,), "true or false",
              "rewrite `developer` messages as `system` (for templates without a developer role)"),
    ConfigKey("chat_template_kwargs", (dict, type(None)), "a mapping or null",
              "baseline template kwargs, e.g. `{enable_thinking: false}`; the request's own field and "
              "`metadata.chat_template_kwargs` (a JSON string) override key by key"),
    ConfigKey("extra_body", (dict, type(None)), "a mapping or null",
              "extra fields for every vLLM request; request fields and `metadata.extra_body` (a JSON string) win; "
              "`null` entries are ignored; JSON values only (quote a date, or a key YAML reads as a bool such as `on`)"),
    ConfigKey("propagate_context_overflow_errors", (bool,), "true or false",
              "return vLLM's context-length 400 instead of an empty incomplete reply"),
    ConfigKey("host", (str,), "a string", "listen address (`0.0.0.0`: all interfaces); CLI `--host` for a single server"),
    ConfigKey("port", (int,), "an integer", "listen port (`0`: a free one); CLI `--port` for a single server"),
    ConfigKey("connect_timeout_s", (int, float), "a number of seconds", "TCP connect timeout to vLLM"),
    ConfigKey("request_timeout_s", (int, float, type(None)), "a number of seconds or null",
              "total time for one vLLM call (null: none); a timeout is a 504"),
    ConfigKey("max_request_body_mb", (int, float), "a number of megabytes", "larger request bodies get a 413"),
    ConfigKey("session_table_size", (int,), "an integer",
              "sessions remembered for affinity (the least recently used are dropped)"),
    ConfigKey("session_idle_timeout_s", (int, float), "a number of seconds", "a session idle this long is forgotten"),
    ConfigKey("stream_idle_timeout_s", (int, float, type(None)), "a number of seconds or null",
              "a stream from vLLM silent this long is cut (`response.failed`); vLLM sends every token, so only a "
              "wedged engine is this quiet"),
    ConfigKey("health_check_interval_s", (int, float, type(None)), "a number of seconds or null",
              "background `GET /health` of every upstream; null: passive detection only"),
    ConfigKey("eject_after_failures", (int,), "an integer",
              "failures in a row (health checks, refused connections, 502/503/504) before an upstream is ejected"),
    ConfigKey("readmit_after_successes", (int,), "an integer",
              "good health checks in a row before an ejected upstream takes traffic again"),
    ConfigKey("max_attempts", (int,), "an integer",
              "tries per request, on other upstreams, only when the failed one cannot have seen it "
              "(connection refused) or said 503"),
    ConfigKey("max_concurrent_requests_per_upstream", (int,), "an integer (0: no limit)",
              "`0`: no limit; otherwise requests beyond it wait for a connection (a queue, not a failure)"),
    ConfigKey("server_api_key", (str, type(None)), "a string or null",
              "clients must send `Authorization: Bearer <key>` (constant-time check; `GET /health` stays open); never logged; "
              "null: open to whoever reaches `host`"),
    ConfigKey("shutdown_timeout_s", (int, float), "a number of seconds",
              "on Ctrl-C/SIGTERM, in-flight requests get this long to finish"),
)}
_IGNORED_KEYS = ("entrypoint",)  # NeMo Gym's launcher key: accepted, meaningless here
_REQUIRED_KEYS = _required_keys(SERVER_KEYS.values(), ServerConfig)


@dataclasses.dataclass(frozen=True)
class ConfigPlace:
    """Where a config value is, for errors: `configs/a.yaml:12: policy_model.responses_api_models.vllm_model.port`.

    `lines` maps key paths to the (file, line) the YAML put them at. A path without one (a missing key)
    takes its nearest parent's; a config built in Python has none and reads `source: path`.
    """

    source: str
    path: tuple[str | int, ...]
    lines: Mapping[tuple, tuple[str, int]] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def key(self, *names: Any) -> "ConfigPlace":
        return dataclasses.replace(self, path=(*self.path, *map(str, names)))

    def item(self, index: int) -> "ConfigPlace":
        return dataclasses.replace(self, path=(*self.path, index))

    def __str__(self) -> str:
        dotted = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in self.path).lstrip(".")
        for end in range(len(self.path), 0, -1):
            if self.path[:end] in self.lines:
                file, line = self.lines[self.path[:end]]
                return f"{file}:{line}: {dotted}"
        return f"{self.source}: {dotted}"


def _did_you_mean(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _split_base_urls(value: str | list, where: ConfigPlace) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: every base_url must be a string, got {item!r}")
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base_url {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        urls.append(url)
    if not urls:
        raise ConfigError(f"{where}: base_url is empty; give at least one URL such as http://127.0.0.1:8000/v1")
    return tuple(urls)


def check_config_type(value: Any, types: tuple, what: str, where: ConfigPlace | str) -> Any:
    """A config value of one of `types` (a bool never counts as a number), else a ConfigError naming the key."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return value


_HEADER_UNSAFE = re.compile(r"[^\x20-\x7e]")  # what an API key cannot hold to go in an HTTP header as it is


# Fields no `extra_body` (the config's or a request's `metadata.extra_body`) may set: the proxy writes them, or reads them
# to relay vLLM's answer (a stream asked for there would reach a client that expects one JSON reply).
_NOT_EXTRA_BODY = frozenset({"stream", "stream_options", "messages", "model"})


def server_config_from_dict(name: str, values: dict, source: str = "<python>", where: ConfigPlace | None = None) -> ServerConfig:
    """Validates one `vllm_model` block (already interpolated) and builds its ServerConfig.

    `where`: the block's place in the config files, for errors (default: `source: <name>.responses_api_models.vllm_model`).
    """
    where = where or ConfigPlace(source, (name, "responses_api_models", "vllm_model"))
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {type(values).__name__}")
    for key in values:
        if key not in SERVER_KEYS and key not in _IGNORED_KEYS:
            raise ConfigError(f"{where.key(key)}: unknown key{_did_you_mean(str(key), SERVER_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in values:
            raise ConfigError(f"{where.key(key)}: required key is missing; add `{key}: ...` to the server block")
    kwargs = {name: check_config_type(values[name], key.types, key.expected, where.key(name))
              for name, key in SERVER_KEYS.items() if name in values}
    kwargs["base_url"] = _split_base_urls(kwargs["base_url"], where.key("base_url"))
    for key in ("connect_timeout_s", "request_timeout_s", "max_request_body_mb", "session_idle_timeout_s",
                "stream_idle_timeout_s", "health_check_interval_s", "shutdown_timeout_s"):
        if kwargs.get(key) is not None and kwargs[key] <= 0:
            raise ConfigError(f"{where.key(key)}: must be positive, got {kwargs[key]!r}")
    for key in ("session_table_size", "eject_after_failures", "readmit_after_successes", "max_attempts"):
        if kwargs.get(key, 1) < 1:
            raise ConfigError(f"{where.key(key)}: must be at least 1")
    if kwargs.get("max_concurrent_requests_per_upstream", 0) < 0:
        raise ConfigError(f"{where.key('max_concurrent_requests_per_upstream')}: must be 0 (no limit) or more")
    if kwargs.get("server_api_key") == "":
        raise ConfigError(f"{where.key('server_api_key')}: must not be empty; leave it out to serve without a key")
    for key in ("api_key", "server_api_key"):  # sent, or compared, as an HTTP header: every request failed (a 500)
        if kwargs.get(key) is not None and _HEADER_UNSAFE.search(kwargs[key]):
            raise ConfigError(f"{where.key(key)}: holds a control character (a newline from an env file or a YAML `|` "
                              f"block?) or non-ASCII text, which no HTTP header carries; remove it")
    if not 0 <= kwargs.get("port", 0) <= 65535:
        raise ConfigError(f"{where.key('port')}: must be between 0 and 65535, got {kwargs['port']}")
    extra_body = kwargs.get("extra_body") or {}
    if extra_body.keys() & _NOT_EXTRA_BODY:
        raise ConfigError(f"{where.key('extra_body')}: must not set {', '.join(sorted(extra_body.keys() & _NOT_EXTRA_BODY))}: "
                          f"the proxy sets them per request")
    if not isinstance(extra_body.get("chat_template_kwargs") or {}, dict):
        raise ConfigError(f"{where.key('extra_body')}: `chat_template_kwargs` must be a mapping; better, use the "
                          f"server's own `chat_template_kwargs` key")
    for key in ("extra_body", "chat_template_kwargs"):  # sent to vLLM as JSON with every request
        problem = _not_json(kwargs.get(key), key)
        if problem:
            raise ConfigError(f"{where.key(key)}: {problem}")
    return ServerConfig(name=name, source=source, **kwargs)


def _not_json(value: Any, path: str) -> str | None:
    """What in `value` (a mapping as YAML read it) JSON cannot carry, named by its path; None where all of it can. YAML
    reads `2024-01-01` as a date, `on:` as the key true, `.inf` as an infinity: each would fail every request."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"`{path}` has the key {key!r}, which is not a string; quote it in the YAML"
            problem = _not_json(item, f"{path}.{key}")
            if problem:
                return problem
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = _not_json(item, f"{path}[{index}]")
            if problem:
                return problem
    elif isinstance(value, float) and not math.isfinite(value):
        return f"`{path}` is {value!r}, which JSON cannot carry"
    elif not isinstance(value, (str, int, float, type(None))):  # a bool is an int
        return f"`{path}` is a {type(value).__name__} ({value!r}), which JSON cannot carry; quote it in the YAML"
    return None


_INTERPOLATION = re.compile(r"\$\{([^{}]+)\}")


def _lookup_variable(expr: str, variables: dict, where: ConfigPlace, env_hint: str) -> Any:
    expr = expr.strip()
    if expr.startswith("oc.env:"):
        name, _, default = expr[len("oc.env:"):].partition(",")
        name = name.strip()
        if name in os.environ:
            return os.environ[name]
        if "," in expr:
            return default.strip()
        raise ConfigError(f"{where}: environment variable {name} is not set; export it or write ${{oc.env:{name},default}}")
    value: Any = variables
    for part in expr.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{where}: variable ${{{expr}}} is not defined; add `{expr}: ...` to {env_hint}")
        value = value[part]
    return value


def _interpolate(value: Any, variables: dict, where: ConfigPlace, env_hint: str, depth: int = 0) -> Any:
    """Resolves `${name}` and `${oc.env:VAR[,default]}`; a value that is one whole `${...}` keeps its type."""
    if depth > 10:
        raise ConfigError(f"{where}: variables refer to each other in a cycle")
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, where.key(k), env_hint, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables, where.item(i), env_hint, depth) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _INTERPOLATION.fullmatch(value)
    if whole:
        resolved = _lookup_variable(whole.group(1), variables, where, env_hint)
        return _interpolate(resolved, variables, where, env_hint, depth + 1)

    def substitute(match: re.Match) -> str:
        resolved = _interpolate(_lookup_variable(match.group(1), variables, where, env_hint), variables, where, env_hint, depth + 1)
        return str(resolved)

    return _INTERPOLATION.sub(substitute, value)


def _read_yaml(path: str, what: str) -> tuple[Any, dict[tuple, tuple[str, int]]]:
    """The file's data, and the (path, line) of every key and list item in it (from YAML's node marks)."""
    try:
        with open(path, encoding="utf-8") as file:
            loader = yaml.SafeLoader(file)
            try:
                node = loader.get_single_node()
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    lines: dict[tuple, tuple[str, int]] = {}

    def visit(node: yaml.Node, at: tuple) -> None:
        if len(at) > 32:  # an alias that contains itself
            return
        if isinstance(node, yaml.MappingNode):  # merge keys (`<<`) are already flattened into it
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    lines[(*at, key_node.value)] = (path, key_node.start_mark.line + 1)
                    visit(value_node, (*at, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*at, index)] = (path, item.start_mark.line + 1)
                visit(item, (*at, index))

    if node is not None:
        visit(node, ())
    return data, lines


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(value, dict) else value
    return merged


@dataclasses.dataclass(frozen=True)
class ServerBlock:
    """One model server block of the config files, interpolated but not yet validated."""

    name: str
    kind: str  # vllm_model | local_vllm_model | deployment (the evaluator shape, a top-level `deployment:`)
    values: dict
    source: str
    lines: Mapping[tuple, tuple[str, int]] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def where(self) -> ConfigPlace:
        """The block's place, for errors: `file:line: server.responses_api_models.kind` (`.key(k)` for a key in it)."""
        path = ("deployment",) if self.kind == "deployment" else (self.name, "responses_api_models", self.kind)
        return ConfigPlace(self.source, path, self.lines)


SERVER_KINDS = ("vllm_model", "local_vllm_model")


def load_server_blocks(paths: Sequence[str], env_path: str | None = None) -> list[ServerBlock]:
    """Reads the config files into server blocks: merged, interpolated, shape-checked (local_vllm uses it too).

    Variables come from `env_path` (default: ./env.yaml if present) and from top-level scalar keys of
    the config files; files later in the list win, as in NeMo Gym.
    """
    files = [p.strip() for entry in paths for p in entry.split(",") if p.strip()]
    if not files:
        raise ConfigError("no config file given; pass --config configs/vllm_model.yaml")
    if env_path is None and os.path.exists("env.yaml"):
        env_path = "env.yaml"
    variables: dict = {}
    if env_path is not None:
        env_values, _ = _read_yaml(env_path, "env")
        if env_values is not None and not isinstance(env_values, dict):
            raise ConfigError(f"{env_path}: an env file must be a mapping of names to values")
        variables = env_values or {}
    env_hint = env_path or "env.yaml (pass --env) or the config file"

    servers: dict[str, dict] = {}
    sources: dict[str, str] = {}
    lines: dict[tuple, tuple[str, int]] = {}  # later files win here too
    for path in files:
        data, file_lines = _read_yaml(path, "config")
        lines.update(file_lines)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of server names to server blocks")
        for key, value in data.items():
            if isinstance(value, dict):
                servers[key] = _merge(servers.get(key, {}), value)
                sources[key] = path
            else:  # top-level scalars are variables for ${...}, like NeMo Gym's global config
                variables = {**variables, key: value}

    blocks = []
    for name, block in servers.items():
        server = ConfigPlace(sources[name], (str(name),), lines)
        if name == "deployment":  # the evaluator's shape: one engine, described at the top level
            blocks.append(ServerBlock(name, "deployment", _interpolate(block, variables, server, env_hint), sources[name], lines))
            continue
        kinds = block.get("responses_api_models")
        others = sorted(set(block) - {"responses_api_models"})
        if kinds is None and others and set(others) <= {"resources_servers", "responses_api_agents"}:
            log.info("config %s: skipping %s (%s is not a model server)", sources[name], name, "/".join(others))
            continue
        if others:
            raise ConfigError(f"{server.key(others[0])}: unknown key{_did_you_mean(others[0], ['responses_api_models'])}")
        if kinds is None:
            raise ConfigError(f"{server}: expected `responses_api_models: {{vllm_model: {{...}}}}` under the server name")
        if not isinstance(kinds, dict) or len(kinds) != 1:
            raise ConfigError(f"{server.key('responses_api_models')}: must hold exactly one server type, `vllm_model`")
        [(kind, values)] = kinds.items()
        where = server.key("responses_api_models", kind)
        if kind not in SERVER_KINDS:
            raise ConfigError(f"{where}: unknown server type{_did_you_mean(str(kind), SERVER_KINDS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: must be a mapping of settings, got {type(values).__name__}")
        blocks.append(ServerBlock(name, kind, _interpolate(values, variables, where, env_hint), sources[name], lines))
    if not blocks:
        raise ConfigError(f"{', '.join(files)}: no model server found; see configs/vllm_model.yaml for the shape")
    return blocks


def load_config(paths: Sequence[str], env_path: str | None = None) -> list[ServerConfig]:
    """Loads every `vllm_model` server from the config files (comma-separated entries allowed)."""
    configs = []
    for block in load_server_blocks(paths, env_path):
        if block.kind != "vllm_model" or str(block.values.get("base_url", "")).startswith(LOCAL_ENGINE_PREFIX):
            raise ConfigError(f"{block.where}: this server needs a local engine; start it with "
                              f"`python -m local_vllm --config {block.source}`")
        configs.append(server_config_from_dict(block.name, block.values, block.source, block.where))
    _check_ports(configs)
    return configs


# `base_url: local:<server>` points a vllm_model server at the engine local_vllm runs for <server>.
LOCAL_ENGINE_PREFIX = "local:"


def _check_ports(configs: Sequence[ServerConfig]) -> None:
    seen: dict[tuple[str, int], ServerConfig] = {}
    for config in configs:
        address = (config.host, config.port)
        if config.port and address in seen:
            other = seen[address]
            raise ConfigError(
                f"{config.source}: {config.name}.responses_api_models.vllm_model.port: servers `{other.name}` and "
                f"`{config.name}` both listen on {config.host}:{config.port}; give each server its own `port`"
            )
        seen[address] = config


# ============================================================================================
# Request conversion (pure): Responses request -> Chat Completions request.
# ============================================================================================

# Responses fields we cannot serve through Chat Completions: a clear 400 rather than a wrong answer.
_UNSUPPORTED_FIELDS = {
    "previous_response_id": "this server keeps no stored responses; send the whole history in `input`",
    "conversation": "this server keeps no conversations; send the whole history in `input`",
    "background": "background responses are not supported",
    "prompt": "stored prompt templates are not supported; send `instructions` and `input`",
    "context_management": "context management is not supported",
    "max_tool_calls": "max_tool_calls is not supported by vLLM's chat API",
    # passed through by name, it replaced the converted `input` and `instructions` in what vLLM got
    "messages": "`messages` is a Chat Completions field: send the history as `input` items (or use /v1/chat/completions)",
}
# Echoed on the Response object, never sent to vLLM.
_ECHO_ONLY_FIELDS = {"model", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "truncation", "include"}
_OUTPUT_LOGPROBS = "message.output_text.logprobs"  # wants_output_logprobs
_SUPPORTED_INCLUDES = {_OUTPUT_LOGPROBS}
# Request fields the converter handles itself; every other one is forwarded to vLLM by name.
_HANDLED_FIELDS = frozenset({"input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens", "text",
                             "reasoning", "top_logprobs", "stream", "stream_options", "n", *_ECHO_ONLY_FIELDS, *_UNSUPPORTED_FIELDS})
_REASONING_KEYS = {"effort", "summary", "generate_summary"}


def _check_type(value: Any, types: tuple, param: str, what: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise bad_request(f"`{param}` must be {what}, got {type(value).__name__}", param)
    return value


def _text_of_parts(content: Any, param: str, allowed: tuple[str, ...]) -> str:
    """Joins text parts (types in `allowed`) of a content list, or returns a string content as is."""
    if isinstance(content, str):
        return content
    _check_type(content, (list,), param, "a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        _check_type(part, (dict,), f"{param}[{j}]", "an object")
        kind = part.get("type")
        if kind not in allowed:
            raise bad_request(f"unsupported content part type {kind!r} in `{param}[{j}]`; expected one of {', '.join(allowed)}", f"{param}[{j}].type")
        texts.append(_check_type(part.get("text", ""), (str,), f"{param}[{j}].text", "a string"))
    return "".join(texts)


def _input_part_to_chat(part: Any, param: str) -> dict:
    _check_type(part, (dict,), param, "an object")
    kind = part.get("type")
    if kind in ("input_text", "text"):
        return {"type": "text", "text": _check_type(part.get("text"), (str,), f"{param}.text", "a string")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise bad_request(f"`{param}` needs `image_url` (an http(s) or data: URL); images by `file_id` are not supported", f"{param}.image_url")
        detail = part.get("detail") or "auto"
        return {"type": "image_url", "image_url": {"url": url, "detail": detail}}
    raise bad_request(f"unsupported content part type {kind!r} in `{param}`; user, system and developer messages take input_text and input_image", f"{param}.type")


def _token_bundle(item: dict, param: str) -> dict | None:
    present = [key for key in TOKEN_FIELDS if item.get(key) is not None]
    if not present:
        return None
    if len(present) != len(TOKEN_FIELDS):
        missing = sorted(set(TOKEN_FIELDS) - set(present))
        raise bad_request(f"`{param}` carries {', '.join(present)} but not {', '.join(missing)}; send all three token fields or none", f"{param}.{missing[0]}")
    for key in ("prompt_token_ids", "generation_token_ids"):
        values = item[key]
        if not isinstance(values, list) or not _only(values, _INTS):
            raise bad_request(f"`{param}.{key}` must be a list of integers", f"{param}.{key}")
    log_probs = item["generation_log_probs"]
    if not isinstance(log_probs, list) or not _only(log_probs, _NUMBERS):
        raise bad_request(f"`{param}.generation_log_probs` must be a list of numbers", f"{param}.generation_log_probs")
    if len(log_probs) != len(item["generation_token_ids"]):
        raise bad_request(f"`{param}`: generation_token_ids and generation_log_probs differ in length", f"{param}.generation_log_probs")
    return {key: item[key] for key in TOKEN_FIELDS}


def _reasoning_texts(item: dict, key: str, param: str) -> list[str]:
    entries = _check_type(item.get(key) or [], (list,), f"{param}.{key}", "a list")
    texts = []
    for j, entry in enumerate(entries):
        _check_type(entry, (dict,), f"{param}.{key}[{j}]", "an object")
        texts.append(_check_type(entry.get("text", ""), (str,), f"{param}.{key}[{j}].text", "a string"))
    return texts


def _input_items_to_messages(items: list, keep_token_ids: bool) -> list[dict]:
    """Turns Responses input items into chat messages, merging consecutive assistant-side items."""
    messages: list[dict] = []
    turn: dict | None = None  # the assistant message being built from consecutive assistant-side items

    def assistant_turn() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"content": [], "refusal": [], "tool_calls": [], "tokens": None}
        return turn

    def flush() -> None:
        nonlocal turn
        if turn is None:
            return
        message: dict = {"role": "assistant", "content": "".join(turn["content"]) or None}
        if turn["tool_calls"]:
            message["tool_calls"] = turn["tool_calls"]
        if turn["refusal"]:
            message["refusal"] = "".join(turn["refusal"])
        if turn["tokens"]:
            message.update(turn["tokens"])
        messages.append(message)
        turn = None

    for i, item in enumerate(items):
        param = f"input[{i}]"
        _check_type(item, (dict,), param, "an object")
        kind = item.get("type", "message" if "role" in item else None)
        tokens = _token_bundle(item, param) if keep_token_ids else None
        if tokens and not (kind in ("function_call", "reasoning") or (kind == "message" and item.get("role") == "assistant")):
            raise bad_request(f"`{param}` carries token IDs, but only assistant-side items (assistant messages, reasoning, function calls) may", f"{param}.prompt_token_ids")

        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if content is None:
                raise bad_request(f"`{param}.content` is required", f"{param}.content")
            if role == "assistant":
                current = assistant_turn()
                if isinstance(content, str):
                    current["content"].append(content)
                else:
                    _check_type(content, (list,), f"{param}.content", "a string or a list of content parts")
                    for j, part in enumerate(content):
                        _check_type(part, (dict,), f"{param}.content[{j}]", "an object")
                        if part.get("type") == "refusal":
                            current["refusal"].append(_check_type(part.get("refusal", ""), (str,), f"{param}.content[{j}].refusal", "a string"))
                        else:
                            current["content"].append(_text_of_parts([part], f"{param}.content[{j}:]", ("output_text", "input_text", "text")))
                calls = _check_type(item.get("tool_calls") or [], (list,), f"{param}.tool_calls", "a list")
                for j, call in enumerate(calls):  # a chat-shaped assistant message
                    _check_type(call, (dict,), f"{param}.tool_calls[{j}]", "an object")
                    current["tool_calls"].append(call)
            elif role in ("user", "system", "developer"):
                flush()
                if isinstance(content, str):
                    messages.append({"role": role, "content": content})
                else:
                    _check_type(content, (list,), f"{param}.content", "a string or a list of content parts")
                    parts = [_input_part_to_chat(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
                    messages.append({"role": role, "content": parts})
            elif role == "tool":  # a chat-shaped tool result
                flush()
                call_id = _check_type(item.get("tool_call_id"), (str,), f"{param}.tool_call_id", "a string")
                messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
            else:
                raise bad_request(f"`{param}.role` must be one of user, system, developer, assistant; got {role!r}", f"{param}.role")
        elif kind == "reasoning":
            blocks = _reasoning_texts(item, "summary", param)
            if not any(blocks):  # items from other servers may carry the text only as content parts
                blocks = _reasoning_texts(item, "content", param)
            assistant_turn()["content"].extend(f"<think>{text}</think>" for text in blocks if text)
        elif kind == "function_call":
            call_id = item.get("call_id")
            name = item.get("name")
            arguments = item.get("arguments", "")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"`{param}.call_id` is required and must be a string", f"{param}.call_id")
            _check_type(name, (str,), f"{param}.name", "a string")
            _check_type(arguments, (str,), f"{param}.arguments", "a JSON string")
            assistant_turn()["tool_calls"].append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            flush()
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(f"`{param}.call_id` is required and must be a string", f"{param}.call_id")
            output = item.get("output")
            if isinstance(output, list):
                output = [{"type": "text", "text": _text_of_parts([part], f"{param}.output[{j}:]", ("input_text", "text"))} for j, part in enumerate(output)]
            elif not isinstance(output, str):
                raise bad_request(f"`{param}.output` must be a string or a list of input_text parts", f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind is None:
            raise bad_request(f"`{param}` needs a `type` (message, function_call, function_call_output, reasoning)", f"{param}.type")
        else:
            raise bad_request(f"unsupported input item type {kind!r} in `{param}`; this server takes message, function_call, function_call_output and reasoning items", f"{param}.type")
        if tokens:
            assistant_turn()["tokens"] = tokens  # the last bundle of an assistant turn wins
    flush()
    return messages


def _fold_instructions(instructions: str | None, messages: list[dict]) -> list[dict]:
    """`instructions` becomes one system message, joined with the leading run of system/developer text messages."""
    if instructions is None:
        return messages
    texts = [instructions]
    start = 0
    while start < len(messages) and messages[start]["role"] in ("system", "developer"):
        content = messages[start]["content"]
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                break
            content = "".join(part["text"] for part in content)
        texts.append(content)
        start += 1
    return [{"role": "system", "content": "\n\n".join(texts)}] + messages[start:]


def _tools_to_chat(tools: Any) -> list[dict]:
    _check_type(tools, (list,), "tools", "a list")
    chat_tools = []
    for i, tool in enumerate(tools):
        _check_type(tool, (dict,), f"tools[{i}]", "an object")
        if tool.get("type") != "function":
            raise bad_request(f"unsupported tool type {tool.get('type')!r} in `tools[{i}]`; only function tools are supported", f"tools[{i}].type")
        if isinstance(tool.get("function"), dict):  # already chat-shaped
            if not isinstance(tool["function"].get("name"), str) or not tool["function"]["name"]:
                raise bad_request(f"`tools[{i}].function.name` must be a non-empty string", f"tools[{i}].function.name")
            chat_tools.append({"type": "function", "function": tool["function"]})
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"`tools[{i}].name` is required", f"tools[{i}].name")
        function = {"name": name}
        if tool.get("description") is not None:
            function["description"] = _check_type(tool["description"], (str,), f"tools[{i}].description", "a string")
        if tool.get("parameters") is not None:
            function["parameters"] = _check_type(tool["parameters"], (dict,), f"tools[{i}].parameters", "a JSON schema object")
        chat_tools.append({"type": "function", "function": function})
    return chat_tools


def _tool_choice_to_chat(choice: Any, tool_names: set[str]) -> str | dict:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"`tool_choice` must be none, auto, required or {{type: function, name}}; got {choice!r}", "tool_choice")
        if choice == "required" and not tool_names:
            raise bad_request("`tool_choice: required` needs at least one tool in `tools`", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = _check_type(choice.get("function") or {}, (dict,), "tool_choice.function", "an object")
        name = choice.get("name") or function.get("name")
        if not isinstance(name, str):
            raise bad_request("`tool_choice` must name its function: {type: function, name}", "tool_choice")
        if name not in tool_names:
            raise bad_request(f"`tool_choice` names function {name!r}, which is not in `tools`", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise bad_request("`tool_choice` must be none, auto, required or {type: function, name}; other forms are not supported", "tool_choice")


def _text_format_to_chat(text: Any) -> dict | None:
    _check_type(text, (dict,), "text", "an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    _check_type(fmt, (dict,), "text.format", "an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise bad_request("`text.format` of type json_schema needs `name` (a string) and `schema` (an object)", "text.format")
        schema = {"name": fmt["name"], "schema": fmt["schema"]}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(f"`text.format.type` must be text, json_object or json_schema; got {kind!r}", "text.format.type")


def _check_unsupported(request: dict) -> None:
    if _UNSUPPORTED_FIELDS.keys() & request.keys():  # usually none are there: one set operation, no lookup per field
        for field, why in _UNSUPPORTED_FIELDS.items():
            if request.get(field) not in (None, False):
                raise bad_request(f"`{field}` is not supported: {why}", field)
    if request.get("stream") is not None and not isinstance(request["stream"], bool):
        raise bad_request("`stream` must be true or false", "stream")
    options = request.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_obfuscation"}):
        raise bad_request("`stream_options` may only hold `include_obfuscation` (streams are never obfuscated here)", "stream_options")
    if request.get("truncation") not in (None, "disabled"):
        raise bad_request("`truncation` must be disabled: this server never drops input items", "truncation")
    include = request.get("include") or []
    _check_type(include, (list,), "include", "a list")
    for entry in include:
        if not isinstance(entry, str) or entry not in _SUPPORTED_INCLUDES:
            raise bad_request(f"`include` value {entry!r} is not supported; supported: {', '.join(sorted(_SUPPORTED_INCLUDES))}", "include")
    if request.get("n") not in (None, 1):
        raise bad_request("`n` must be 1: a Response holds one completion", "n")


def wants_output_logprobs(request: dict) -> bool:
    """Whether a Response's output text carries log probs: asked by `include` (OpenAI's way) or by `top_logprobs`,
    0 included (the number of alternatives per token)."""
    return request.get("top_logprobs") is not None or _OUTPUT_LOGPROBS in (request.get("include") or ())


def responses_request_to_chat(request: dict, config: ServerConfig) -> dict:
    """Converts a `/v1/responses` request into the Chat Completions body sent to vLLM.

    Unknown top-level fields (vLLM sampling extensions such as `seed`, `top_k`, `structured_outputs`)
    are forwarded unchanged; fields we cannot honour are a 400 naming the field.
    """
    _check_type(request, (dict,), "body", "a JSON object")
    _check_unsupported(request)
    if "input" not in request:
        raise bad_request("`input` is required: a string or a list of input items", "input")
    source = request["input"]
    if isinstance(source, str):
        items = [{"type": "message", "role": "user", "content": source}]
    else:
        items = _check_type(source, (list,), "input", "a string or a list of input items")
    instructions = request.get("instructions")
    if instructions is not None:
        _check_type(instructions, (str,), "instructions", "a string")
    messages = _fold_instructions(instructions, _input_items_to_messages(items, config.return_token_id_information))
    if not messages:
        raise bad_request("`input` is empty: give at least one input item", "input")

    chat: dict = {"messages": messages}
    for key, value in request.items():
        if key not in _HANDLED_FIELDS and value is not None:
            chat[key] = value  # temperature, top_p, user and vLLM extensions pass through by name

    tools = _tools_to_chat(request["tools"]) if request.get("tools") else []
    if tools:
        chat["tools"] = tools
    tool_names = {tool["function"].get("name") for tool in tools}
    if request.get("tool_choice") is not None:
        choice = _tool_choice_to_chat(request["tool_choice"], tool_names)
        if tools:
            chat["tool_choice"] = choice
    if request.get("parallel_tool_calls") is not None:
        _check_type(request["parallel_tool_calls"], (bool,), "parallel_tool_calls", "true or false")
        if tools:
            chat["parallel_tool_calls"] = request["parallel_tool_calls"]
    if request.get("max_output_tokens") is not None:
        max_tokens = _check_type(request["max_output_tokens"], (int,), "max_output_tokens", "an integer")
        if max_tokens < 1:
            raise bad_request("`max_output_tokens` must be at least 1", "max_output_tokens")
        chat["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if key in chat:
            _check_type(chat[key], (int, float), key, "a number")
    if request.get("top_logprobs") is not None:
        top = _check_type(request["top_logprobs"], (int,), "top_logprobs", "an integer from 0 to 20")
        if not 0 <= top <= 20:
            raise bad_request("`top_logprobs` must be between 0 and 20", "top_logprobs")
    if wants_output_logprobs(request):
        chat["logprobs"] = True
        chat["top_logprobs"] = request.get("top_logprobs") or 0
    if request.get("text") is not None:
        response_format = _text_format_to_chat(request["text"])
        if response_format:
            chat["response_format"] = response_format
        if request["text"].get("verbosity") is not None:
            chat["verbosity"] = request["text"]["verbosity"]
    if request.get("reasoning") is not None:
        reasoning = _check_type(request["reasoning"], (dict,), "reasoning", "an object")
        unknown = sorted(set(reasoning) - _REASONING_KEYS)
        if unknown:
            raise bad_request(f"`reasoning.{unknown[0]}` is not supported; supported: effort, summary", f"reasoning.{unknown[0]}")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    if request.get("metadata") is not None:
        _check_type(request["metadata"], (dict,), "metadata", "an object of string values")
    if request.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    body = prepare_chat_request(chat, config, metadata=request.get("metadata"))
    if body.get("n") not in (None, 1):  # set by an extra_body: the choices after the first were dropped
        raise bad_request("`n` must be 1: a Response holds one completion (it was set through `metadata.extra_body` "
                          "or the server's `extra_body`)", "n")
    return body


# --- chat-side preparation, shared by /v1/responses and /v1/chat/completions ---------------------

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def split_think_blocks(text: str) -> tuple[list[str], str]:
    """Every `<think>...</think>` block anywhere becomes reasoning; unterminated or stray tags stay text.

    Whitespace outside the blocks is kept exactly (no trimming), matching the reference parser. A block runs from
    `<think>` to the first `</think>` after it, like the reference's `<think>(.*?)</think>` with DOTALL; `str.find`
    does it without that regex's per-character work (3% of a `/v1/responses` request's instructions).
    """
    blocks: list[str] = []
    kept: list[str] = []
    start = 0
    while (opened := text.find(_THINK_OPEN, start)) != -1 and (closed := text.find(_THINK_CLOSE, opened + 7)) != -1:
        blocks.append(text[opened + 7:closed])  # 7 == len(_THINK_OPEN)
        kept.append(text[start:opened])
        start = closed + 8  # 8 == len(_THINK_CLOSE)
    if not blocks:
        return blocks, text
    kept.append(text[start:])
    return blocks, "".join(kept)


def _move_history_reasoning(message: dict) -> dict:
    """Assistant history: `<think>` blocks leave `content` for the reasoning fields chat templates read.

    Every block is kept (joined by a blank line); the reference forwards only the first one.
    """
    content = message.get("content")
    blocks: list[str] = []
    if isinstance(content, str):
        blocks, content = split_think_blocks(content)
    elif isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                found, text = split_think_blocks(part["text"])
                blocks += found
                part = {**part, "text": text}
            parts.append(part)
        content = parts
    if not blocks:
        return message
    existing = message.get("reasoning_content") or message.get("reasoning")
    if existing is not None and not isinstance(existing, str):
        raise bad_request("an assistant message's `reasoning_content` (or `reasoning`) must be a string", "messages")
    reasoning = "\n\n".join(([existing] if existing else []) + blocks)
    return {**message, "content": content, "reasoning_content": reasoning, "reasoning": reasoning}


def _json_metadata(metadata: dict | None, key: str) -> dict:
    """NeMo Gym's per-request overrides: `metadata.<key>` holds a JSON object as a string."""
    raw = (metadata or {}).get(key)
    if raw is None:
        return {}
    try:
        value = _loads(raw, sendable=True) if isinstance(raw, str) else raw
    except LoneSurrogate as exc:
        raise bad_request(f"`metadata.{key}` {exc}", f"metadata.{key}") from None
    except ValueError:
        raise bad_request(f"`metadata.{key}` must be a JSON object encoded as a string", f"metadata.{key}") from None
    if not isinstance(value, dict):
        raise bad_request(f"`metadata.{key}` must be a JSON object encoded as a string", f"metadata.{key}")
    return value


def prepare_chat_request(chat: dict, config: ServerConfig, metadata: dict | None = None) -> dict:
    """Applies the server config to a Chat Completions body: the one place both endpoints share.

    Model name, developer->system, chat_template_kwargs (config < request < metadata), extra_body
    (request fields win), reasoning history, and the token-ID parameters for training.
    """
    messages = chat.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` is required: a non-empty list of chat messages", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"`messages[{i}]` must be an object with a `role`", f"messages[{i}]")
    if chat.get("stream") is not None and not isinstance(chat["stream"], bool):
        raise bad_request("`stream` must be true or false", "stream")
    if config.replace_developer_role_with_system:
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    if config.uses_reasoning_parser:
        messages = [_move_history_reasoning(m) if m["role"] == "assistant" else m for m in messages]

    extra = {k: v for k, v in {**(config.extra_body or {}), **_json_metadata(metadata, "extra_body")}.items() if v is not None}
    if extra.keys() & _NOT_EXTRA_BODY:  # the request's own fields: the proxy reads them to relay vLLM's answer
        key = sorted(extra.keys() & _NOT_EXTRA_BODY)[0]
        raise bad_request(f"`{key}` cannot be set through `extra_body` (`metadata.extra_body` or the server's config): "
                          f"set it on the request itself", "metadata.extra_body")
    if extra.get("chat_template_kwargs") is not None:
        _check_type(extra["chat_template_kwargs"], (dict,), "metadata.extra_body", "an object whose `chat_template_kwargs` is an object")
    body = {**extra, **chat, "messages": messages, "model": config.model}

    request_kwargs = chat.get("chat_template_kwargs")
    if request_kwargs is not None:
        _check_type(request_kwargs, (dict,), "chat_template_kwargs", "an object")
    template_kwargs = {**(config.chat_template_kwargs or {}), **(extra.get("chat_template_kwargs") or {}),
                       **(request_kwargs or {}), **_json_metadata(metadata, "chat_template_kwargs")}
    if template_kwargs:
        body["chat_template_kwargs"] = template_kwargs

    if config.return_token_id_information:
        if body.get("n") not in (None, 1):
            raise bad_request("`n` must be 1 when the server returns token IDs for training", "n")
        body["logprobs"] = True
        body["top_logprobs"] = body.get("top_logprobs") or 0
        body["return_tokens_as_token_ids"] = True
        body["return_token_ids"] = True
    return body


# ============================================================================================
# Response conversion (pure): Chat Completions response -> Responses object, token IDs.
# ============================================================================================


# Random hex digits for ids, cut from one block for 128 ids: spelling a 128-bit number in hex costs 3x more than
# drawing it, and a reply needs 3-4 ids (os.urandom would add a system call). Ids are unique, not secret.
_ID_HEX_DIGITS = 32
_random_hex: list[str] = []
os.register_at_fork(after_in_child=_random_hex.clear)  # `random` reseeds in a forked child; the block must go with it


def _random_hex_id() -> str:
    """32 random hex digits (128 bits from `random`)."""
    if not _random_hex:
        block = random.randbytes(_ID_HEX_DIGITS // 2 * 128).hex()
        _random_hex.extend(block[i:i + _ID_HEX_DIGITS] for i in range(0, len(block), _ID_HEX_DIGITS))
    return _random_hex.pop()


def _new_id(prefix: str) -> str:
    return prefix + "_" + _random_hex_id()


def _malformed(where: str, expected: str) -> ApiError:
    return upstream_error(f"vLLM returned a malformed chat completion: `{where}` should be {expected}")


def _is_timestamp(value: Any) -> bool:
    """A number a Response's `created_at` (a float) can hold: not a bool, NaN, an infinity (`1e400`) or an int too
    big for a float (`1e309` written out), which json would write as Infinity or float() refuse."""
    return value.__class__ in _NUMBERS and -_FLOAT_MAX <= value <= _FLOAT_MAX  # int against float: compared exactly


_FLOAT_MAX = sys.float_info.max


def _check_message_texts(message: dict, where: str) -> None:
    """A reply message's text fields are strings or null (`where`: the message's place, for the 502)."""
    for key in ("content", "refusal", "reasoning", "reasoning_content"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise _malformed(f"{where}.{key}", "a string or null")


def _first_choice(chat: Any) -> dict:
    """choices[0] of a vLLM chat completion, after checking every field the converters read."""
    choices = chat.get("choices") if isinstance(chat, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise upstream_error("vLLM returned a chat completion without choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _malformed("choices[0].message", "an object")
    _check_message_texts(message, "choices[0].message")
    if choice.get("finish_reason") is not None and not isinstance(choice["finish_reason"], str):
        raise _malformed("choices[0].finish_reason", "a string or null")
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name", ""), str)
            and isinstance(c["function"].get("arguments") or "", str) and isinstance(c.get("id") or "", str) for c in calls)):
        raise _malformed("choices[0].message.tool_calls", "a list of {id, function: {name, arguments}}")
    logprobs = choice.get("logprobs")
    if logprobs is not None and not (isinstance(logprobs, dict) and (logprobs.get("content") is None or (
            isinstance(logprobs["content"], list) and _logprob_entries(logprobs["content"])))):
        raise _malformed("choices[0].logprobs", _LOGPROBS_SHAPE)
    if chat.get("usage") is not None and not isinstance(chat["usage"], dict):
        raise _malformed("usage", "an object or null")
    if chat.get("created") is not None and not _is_timestamp(chat["created"]):
        raise _malformed("created", "a finite number or null")
    return choice  # the token ids are checked where they are read: _token_ids


def _logprob_entries(content: list) -> bool:
    """Whether vLLM's `logprobs.content` holds entries of one kind: objects, or _LogprobRead where a schema decoded them
    (a reply's: all of them, the schema decodes the whole reply or none of it; a stream's: ResponsesStream.whole_entries).
    A list of _LogprobRead is checked where it is read, by `_logprob_fields`, the only reader of such lists."""
    kind = content[0].__class__ if content else dict
    return kind is _LogprobRead or kind is dict and _only(content, (dict,))


def _logprob_fields(content: list) -> tuple[list, list]:
    """(log probs, tokens) of `_logprob_entries`, None where an entry has none. _LogprobRead's fields are read by a
    list comprehension, whose attribute loads Python 3.11 specializes (64 entries: 0.9 us a field, against 2.1 us for
    `map(attrgetter)`); an element that is not a _LogprobRead, which only a stream's list can hold (_collect_tokens
    keeps such an entry for this), has no such attribute: malformed, a 502."""
    if content and content[0].__class__ is _LogprobRead:
        try:
            return [entry.logprob for entry in content], [entry.token for entry in content]
        except AttributeError:
            raise _malformed("choices[0].logprobs", _LOGPROBS_SHAPE) from None
    return list(map(dict.get, content, itertools.repeat("logprob"))), list(map(dict.get, content, itertools.repeat("token")))


_LOGPROBS_SHAPE = "{content: [...]} or null"


def _reasoning_from_upstream(message: dict, config: ServerConfig) -> str | None:
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and not config.uses_reasoning_parser:
        raise upstream_error(
            f"vLLM returned a separate reasoning field, but server `{config.name}` has `uses_reasoning_parser: false` "
            f"({config.source}): remove `--reasoning-parser` from vllm serve, or set `uses_reasoning_parser: true`",
            code="reasoning_parser_mismatch",
        )
    return reasoning or None


def _token_ids(value: Any, where: str) -> list | Any:
    """vLLM's token ids (a reply's `prompt_token_ids`, `choices[0].token_ids`), checked: a list of ints (a copy), or
    their JSON text as msgspec kept it (a reply decoded with CompletionForResponse) where that text is what json
    writes of the ints (`[1,22,333]`: digits and commas, no space, no sign), else the list decoded from it. A prompt
    runs to thousands of ids: as text an id costs ~150 instructions (msgspec checks the JSON, one pass here, a copy),
    against ~590 to decode, check and write back an int."""
    if value.__class__ is _JsonText:
        text = bytes(value)
        if text.translate(None, b"0123456789,") == b"[]" and _digit_runs_decodable(text):
            return value
        value = _ints_of_text(text)
    if value.__class__ is not list or not _only(value, _INTS):
        raise _malformed(where, "a list of integers or null")
    return list(value)


# The most digits Python reads into an int (4,300 unless set otherwise; 0: no limit); json refuses a longer one.
_int_digit_limit = getattr(sys, "get_int_max_str_digits", lambda: 0)  # Python 3.10 before 3.10.7 has no limit


def _digit_runs_decodable(text: bytes) -> bool:
    """Whether no run of digits in `text` (ids: digits and commas between brackets) could be too long for json to
    read as an int, as kept text must be decodable by json to be relayed. Every full stretch of half the limit holds a
    comma, so no run reaches the limit: a few `find`s for a 2,000-id prompt, none for a shorter text. A run longer
    than half the limit, which no tokenizer's id has, is then decoded like any other text: correct, only slower."""
    limit = _int_digit_limit()
    if not limit or len(text) <= limit + 2:
        return True
    step = limit // 2
    return all(text.find(b",", start, start + step) >= 0 for start in range(1, len(text) - step, step))


def _ints_of_text(text: bytes) -> Any:
    """Kept text decoded; None where it cannot be (msgspec keeps a Raw without checking its strings' UTF-8 or its
    numbers' size: invalid UTF-8, an int over Python's 4,300 digits), which the caller reports as malformed, a 502."""
    try:
        return _loads(text)
    except (ValueError, UnicodeDecodeError):
        return None


def _id_count(ids: list | Any) -> int:
    """How many ids `_token_ids` gave: a list's length, or one more than the commas of its text (`[]`: none)."""
    return len(ids) if ids.__class__ is list else (bytes(ids).count(b",") + 1 if len(ids) > 2 else 0)


def _spelled_as_logprob_tokens(token_ids: list | Any | None, tokens: list) -> bool:
    """vLLM's common case, checked without a Python frame per token: the logprob tokens are exactly `token_id:<id>`
    for each id (`return_tokens_as_token_ids`). One string comparison: with as many tokens as ids and `,` in no
    expected token, equal joins mean equal lists. The ids (`_token_ids`: checked ints, or their text as json writes
    it) are spelled as json spells them (`str`): a list by `_number_list_json`, 5x faster than `map(str, ...)`."""
    if token_ids is None or len(tokens) != _id_count(token_ids):
        return False
    text = _number_list_json(token_ids) if token_ids.__class__ is list else bytes(token_ids)
    expected = "token_id:" + text[1:-1].decode().replace(",", ",token_id:")
    try:
        return not tokens or ",".join(tokens) == expected
    except TypeError:  # a token that is not a str: join checks that without a pass of its own
        return False


class PromptIdsMissing(ApiError):
    """A reply whose token-ID bundle lacks only the prompt's ids (vLLM builds that ignore `return_token_ids`): the
    server asks vLLM's /tokenize for them (`_chat_upstream`)."""


# vLLM's `return_tokens_as_token_ids` spelling: ASCII digits only (int() would also read " 5", "1_0" and other scripts'
# digits, so a token that is text, not an id, could pass for one).
_TOKEN_ID_SPELLING = re.compile(r"token_id:[0-9]+")


def extract_token_info(chat: dict, choice: dict | None = None) -> dict:
    """The training bundle of a chat completion: prompt ids, generated ids and their log probs.

    Sources, in order: a complete bundle on the message (NeMo RL's patched vLLM), else vLLM's
    `return_token_ids` fields checked against `token_id:<n>` logprob tokens. Anything partial or
    inconsistent is a 502: training on misaligned tokens silently corrupts a run. `choice`: the
    already checked `_first_choice(chat)`, when the caller has it. The reply's `prompt_token_ids` are read last:
    where only they are missing, PromptIdsMissing.
    """
    choice = choice or _first_choice(chat)
    message = choice.get("message") or {}
    from_message = all(message.get(key) is not None for key in TOKEN_FIELDS)
    if from_message:
        bundle = {key: message[key] for key in TOKEN_FIELDS}
        unchecked = TOKEN_FIELDS  # not covered by _first_choice
    else:
        content = (choice.get("logprobs") or {}).get("content")
        if content is None:
            raise upstream_error("vLLM returned no logprobs although the server asked for them; is this a vLLM OpenAI server?", code="token_ids_missing")
        log_probs, tokens = _logprob_fields(content)
        generated = choice.get("token_ids")
        generated = None if generated in _NULLS else _token_ids(generated, "choices[0].token_ids")
        if not _spelled_as_logprob_tokens(generated, tokens):
            if generated.__class__ is _JsonText:  # the rare paths below compare ints
                generated = _token_ids(_ints_of_text(bytes(generated)), "choices[0].token_ids")
            from_logprobs = None
            if _only(tokens, _STRS) and all(map(_TOKEN_ID_SPELLING.fullmatch, tokens)):
                from_logprobs = [int(t[9:]) for t in tokens]  # 9 == len("token_id:")
            if generated is None:
                generated = from_logprobs
            elif from_logprobs is not None and generated != from_logprobs:
                raise upstream_error("vLLM's token_ids disagree with its logprob tokens", code="token_ids_mismatch")
        if generated is None:
            raise upstream_error("vLLM returned neither token_ids nor token_id:<n> logprob tokens; upgrade vLLM", code="token_ids_missing")
        bundle = {"prompt_token_ids": chat.get("prompt_token_ids"), "generation_token_ids": generated,
                  "generation_log_probs": log_probs}
        unchecked = ("generation_log_probs",)  # the ids were checked by _token_ids or parsed as ints above
    for key in unchecked:
        values = bundle[key]
        if not isinstance(values, list) or not _only(values, _NUMBERS if key == "generation_log_probs" else _INTS):
            raise _malformed(key, "a list of numbers" if key == "generation_log_probs" else "a list of integers")
    if _id_count(bundle["generation_token_ids"]) != len(bundle["generation_log_probs"]):
        raise upstream_error(
            f"vLLM returned {_id_count(bundle['generation_token_ids'])} generated token ids but "
            f"{len(bundle['generation_log_probs'])} log probs", code="token_ids_mismatch")
    if not from_message:
        if bundle["prompt_token_ids"] in _NULLS:
            raise PromptIdsMissing(502, "vLLM returned no prompt_token_ids", code="token_ids_missing")
        bundle["prompt_token_ids"] = _token_ids(bundle["prompt_token_ids"], "prompt_token_ids")
    return bundle


def _token_count(container: Any, key: str) -> int:
    """A usage count: strict clients require integers, never null (or a bool)."""
    value = container.get(key) if isinstance(container, dict) else None
    return value if value.__class__ is int else 0


def _usage_to_responses(usage: dict | None) -> dict | None:
    if not usage:
        return None
    prompt, completion = _token_count(usage, "prompt_tokens"), _token_count(usage, "completion_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _token_count(usage.get("prompt_tokens_details"), "cached_tokens"),
                                 "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _token_count(usage.get("completion_tokens_details"), "reasoning_tokens")},
        "total_tokens": _token_count(usage, "total_tokens") or prompt + completion,
    }


def _response_envelope(request: dict, config: ServerConfig, created: float, output: list, status: str,
                       incomplete_reason: str | None, usage: dict | None, response_id: str | None = None) -> dict:
    """The Response object around `output`: every field strict SDK clients require, request params echoed."""
    return {
        "id": response_id or _new_id("resp"),
        "object": "response",
        "created_at": float(created),
        "model": config.model,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.get("instructions"),
        "metadata": request.get("metadata"),
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": request.get("tools") or [],
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "max_output_tokens": request.get("max_output_tokens"),
        "top_logprobs": request.get("top_logprobs"),
        "reasoning": request.get("reasoning"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "truncation": request.get("truncation") or "disabled",
        "user": request.get("user"),
        "store": False,
        "background": False,
        "previous_response_id": None,
        "usage": usage,
    }


def _message_item(text: str, refusal: str | None, status: str, logprobs: list | None) -> dict:
    content: list[dict] = [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": status, "content": content}


def _output_logprobs(choice: dict) -> list:
    # Only for a client that asked for log probs (wants_output_logprobs): its reply is decoded in full (dict entries).
    entries = (choice.get("logprobs") or {}).get("content") or []
    if not _only(entries, (dict,)) or not all(
            isinstance(e.get("top_logprobs") or [], list) and _only(e.get("top_logprobs") or [], (dict,)) for e in entries):
        raise _malformed("choices[0].logprobs.content", "a list of {token, logprob, bytes, top_logprobs: [{...}]}")
    return [
        {"token": e.get("token", ""), "bytes": e.get("bytes") or [], "logprob": e.get("logprob", 0.0),
         "top_logprobs": [{"token": t.get("token", ""), "bytes": t.get("bytes") or [], "logprob": t.get("logprob", 0.0)}
                          for t in e.get("top_logprobs") or []]}
        for e in entries
    ]


# What `chat_response_to_responses` (and the token-ID fallback before it) reads of vLLM's chat completion when the
# client asked for no log probs (wants_output_logprobs). Decoding only this (`_loads(raw, CompletionForResponse)`) skips each log-prob
# entry's `bytes` and `top_logprobs` (8% of a token-ID request's instructions), builds each entry as a _LogprobRead (a
# msgspec Struct: decoding and reading 64 entries 17 -> 14 us against dicts, in _logprob_fields), and keeps the token
# ids as their text (`_token_ids`: a third of the instructions of a request with a 2,000-token prompt). A reply of
# another shape is decoded in full, so malformed replies are reported as before. What the schema skips is checked only
# as JSON syntax, and so are the ids it keeps as text where the Response does not read them (token IDs off, or the
# bundle on the message): invalid UTF-8 or an int too long for json there is not an error here (json, reading the whole
# reply, makes it a 502). Written in the call syntax, so that the field types are objects, not
# strings that msgspec would resolve in `sys.modules[__module__]`: under `python -m cProfile -m gym_vllm` that is
# cProfile's module, and every token-ID request failed with a NameError. `total=False` is needed: msgspec (0.22)
# refuses every value of a required Raw field.
_LogprobsRead = TypedDict("_LogprobsRead", {"content": list[_LogprobRead] | None}, total=False)
_ChoiceRead = TypedDict("_ChoiceRead", {"message": Any, "finish_reason": Any, "token_ids": _JsonText,
                                        "logprobs": _LogprobsRead | None}, total=False)
CompletionForResponse = TypedDict("CompletionForResponse", {"created": Any, "choices": list[_ChoiceRead], "usage": Any,
                                                            "prompt_token_ids": _JsonText}, total=False)


_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}  # chat finish_reason -> Responses


def chat_response_to_responses(chat: dict, request: dict, config: ServerConfig) -> dict:
    """Converts vLLM's chat completion into a Response: reasoning item, message item, function calls."""
    choice = _first_choice(chat)
    message = choice.get("message") or {}
    upstream_reasoning = _reasoning_from_upstream(message, config)
    text = message.get("content") or ""
    blocks: list[str] = []
    if config.uses_reasoning_parser:
        blocks, text = split_think_blocks(text)
        if upstream_reasoning:
            blocks.insert(0, upstream_reasoning)
    incomplete_reason = _INCOMPLETE_REASONS.get(choice.get("finish_reason"))
    status = "incomplete" if incomplete_reason else "completed"

    output: list[dict] = []
    if blocks:
        output.append({
            "id": _new_id("rs"), "type": "reasoning", "status": "completed", "encrypted_content": None,
            "summary": [{"type": "summary_text", "text": block} for block in blocks],
            "content": [{"type": "reasoning_text", "text": block} for block in blocks],
        })
    tool_calls = message.get("tool_calls") or []
    if text or message.get("refusal") or (not blocks and not tool_calls):
        logprobs = _output_logprobs(choice) if wants_output_logprobs(request) else None
        output.append(_message_item(text, message.get("refusal"), "incomplete" if incomplete_reason else "completed", logprobs))
    for call in tool_calls:
        function = call.get("function") or {}
        output.append({
            "id": _new_id("fc"), "type": "function_call", "status": "completed",
            "call_id": call.get("id") or _new_id("call"),
            "name": function.get("name", ""), "arguments": function.get("arguments") or "",
        })
    if config.return_token_id_information:
        output[-1].update(extract_token_info(chat, choice))
    return _response_envelope(request, config, chat.get("created") or time.time(), output, status,
                              incomplete_reason, _usage_to_responses(chat.get("usage")))


def chat_response_for_client(chat: dict, request: dict, config: ServerConfig) -> dict:
    """Post-processes vLLM's chat completion for `/v1/chat/completions` clients.

    Upstream reasoning fields are re-wrapped as `<think>` in `content` (reference parity); token IDs
    move onto the message; the raw vLLM token fields are removed unless the client asked for them.
    """
    choice = _first_choice(chat)
    message = _with_think_text(choice.get("message") or {}, config)
    if config.return_token_id_information:
        message = {**message, **extract_token_info(chat, choice)}
        chat = {k: v for k, v in chat.items() if k != "prompt_token_ids"}
        choice = {k: v for k, v in choice.items() if k != "token_ids"}
        if not request.get("logprobs"):
            choice["logprobs"] = None
    choice = {**choice, "message": message}
    return {**chat, "model": config.model, "choices": [choice, *map(_other_choice_for_client, chat["choices"][1:],
                                                                    itertools.count(1), itertools.repeat(config))]}


def _with_think_text(message: dict, config: ServerConfig) -> dict:
    """A message with vLLM's reasoning field re-wrapped as `<think>` at the start of its content (reference parity)."""
    reasoning = _reasoning_from_upstream(message, config)
    if not reasoning:
        return message
    message = {k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content")}
    message["content"] = f"<think>{reasoning}</think>{message.get('content') or ''}"
    return message


def _other_choice_for_client(choice: Any, index: int, config: ServerConfig) -> Any:
    """choices[1:] (`n` > 1): their reasoning re-wrapped like the first's, once its fields are checked as strings."""
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not (message.keys() & {"reasoning", "reasoning_content"}):
        return choice
    _check_message_texts(message, f"choices[{index}].message")
    return {**choice, "message": _with_think_text(message, config)}


# vLLM's wordings for "the prompt or max_tokens does not fit the context" (vllm-cpu.md §4d, vllm-h100.md).
_CONTEXT_OVERFLOW = re.compile(
    r"maximum context length is \d+|max_(?:completion_)?tokens=\d+ cannot be greater than max_model_len"
    r"|is too long to fit into the model",
    re.IGNORECASE,
)


def is_context_overflow(status: int, message: str) -> bool:
    return status == 400 and bool(_CONTEXT_OVERFLOW.search(message))


def context_overflow_response(request: dict, config: ServerConfig) -> dict:
    """The reply to a prompt that does not fit: incomplete, reason max_output_tokens, an empty message."""
    output = [_message_item("", None, "incomplete", None)]
    return _response_envelope(request, config, time.time(), output, "incomplete", "max_output_tokens", None)


def context_overflow_chat_response(config: ServerConfig) -> dict:
    return {
        "id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": config.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length", "logprobs": None}],
        "usage": None,
    }


def response_json(response: dict, written: dict | None = None) -> bytes:
    """A Response object (`chat_response_to_responses`, `context_overflow_response`) as JSON: exactly
    `_dumps(response).encode()`, ~3x faster with msgspec (~10x for the log probs of a token-ID reply).

    msgspec writes it as built except where a float can be. The envelope's own fields are built here of strings,
    integers and booleans; every other value (created_at, the echoed request parameters) as `_exact` makes it. In the
    items, built here of checked strings and integers, generation_log_probs goes through `_number_list_json`, and a
    message that carries output-text log probs (wants_output_logprobs) through json. `written`: see _item_for_msgspec."""
    if _msgspec_encode is None:
        return _dumps(response).encode()
    exact = dict(response)
    exact["output"] = [_item_for_msgspec(item, written) for item in response["output"]]
    for key, value in response.items():  # most values are plain: checked here before the two lookups
        if value.__class__ not in _PLAIN_VALUES and key not in _ENVELOPE_BUILT_HERE:
            exact[key] = _exact(value)
    return _msgspec_encode(exact)


# _response_envelope's fields that it builds of strings, integers and booleans (usage: _usage_to_responses), and the
# output, whose items _item_for_msgspec handles.
_ENVELOPE_BUILT_HERE = frozenset({"id", "object", "model", "status", "error", "incomplete_details", "output",
                                  "parallel_tool_calls", "store", "background", "previous_response_id", "usage"})


def _item_for_msgspec(item: dict, written: dict | None = None) -> dict | Any:
    """`item` for msgspec to write as json does. `written`: the log-prob lists written so far, by id, for events written
    together (_sse_bytes): a stream's end writes its last item twice, in output_item.done and the final response, and
    writing the log probs of 256 tokens as json does costs ~30 us."""
    # _message_item's output_text part with log probs (a stream adds its message with no content yet)
    if item["type"] == "message" and item["content"] and item["content"][0]["logprobs"]:
        return _msgspec.Raw(_dumps(item).encode())
    log_probs = item.get("generation_log_probs")
    if log_probs is None:
        return item
    raw = written.get(id(log_probs)) if written is not None else None
    if raw is None:
        raw = _msgspec.Raw(_number_list_json(log_probs))
        if written is not None:
            written[id(log_probs)] = raw
    return {**item, "generation_log_probs": raw}


# ============================================================================================
# Stream conversion (pure, sans-I/O): chat completion chunks in -> Responses SSE events out.
# ============================================================================================


class ResponsesStream:
    """Turns vLLM's chat completion chunks into Responses stream events, in the order strict clients expect.

    `start()` once, `feed(chunk)` per upstream chunk, then `finish()` at the end of the upstream stream
    or `fail(error)` if it broke; each returns the events to send, each with a rising `sequence_number`.
    Items are strictly serialized (one is done before the next is added); the final response carries
    exactly what was streamed, with the same ids.

    `<think>` handling (`uses_reasoning_parser: true`): a block that leads the output (after optional
    whitespace) becomes the reasoning item. Its text is held back until `</think>` arrives, because an
    unterminated block stays text (the non-streaming rule) and an item cannot be taken back once sent;
    the reasoning item is then sent whole and the message streams token by token. A `<think>` that
    appears after message text has begun stays message text (the non-streaming parser would lift it out).
    """

    def __init__(self, request: dict, config: ServerConfig) -> None:
        self.request = request
        self.config = config
        self.response_id = _new_id("resp")
        self.created: float = time.time()
        # vLLM's `created`, from the first chunk that has one (vLLM gives every chunk of a stream the same): the chunks
        # _ResponsesSSE takes by their bytes are not fed, so a later chunk's must not count on one path only
        self.created_from_upstream = False
        self.sequence = 0
        self.output: list[dict] = []           # items already added (the open one is the last)
        self.open_item: dict | None = None     # the item whose events are in flight
        self.message_text: list[str] = []      # text of the open message item
        self.tool_index: Any = None            # upstream index of the open function_call item
        self.tool_indexes_done: list = []      # those of the function_call items closed before it
        self.phase = "lead" if config.uses_reasoning_parser else "text"  # lead -> think -> text
        self.held = ""                         # text held back while a leading <think> may still come or close
        self.held_pieces: list[str] = []       # and what came after it inside the block, not yet joined
        self.think_tail = ""                   # the block's last characters, where a `</think>` may have begun
        # vLLM's own reasoning field, when its parser ran, and the open function call's arguments: kept as pieces,
        # joined once (str += copies the whole text at every chunk, a cost that grows with the square of its length)
        self.upstream_reasoning: list[str] = []
        self.arguments: list[str] = []
        self.think_block: str | None = None    # the leading <think> block, once closed
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.prompt_token_ids: list | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[dict] = []
        self.saw_token_ids = False
        self.collects_tokens = config.return_token_id_information or wants_output_logprobs(request)
        # Log-prob entries are kept whole where the client gets them, else only their token and log prob, as
        # _LogprobRead (as a reply's are: CompletionForResponse), which _ResponsesSSE decodes at half the cost.
        self.whole_entries = wants_output_logprobs(request) or not _msgspec

    # --- events -------------------------------------------------------------------------------

    def _event(self, events: list, type: str, **fields: Any) -> None:
        events.append({"type": type, "sequence_number": self.sequence, **fields})
        self.sequence += 1

    def _snapshot(self, status: str, incomplete_reason: str | None = None, usage: dict | None = None) -> dict:
        return _response_envelope(self.request, self.config, self.created, list(self.output), status,
                                  incomplete_reason, usage, self.response_id)

    def start(self) -> list[dict]:
        events: list[dict] = []
        self._event(events, "response.created", response=self._snapshot("in_progress"))
        self._event(events, "response.in_progress", response=self._snapshot("in_progress"))
        return events

    # --- upstream chunks ----------------------------------------------------------------------

    def feed(self, chunk: Any) -> list[dict]:
        # Called once per token: the common chunk (one choice, a content delta) takes the fewest steps.
        if type(chunk) is not dict:
            raise _malformed("chunk", "a JSON object")
        events: list[dict] = []
        if not self.created_from_upstream and chunk.get("created") is not None:
            if not _is_timestamp(chunk["created"]):
                raise _malformed("created", "a finite number or null")
            self.created = chunk["created"]
            self.created_from_upstream = True
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if chunk.get("prompt_token_ids") is not None:
            self.prompt_token_ids = chunk["prompt_token_ids"]
        choices = chunk.get("choices")
        if not choices:
            return events
        if type(choices) is not list or type(choices[0]) is not dict or (len(choices) > 1 and not all(type(c) is dict for c in choices)):
            raise _malformed("choices", "a list of objects")
        choice = choices[0]
        delta = choice.get("delta") or {}
        if type(delta) is not dict:
            raise _malformed("choices[0].delta", "an object")
        if self.collects_tokens:
            self._collect_tokens(choice)
        if "reasoning_content" in delta or "reasoning" in delta:
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                _reasoning_from_upstream(delta, self.config)  # raises the parser-mismatch error if the parser is off
                self._upstream_reasoning(events, reasoning)
        content = delta.get("content")
        if content:
            if type(content) is not str:
                raise _malformed("choices[0].delta.content", "a string")
            self._text(events, content)
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            if type(tool_calls) is not list:
                raise _malformed("choices[0].delta.tool_calls", "a list of {index, id, function}")
            for call in tool_calls:
                self._tool_call(events, call)
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            if type(finish_reason) is not str:
                raise _malformed("choices[0].finish_reason", "a string or null")
            self.finish_reason = finish_reason
        return events

    def _collect_tokens(self, choice: dict) -> None:
        token_ids = choice.get("token_ids")
        if token_ids is not None:  # checked with the others by extract_token_info at the end; not a list: now
            if type(token_ids) is not list:
                raise _malformed("choices[0].token_ids", "a list of integers or null")
            self.saw_token_ids = True
            self.token_ids.extend(token_ids)
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if isinstance(content, list):
            if not self.whole_entries:  # an entry that is not an object stays, to be reported as malformed at the end
                content = [_LogprobRead(entry.get("token"), entry.get("logprob")) if entry.__class__ is dict else entry
                           for entry in content]
            self.logprobs.extend(content)

    def take_tokens(self, token_ids: list[int], entries: list) -> None:
        """What feed() collects of a chunk whose token ids and log-prob entries the caller decoded (_collect_tokens);
        the entries of the kind `whole_entries` says."""
        if self.collects_tokens:
            self.saw_token_ids = True
            self.token_ids += token_ids
            self.logprobs += entries

    def _upstream_reasoning(self, events: list, text: str) -> None:
        # vLLM's own reasoning parser split it already: it becomes the first reasoning block (as non-streaming).
        if not isinstance(text, str) or not self.hold_reasoning(text):
            raise _malformed("choices[0].delta.reasoning", "reasoning that precedes all content")

    def hold_reasoning(self, text: str) -> bool:
        """vLLM's reasoning field (its `--reasoning-parser`) before any content: held for the reasoning item, with
        nothing to send; False, and nothing changed, once the message has begun (feed() reports that)."""
        if self.phase == "text":
            return False
        self.upstream_reasoning.append(text)
        return True

    def _text(self, events: list, text: str) -> None:
        if self.phase == "text":
            self._message_delta(events, text)
            return
        if self.hold_text(text):
            return
        self.held = "".join((self.held, *self.held_pieces, text))
        self.held_pieces = []
        if self.phase == "lead":
            stripped = self.held.lstrip()
            if stripped.startswith(_THINK_OPEN):
                self.phase = "think"
            elif _THINK_OPEN.startswith(stripped):
                return  # only whitespace or a partial "<thi" so far: keep waiting
            else:
                self._release_held(events)
                return
        opening = self.held.index(_THINK_OPEN)
        closing = self.held.find(_THINK_CLOSE, opening + len(_THINK_OPEN))
        if closing < 0:
            self.think_tail = self.held[opening + len(_THINK_OPEN):][1 - len(_THINK_CLOSE):]
            return
        self.think_block = self.held[opening + len(_THINK_OPEN):closing]
        # The whitespace before <think> stays message text, as the non-streaming parser keeps it.
        rest = self.held[:opening] + self.held[closing + len(_THINK_CLOSE):]
        self.held = ""
        self.phase = "text"
        self._open_reasoning(events)
        self._message_delta(events, rest)

    def hold_text(self, text: str) -> bool:
        """Inside a leading `<think>` block, text that does not end it is held, with nothing to send (what feed() does
        with chunks of only such text; their token ids and log probs the caller collects). Only that text and the
        block's last characters are searched for `</think>`, and it is kept as a piece: a long reasoning block costs
        what its length does, not its length squared (the held text was copied and searched whole at every chunk).
        False, and nothing changed, elsewhere or where `text` ends the block."""
        if self.phase != "think":
            return False
        seen = self.think_tail + text
        if seen.find(_THINK_CLOSE) >= 0:
            return False
        self.held_pieces.append(text)
        self.think_tail = seen[1 - len(_THINK_CLOSE):]
        return True

    def _release_held(self, events: list) -> None:
        """No leading reasoning block after all: what was held is message text (after any upstream reasoning)."""
        held, self.held = "".join((self.held, *self.held_pieces)), ""
        self.held_pieces = []
        self.phase = "text"
        if self.upstream_reasoning:
            self._open_reasoning(events)
        self._message_delta(events, held)

    def _tool_call(self, events: list, call: Any) -> None:
        if not isinstance(call, dict) or not isinstance(call.get("function") or {}, dict) or not isinstance(
                (call.get("function") or {}).get("name") or "", str):
            raise _malformed("choices[0].delta.tool_calls", "a list of {index, id, function: {name, arguments}}")
        function = call.get("function") or {}
        index = call.get("index", 0)
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        if self.phase != "text":
            self._release_held(events)
        open_call = self.open_item is not None and self.open_item["type"] == "function_call"
        # A new call: another index, or another id on the same one (some tool parsers number every call 0)
        if not open_call or index != self.tool_index or (call_id is not None and call_id != self.open_item["call_id"]):
            if index in self.tool_indexes_done and call_id is None:
                # its item was closed, its arguments sent whole: this delta would have made a call of its own
                raise _malformed("choices[0].delta.tool_calls",
                                 f"one call after another: a delta for call {index!r} came after a later call began")
            if open_call:
                self.tool_indexes_done.append(self.tool_index)
            self._close_open_item(events)
            call_id = call_id or _new_id("call")
            item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                    "name": function.get("name") or "", "arguments": ""}
            self._add_item(events, item)
            self.tool_index = index
            self.arguments = []
        arguments = function.get("arguments")
        if arguments:
            if not isinstance(arguments, str):
                raise _malformed("choices[0].delta.tool_calls[].function.arguments", "a string")
            self.arguments.append(arguments)
            self._event(events, "response.function_call_arguments.delta", item_id=self.open_item["id"],
                        output_index=len(self.output) - 1, delta=arguments)

    # --- items --------------------------------------------------------------------------------

    def _add_item(self, events: list, item: dict) -> None:
        self.output.append(item)
        self.open_item = item
        self._event(events, "response.output_item.added", output_index=len(self.output) - 1, item=dict(item))

    def _open_reasoning(self, events: list) -> None:
        """Sends the whole reasoning item (content parts, then summary parts); its `done` waits for the next item."""
        self._close_open_item(events)
        blocks = [text for text in ("".join(self.upstream_reasoning) or None, self.think_block) if text is not None]
        self.upstream_reasoning, self.think_block = [], None
        item = {"id": _new_id("rs"), "type": "reasoning", "status": "in_progress", "encrypted_content": None,
                "summary": [], "content": []}
        self._add_item(events, item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        # The same text twice: as content parts, then as summary parts (their events differ only in names).
        for field, part_type, part_events, text_events, index_key in (
                ("content", "reasoning_text", "response.content_part", "response.reasoning_text", "content_index"),
                ("summary", "summary_text", "response.reasoning_summary_part", "response.reasoning_summary_text", "summary_index")):
            for index, text in enumerate(blocks):
                at = {**where, index_key: index}
                part = {"type": part_type, "text": text}
                self._event(events, f"{part_events}.added", **at, part={"type": part_type, "text": ""})
                if text:
                    self._event(events, f"{text_events}.delta", **at, delta=text)
                self._event(events, f"{text_events}.done", **at, text=text)
                self._event(events, f"{part_events}.done", **at, part=part)
                item[field].append(part)

    def _message_delta(self, events: list, text: str) -> None:
        if not text:
            return
        if self.open_item is None or self.open_item["type"] != "message":
            self._open_message(events)
        self.message_text.append(text)
        # The event of nearly every token: built in one step, not by _event (a call and two dicts more: feed -28%).
        events.append({"type": "response.output_text.delta", "sequence_number": self.sequence, "item_id": self.open_item["id"],
                       "output_index": len(self.output) - 1, "content_index": 0, "delta": text, "logprobs": []})
        self.sequence += 1

    def take_text(self, text: str, count: int = 1) -> tuple[dict, int] | None:
        """What feed() does with `count` chunks that carry only text (no usage or finish reason; their token ids and
        log probs the caller collects), `text` in all, where that text is the open message's next delta (the phase is
        text and a message is open): the text appended, the events' sequence numbers taken; returns (the message item,
        the first number), for the caller to write the events. None, and nothing changed, where feed() has more to do."""
        item = self.open_item
        if self.phase != "text" or item is None or item["type"] != "message":
            return None
        self.message_text.append(text)
        self.sequence += count
        return item, self.sequence - count

    def _open_message(self, events: list) -> None:
        self._close_open_item(events)
        self.message_text = []
        self._add_item(events, {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []})
        self._event(events, "response.content_part.added", item_id=self.open_item["id"], output_index=len(self.output) - 1,
                    content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def _close_open_item(self, events: list, status: str = "completed") -> None:
        item = self.open_item
        if item is None:
            return
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        if item["type"] == "message":
            logprobs = _output_logprobs({"logprobs": {"content": self.logprobs}}) if wants_output_logprobs(self.request) else []
            part = {"type": "output_text", "text": "".join(self.message_text), "annotations": [], "logprobs": logprobs}
            self._event(events, "response.output_text.done", **where, content_index=0, text=part["text"], logprobs=logprobs)
            self._event(events, "response.content_part.done", **where, content_index=0, part=part)
            item["content"] = [part]
        elif item["type"] == "function_call":
            item["arguments"] = "".join(self.arguments)
            self._event(events, "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"])
        item["status"] = status
        self.open_item = None
        self._event(events, "response.output_item.done", output_index=len(self.output) - 1, item=item)

    # --- the end ------------------------------------------------------------------------------

    def finish(self) -> list[dict]:
        """The upstream stream ended: close what is open and send the final response."""
        if self.finish_reason is None:
            raise upstream_error("vLLM ended the stream before its final chunk (no finish_reason)")
        bundle = self._token_bundle() if self.config.return_token_id_information else {}  # may raise: before any event
        return self._finish(bundle)

    def context_overflow(self) -> list[dict]:
        """The prompt did not fit: an empty incomplete reply, exactly as without streaming."""
        self.finish_reason = "length"
        return self._finish({})

    def _finish(self, bundle: dict) -> list[dict]:
        events: list[dict] = []
        if self.phase != "text":
            self._release_held(events)  # an unterminated leading <think> stays text, as in non-streaming
        if self.open_item is None:
            self._open_message(events)  # a reply with nothing in it still has an (empty) message
        incomplete_reason = _INCOMPLETE_REASONS.get(self.finish_reason)
        self.open_item.update(bundle)  # the open item is the last one: token fields go there
        message_cut_short = incomplete_reason and self.open_item["type"] == "message"
        self._close_open_item(events, "incomplete" if message_cut_short else "completed")
        status = "incomplete" if incomplete_reason else "completed"
        final = self._snapshot(status, incomplete_reason, _usage_to_responses(self.usage))
        self._event(events, f"response.{status}", response=final)
        return events

    def _token_bundle(self) -> dict:
        choice = {"message": {}, "token_ids": self.token_ids if self.saw_token_ids else None,
                  "logprobs": {"content": self.logprobs} if self.logprobs or self.saw_token_ids else None}
        return extract_token_info({"prompt_token_ids": self.prompt_token_ids, "choices": [choice]})

    def fail(self, error: ApiError) -> list[dict]:
        """The upstream broke mid-stream: an `error` event, then `response.failed` with what was sent so far."""
        events: list[dict] = []
        if self.open_item is not None:
            self.open_item["status"] = "incomplete"
            if self.open_item["type"] == "message":
                self.open_item["content"] = [{"type": "output_text", "text": "".join(self.message_text), "annotations": [], "logprobs": []}]
            elif self.open_item["type"] == "function_call":
                self.open_item["arguments"] = "".join(self.arguments)
        self._event(events, "error", code=error.code, message=error.message, param=error.param)
        final = self._snapshot("failed")
        final["error"] = {"code": "server_error", "message": error.message}
        self._event(events, "response.failed", response=final)
        return events


class ChatStreamRelay:
    """Rewrites vLLM's chat chunks for `/v1/chat/completions` stream clients (reasoning as `<think>` text).

    Chunks without reasoning pass through untouched (the I/O layer forwards their bytes as they are).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.in_reasoning: set = set()  # the `index` of each choice inside an open <think> (n > 1 streams interleave)

    def needs(self, raw: bytes) -> bool:
        """Whether a raw `data:` line has to be parsed and rewritten."""
        return bool(self.in_reasoning) or raw.find(b'"reasoning') >= 0  # find: see _respelled

    def rewrite(self, chunk: Any) -> dict:
        if type(chunk) is not dict or not isinstance(chunk.get("choices") or [], list):
            raise _malformed("chunk", "an object with a list of `choices`")
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            reasoning = delta.pop("reasoning_content", None)
            reasoning = delta.pop("reasoning", None) or reasoning
            content = delta.get("content")
            if not isinstance(reasoning or "", str) or not isinstance(content or "", str):
                raise _malformed("choices[].delta", "{content, reasoning} as strings or null")
            if reasoning:
                _reasoning_from_upstream({"reasoning": reasoning}, self.config)
            index = choice.get("index", 0)
            if not isinstance(index, int):
                raise _malformed("choices[].index", "an integer")
            text = ""
            if reasoning:
                text = reasoning if index in self.in_reasoning else _THINK_OPEN + reasoning
                self.in_reasoning.add(index)
            if index in self.in_reasoning and (content or delta.get("tool_calls") or choice.get("finish_reason")):
                text += _THINK_CLOSE
                self.in_reasoning.discard(index)
            if text:
                delta["content"] = text + (content or "")
        return chunk


# ============================================================================================
# Backends: round-robin over base_urls with a bounded session-affinity table.
# ============================================================================================


class SessionTable:
    """session id -> upstream index; LRU-bounded, idle entries expire. O(1) per lookup."""

    def __init__(self, max_entries: int, idle_timeout_s: float, clock=time.monotonic) -> None:
        self._entries: collections.OrderedDict[str, list] = collections.OrderedDict()  # id -> [index, last_seen]
        self.max_entries = max_entries
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str) -> int | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        now = self._clock()
        if now - entry[1] > self.idle_timeout_s:
            del self._entries[session_id]
            return None
        entry[1] = now
        self._entries.move_to_end(session_id)
        return entry[0]

    def set(self, session_id: str, index: int) -> None:
        now = self._clock()
        self._entries[session_id] = [index, now]
        self._entries.move_to_end(session_id)
        # The oldest entries sit at the front: drop what is over the bound or idle for too long.
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest[1] <= self.idle_timeout_s:
                break
            self._entries.popitem(last=False)


def _affinity_score(session_id: str, base_url: str) -> int:
    # surrogateescape: aiohttp gives a header's bytes that are not UTF-8 as lone surrogates
    return int.from_bytes(hashlib.blake2b(f"{session_id}\0{base_url}".encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


@dataclasses.dataclass
class Upstream:
    """One vLLM OpenAI server, addressed by its base URL (ending in /v1 by convention), and its health.

    `healthy` is the proxy's verdict (ejected after failures, readmitted after successes);
    `unavailable` is set from outside (local_vllm while it restarts the engine): requests routed
    to an upstream that is not `usable` go elsewhere, or get a 503 at once when none is left.
    """

    base_url: str
    unavailable: str | None = None
    healthy: bool = True
    failures: int = 0       # in a row
    successes: int = 0      # in a row, while ejected
    last_error: str | None = None
    requests: int = 0       # requests it has taken
    ejections: int = 0
    restarts: int = 0       # of the engine behind it, counted by local_vllm
    ejected_at: float = 0.0  # time.monotonic() of its last ejection

    @property
    def usable(self) -> bool:
        return self.healthy and not self.unavailable

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def root_url(self) -> str:  # /health and /tokenize live at the server root, not under /v1
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url


class Balancer:
    """New sessions go round-robin over usable upstreams; a known session keeps its upstream while it is usable.

    With several worker processes (`deterministic`), a session's upstream is a pure function of its id
    and the upstreams' health (rendezvous hashing): every worker picks the same one with no shared table.
    """

    def __init__(self, base_urls: Sequence[str], table: SessionTable, eject_after: int = 3, readmit_after: int = 2,
                 name: str = "", deterministic: bool = False, retry_ejected_after_s: float | None = None) -> None:
        self.upstreams = [Upstream(url) for url in base_urls]
        self.sessions = table
        self.eject_after = eject_after
        self.readmit_after = readmit_after
        self.name = name
        self.deterministic = deterministic
        # Without health checks nothing readmitted an ejected upstream: every request was a 503 for good. Then it takes
        # requests again this long after its ejection, on probation: one more failure ejects it again at once.
        self.retry_ejected_after_s = retry_ejected_after_s
        self._next = 0

    def _retry_ejected(self) -> None:
        now = time.monotonic()
        for upstream in self.upstreams:
            if not upstream.healthy and now - upstream.ejected_at >= self.retry_ejected_after_s:
                upstream.healthy, upstream.failures, upstream.successes = True, self.eject_after - 1, 0
                log.info("server %s: upstream %s taking requests again, %.0f s after its ejection (no health checks)",
                         self.name, upstream.base_url, self.retry_ejected_after_s)

    def upstream_for(self, session_id: str | None, exclude: Sequence[Upstream] = ()) -> Upstream:
        """The session's upstream; re-pinned round-robin if it is not usable. 503 when nothing is usable."""
        if self.retry_ejected_after_s is not None:
            self._retry_ejected()
        if len(self.upstreams) == 1 and not exclude:
            upstream = self.upstreams[0]
            if not upstream.usable:
                raise self._none_usable()
            return upstream
        if self.deterministic and session_id:
            candidates = [u for u in self.upstreams if u.usable and u not in exclude]
            if not candidates:
                raise self._none_usable()
            return max(candidates, key=lambda u: _affinity_score(session_id, u.base_url))
        index = self.sessions.get(session_id) if session_id else None
        if index is not None and self.upstreams[index].usable and self.upstreams[index] not in exclude:
            return self.upstreams[index]
        for _ in range(len(self.upstreams)):
            candidate = self._next
            self._next = (self._next + 1) % len(self.upstreams)
            upstream = self.upstreams[candidate]
            if upstream.usable and upstream not in exclude:
                if session_id:
                    self.sessions.set(session_id, candidate)  # a new session, or one moved off a failed upstream
                return upstream
        raise self._none_usable()

    def _none_usable(self) -> ApiError:
        reasons = "; ".join(f"{u.base_url}: {u.unavailable or u.last_error or 'ejected'}" for u in self.upstreams if not u.usable)
        return ApiError(503, f"no healthy vLLM upstream for server `{self.name}` ({reasons or 'all tried'}); retry later",
                        code="upstream_unavailable")

    def record(self, upstream: Upstream, ok: bool, detail: str = "") -> None:
        """Counts a success or failure (from a health check or a request); ejects and readmits at the thresholds."""
        if ok:
            upstream.failures = 0
            if not upstream.healthy:
                upstream.successes += 1
                if upstream.successes >= self.readmit_after:
                    upstream.healthy, upstream.successes, upstream.last_error = True, 0, None
                    log.info("server %s: upstream %s readmitted after %d good health checks", self.name, upstream.base_url, self.readmit_after)
            return
        upstream.successes = 0
        upstream.failures += 1
        upstream.last_error = detail or upstream.last_error
        if upstream.healthy and upstream.failures >= self.eject_after:
            upstream.healthy = False
            upstream.ejected_at = time.monotonic()
            upstream.ejections += 1
            log.warning("server %s: upstream %s ejected after %d failures in a row: %s", self.name, upstream.base_url,
                        upstream.failures, detail)


# ============================================================================================
# Metrics: counters, gauges and histograms in Prometheus' text format (a few dicts; no dependency).
# ============================================================================================

# Seconds; rollouts run from milliseconds (a 1-token judge) to many minutes (long reasoning).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Prometheus histogram: per-bucket counts (cumulated only when exposed), sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


def _label_value(value: Any) -> str:
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


class Metrics:
    """What one server has done since it started. Handlers count into it; `families()` lists it for `render_families`.

    Families are built as (name, type, help, sample lines) so that those of several worker processes
    can be merged family by family (`merge_families`).
    """

    def __init__(self, server: str) -> None:
        self.server = server
        self.requests: collections.Counter = collections.Counter()      # (endpoint, status) -> n
        self.in_flight: collections.Counter = collections.Counter()     # endpoint -> n
        self.request_seconds: dict[str, Histogram] = collections.defaultdict(Histogram)   # endpoint -> latency
        self.upstream_seconds: dict[str, Histogram] = collections.defaultdict(Histogram)  # base_url -> latency
        self.stream_events: collections.Counter = collections.Counter()  # endpoint -> SSE events sent
        self.context_overflows = 0
        self.failovers = 0

    def families(self, balancer: Balancer, extra_labels: dict | None = None) -> list[tuple[str, str, str, list[str]]]:
        base = {"server": self.server, **(extra_labels or {})}

        def sample(name: str, value: float, **labels: Any) -> str:
            return f"{name}{_labels({**base, **labels})} {value}"

        def family(name: str, kind: str, help_text: str, rows: Iterable[tuple[float, dict]]) -> tuple[str, str, str, list[str]]:
            return name, kind, help_text, [sample(name, value, **labels) for value, labels in rows]

        def histogram(name: str, help_text: str, histograms: dict[str, Histogram], label: str) -> tuple[str, str, str, list[str]]:
            lines = []
            for key, hist in sorted(histograms.items()):
                cumulative = 0
                for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), hist.counts):
                    cumulative += count
                    lines.append(sample(f"{name}_bucket", cumulative, **{label: key, "le": bound if bound == "+Inf" else f"{bound:g}"}))
                lines.append(sample(f"{name}_sum", hist.sum, **{label: key}))
                lines.append(sample(f"{name}_count", cumulative, **{label: key}))
            return name, "histogram", help_text, lines

        upstreams = balancer.upstreams
        return [
            family("gym_vllm_requests_total", "counter", "Requests answered, by endpoint and HTTP status.",
                   ((n, {"endpoint": e, "status": s}) for (e, s), n in sorted(self.requests.items()))),
            family("gym_vllm_requests_in_flight", "gauge", "Requests being handled now, by endpoint.",
                   ((n, {"endpoint": e}) for e, n in sorted(self.in_flight.items()))),
            histogram("gym_vllm_request_duration_seconds", "Time from request to the last byte of the answer (streams included).",
                      self.request_seconds, "endpoint"),
            histogram("gym_vllm_upstream_duration_seconds", "Time from sending to vLLM to the end of its answer, by upstream.",
                      self.upstream_seconds, "upstream"),
            family("gym_vllm_stream_events_total", "counter", "SSE events sent to clients, by endpoint.",
                   ((n, {"endpoint": e}) for e, n in sorted(self.stream_events.items()))),
            family("gym_vllm_context_overflows_total", "counter", "Prompts over the context length answered as empty incomplete replies.",
                   [(self.context_overflows, {})]),
            family("gym_vllm_failovers_total", "counter", "Requests moved to another upstream because the first could not take them.",
                   [(self.failovers, {})]),
            family("gym_vllm_upstream_requests_total", "counter", "Requests sent to each upstream.",
                   ((u.requests, {"upstream": u.base_url}) for u in upstreams)),
            family("gym_vllm_upstream_healthy", "gauge", "1 while the upstream takes requests (not ejected, not restarting), else 0.",
                   ((int(u.usable), {"upstream": u.base_url}) for u in upstreams)),
            family("gym_vllm_upstream_ejections_total", "counter", "Times the upstream was ejected after failures in a row.",
                   ((u.ejections, {"upstream": u.base_url}) for u in upstreams)),
            family("gym_vllm_engine_restarts_total", "counter", "Restarts of the vLLM engine behind the upstream (local_vllm only).",
                   ((u.restarts, {"upstream": u.base_url}) for u in upstreams)),
            family("gym_vllm_sessions", "gauge", "Entries in the session-affinity table.", [(len(balancer.sessions), {})]),
            family("process_cpu_seconds_total", "counter", "CPU time (user and system) of this process.",
                   [(round(time.process_time(), 3), {})]),
            family("process_resident_memory_bytes", "gauge", "Resident memory of this process.", [(_resident_bytes(), {})]),
        ]


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best the standard library knows
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def merge_families(expositions: Iterable[list]) -> list[tuple[str, str, str, list[str]]]:
    """Families of several processes as one: samples of a family side by side (each process labels its own)."""
    merged: dict[str, tuple[str, str, str, list[str]]] = {}
    for families in expositions:
        for name, kind, help_text, lines in families:
            merged.setdefault(name, (name, kind, help_text, []))[3].extend(lines)
    return list(merged.values())


def render_families(families: Iterable[tuple[str, str, str, list[str]]]) -> str:
    """Prometheus text exposition (format 0.0.4) of (name, type, help, sample lines)."""
    out = []
    for name, kind, help_text, lines in families:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        out.extend(line + "\n" for line in lines)
    return "".join(out)


# ============================================================================================
# HTTP: aiohttp handlers; every failure leaves as OpenAI error JSON.
# ============================================================================================

CONFIG_KEY = web.AppKey("config", ServerConfig)
BALANCER_KEY = web.AppKey("balancer", Balancer)
CLIENT_KEY = web.AppKey("client", aiohttp.ClientSession)
STREAM_TIMEOUT_KEY = web.AppKey("stream_timeout", aiohttp.ClientTimeout)
STARTED_KEY = web.AppKey("started_at", float)
METRICS_KEY = web.AppKey("metrics", Metrics)
METRICS_DIR_KEY = web.AppKey("metrics_dir", str)
SESSION_HEADER = "X-Session-ID"
REQUEST_ID_HEADER = "X-Request-Id"  # kept from the client or made here; sent on to vLLM (its completion id) and back
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces: safe in logs and headers
ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
access_log = log.getChild("access")  # one line per request at INFO; off unless enabled (`--access-log`)


class RequestContext:
    """One request on its way through the proxy: made by `error_middleware`, handed to the helpers in place of the
    aiohttp request. It holds the server's parts, looked up once (`request.app[key]` costs three Python calls; a request
    made ~15 such lookups, 2% of its instructions), the request id, and what the handlers learn on the way."""

    __slots__ = ("request", "app", "config", "metrics", "request_id", "upstream", "upstream_started", "client_gone")

    def __init__(self, request: web.Request, request_id: str) -> None:
        self.request = request
        self.app = app = request.app
        self.config = app[CONFIG_KEY]  # per request: local_vllm replaces it when it (re)starts its engine
        self.metrics = app[METRICS_KEY]
        self.request_id = request_id
        self.upstream: Upstream | None = None  # the upstream that took the request
        self.upstream_started = 0.0  # perf_counter() when the request was sent to it
        self.client_gone = False  # set when a stream's client disconnected


CONTEXT_KEY = web.RequestKey("context", RequestContext)


_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}  # as given: content_type= and charset= parse it


def _json_response(body: Any, status: int = 200) -> web.Response:
    """`body`: a JSON value, or its encoding (`response_json`)."""
    raw = body if isinstance(body, bytes) else _dumps(body).encode()
    return web.Response(body=raw, status=status, headers=_JSON_HEADERS)


async def _read_json_object(request: web.Request) -> dict:
    try:
        raw = await request.read()  # over client_max_size -> HTTPRequestEntityTooLarge, rendered by the middleware
    except web.RequestPayloadError as exc:  # say, gzip that does not decompress (was a 500)
        raise bad_request(f"request body cannot be read: {exc}") from None
    try:
        body = _loads(raw, sendable=True)
    except LoneSurrogate as exc:
        raise bad_request(f"request body {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def _plain_name(server_name: str) -> str:
    """The server's name in letters, digits and `_` only: safe in a cookie name and a file name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", server_name)


@functools.lru_cache(maxsize=64)
def _cookie_name(server_name: str) -> str:
    return f"gym_vllm_{_plain_name(server_name)}"


def _session_of(request: web.Request, config: ServerConfig) -> tuple[str | None, str | None]:
    """(session id, cookie value to set): `X-Session-ID` wins, then the server's cookie, else a new session."""
    if len(config.base_url) == 1:
        return None, None  # nothing to choose between: no session needed
    header = request.headers.get(SESSION_HEADER)
    if header:
        return header, None
    cookie = request.cookies.get(_cookie_name(config.name))
    if cookie:
        return cookie, None
    new = os.urandom(16).hex()
    return new, new


def _timeout_error(config: ServerConfig, url: str) -> ApiError:
    return upstream_error(f"vLLM at {url} did not answer within the server's timeouts (connect_timeout_s="
                          f"{config.connect_timeout_s}, request_timeout_s={config.request_timeout_s})",
                          code="upstream_timeout", status=504)


class NotReached(ApiError):
    """The connection to vLLM failed before the request was sent: safe to try another upstream."""


async def _open_upstream(context: RequestContext, url: str, payload: dict) -> aiohttp.ClientResponse:
    """POSTs JSON to vLLM and returns the response with its body unread, or raises a 502/504 ApiError."""
    config = context.config
    headers = {"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json",
               REQUEST_ID_HEADER: context.request_id}
    # Streams also get an idle timeout; others keep the session's (passing timeout=None would disable it).
    options = {"timeout": context.app[STREAM_TIMEOUT_KEY]} if payload.get("stream") else {}
    try:
        return await context.app[CLIENT_KEY].post(url, data=request_json(payload), headers=headers, **options)
    except aiohttp.ClientConnectorError as exc:
        raise NotReached(502, f"cannot reach vLLM at {url}: {exc.__class__.__name__}: {exc}", code="upstream_unreachable") from None
    except asyncio.TimeoutError:
        raise _timeout_error(config, url) from None
    except aiohttp.ClientError as exc:
        raise upstream_error(f"vLLM at {url} dropped the request: {exc.__class__.__name__}: {exc}", code="upstream_unreachable") from None


async def _read_upstream(context: RequestContext, response: aiohttp.ClientResponse, url: str,
                         schema: type | None = None) -> tuple[int, Any]:
    """Reads a whole upstream answer: (status, parsed JSON or a text excerpt); a 200's as far as `schema` needs."""
    try:
        raw = await response.read()
    except asyncio.TimeoutError:
        raise _timeout_error(context.config, url) from None
    except aiohttp.ClientError as exc:
        raise upstream_error(f"vLLM at {url} broke off its answer: {exc.__class__.__name__}: {exc}", code="upstream_unreachable") from None
    finally:
        response.release()
    body, why = None, ""
    try:  # sendable: what is decoded here is sent on, as the Response or the error's message
        body = _loads(raw, schema if response.status == 200 else None, sendable=True) if raw else None
    except LoneSurrogate:
        if response.status == 200:
            raise upstream_error(f"vLLM at {url} answered 200 with JSON that {LONE_SURROGATE_IN_REPLY}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # an error's text excerpt below keeps what was written
        why = f" ({exc})"
    if response.status == 200:
        if not isinstance(body, dict):
            raise upstream_error(f"vLLM at {url} answered 200 with a body that is not a JSON object{why}")
        return 200, body
    return response.status, body if body is not None else raw[:500].decode("utf-8", "replace")


async def _post_upstream(context: RequestContext, url: str, payload: dict) -> tuple[int, Any]:
    return await _read_upstream(context, await _open_upstream(context, url, payload), url)


def _error_message(body: Any) -> str | None:
    """The message of an error reply: an OpenAI error object, a bare `error` or `message` (NeMo Gym's 500s, vLLM's
    401), FastAPI's `detail`, or a text body. None when there is none (the proxy and `collect` both read replies)."""
    if isinstance(body, str):
        return body or None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, dict):
                if value.get("message"):
                    return _text_of(value["message"])
            elif value:
                return _text_of(value)  # FastAPI's 422 `detail` is a list of objects: as JSON, not a Python repr
    return None


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


def _upstream_failure(config: ServerConfig, url: str, status: int, body: Any) -> ApiError:
    """Maps an upstream non-200 to the client's error: 4xx keep status and message, the rest are 502."""
    error = body.get("error") if isinstance(body, dict) else None
    message = _error_message(body) or (f"vLLM at {url} answered HTTP {status} with no error message"  # never ""
                                       + (f": {_dumps(body)[:300]}" if body not in (None, "") else " (an empty body)"))
    if status in (401, 403):
        return upstream_error(f"vLLM at {url} rejected the api_key of server `{config.name}` ({config.source}); "
                              f"set `api_key` to the key vllm serve was started with", code="upstream_auth_failed")
    if 400 <= status < 500:
        param = error.get("param") if isinstance(error, dict) else None
        return ApiError(status, message, param=param if isinstance(param, str) else None, code="upstream_rejected")
    return upstream_error(f"vLLM at {url} failed with HTTP {status}: {message}")


async def _chat_upstream(context: RequestContext, session_id: str | None, chat_body: dict,
                         schema: type | None = None) -> dict | aiohttp.ClientResponse | None:
    """Sends a chat body to the session's upstream.

    Returns the completion (decoded as far as `schema` needs); for `stream: true` the open upstream response, to be
    relayed; None when the prompt did not fit (context overflow). Any other failure raises before anything reached
    the client.
    """
    config = context.config
    upstream, response = await _send_with_failover(context, session_id, chat_body)
    if response.status == 200 and chat_body.get("stream"):
        return response
    try:
        status, body = await _read_upstream(context, response, upstream.chat_url, schema)
    finally:  # a timeout or a broken answer is timed too: slow vLLM is what the histogram is for
        _observe_upstream(context, upstream)
    if status != 200:
        failure = _upstream_failure(config, upstream.chat_url, status, body)
        if is_context_overflow(status, failure.message) and not config.propagate_context_overflow_errors:
            context.metrics.context_overflows += 1
            log.warning("server %s: request %s: context length exceeded, answering an empty incomplete reply: %s",
                        config.name, context.request_id, failure.message)
            return None
        raise failure
    if config.return_token_id_information and body.get("prompt_token_ids") in _NULLS:
        try:  # a bundle on the message needs no prompt ids, and a malformed reply is refused before another call
            extract_token_info(body)
        except PromptIdsMissing:
            body["prompt_token_ids"] = await _tokenize(context, upstream, chat_body)
    return body


async def _send_with_failover(context: RequestContext, session_id: str | None, chat_body: dict) -> tuple[Upstream, aiohttp.ClientResponse]:
    """Opens the request on the session's upstream, moving it to the next healthy one only when the
    first could not have seen it (connection refused) or said 503: never a blind retry after vLLM may
    have generated. Bounded attempts with backoff; 503 at once when no upstream is usable."""
    config = context.config
    balancer = context.app[BALANCER_KEY]
    tried: list[Upstream] = []
    failure: ApiError | None = None
    for attempt in range(config.max_attempts):
        try:
            upstream = balancer.upstream_for(session_id, exclude=tried)
        except ApiError:
            if failure is None:
                raise
            break  # nothing else to try: report what went wrong with the last one
        if attempt:  # every earlier attempt failed before vLLM could generate
            if attempt == 1:
                context.metrics.failovers += 1  # a request moved, whatever happens next
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
        context.upstream_started = time.perf_counter()
        try:
            response = await _open_upstream(context, upstream.chat_url, chat_body)
        except NotReached as exc:
            balancer.record(upstream, False, exc.message)
            tried.append(upstream)
            failure = exc
            continue
        except ApiError as exc:  # sent, then timed out or dropped
            _observe_upstream(context, upstream)
            balancer.record(upstream, False, exc.message)
            raise
        if response.status == 503:  # vLLM refusing work (overloaded or shutting down): it generated nothing
            try:
                _, body = await _read_upstream(context, response, upstream.chat_url)
            finally:
                _observe_upstream(context, upstream)
            failure = _upstream_failure(config, upstream.chat_url, 503, body)
            balancer.record(upstream, False, failure.message)
            tried.append(upstream)
            continue
        balancer.record(upstream, response.status not in (502, 504), f"HTTP {response.status}")
        upstream.requests += 1
        context.upstream = upstream
        if tried:
            log.info("server %s: request %s moved from %s to %s", config.name, context.request_id,
                     ", ".join(u.base_url for u in tried), upstream.base_url)
        return upstream, response
    raise failure


def _observe_upstream(context: RequestContext, upstream: Upstream) -> None:
    """Records how long the upstream took, from sending the request to the end of its answer (or its failure)."""
    context.metrics.upstream_seconds[upstream.base_url].observe(time.perf_counter() - context.upstream_started)


def _set_session_cookie(response: web.StreamResponse, config: ServerConfig, new_session: str | None) -> web.StreamResponse:
    """Hands a new session its cookie, so cookie-keeping clients stay on one upstream."""
    if new_session and len(config.base_url) > 1:
        response.set_cookie(_cookie_name(config.name), new_session, httponly=True, samesite="Lax", max_age=int(config.session_idle_timeout_s))
    return response


async def _tokenize(context: RequestContext, upstream: Upstream, chat_body: dict) -> list[int]:
    """Fallback for vLLM builds that ignore `return_token_ids`: one /tokenize call for the prompt ids."""
    payload = {k: chat_body[k] for k in ("model", "messages", "tools", "chat_template_kwargs") if k in chat_body}
    url = f"{upstream.root_url}/tokenize"
    status, body = await _post_upstream(context, url, payload)
    if status != 200 or not isinstance(body.get("tokens"), list):
        raise upstream_error(f"vLLM returned no prompt_token_ids and {url} failed (HTTP {status})", code="token_ids_missing")
    return body["tokens"]


async def handle_responses(request: web.Request) -> web.StreamResponse:
    context = request[CONTEXT_KEY]
    config = context.config
    body = await _read_json_object(request)
    chat_body = responses_request_to_chat(body, config)
    session_id, new_session = _session_of(request, config)
    chat = await _chat_upstream(context, session_id, chat_body, None if wants_output_logprobs(body) else CompletionForResponse)
    if body.get("stream"):
        return await _relay_stream(context, chat, new_session, _ResponsesSSE(ResponsesStream(body, config)), chat_body)
    response = context_overflow_response(body, config) if chat is None else chat_response_to_responses(chat, body, config)
    return _set_session_cookie(_json_response(response_json(response)), config, new_session)


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    context = request[CONTEXT_KEY]
    config = context.config
    body = await _read_json_object(request)
    chat_body = prepare_chat_request(body, config, metadata=body.get("metadata") if isinstance(body.get("metadata"), dict) else None)
    session_id, new_session = _session_of(request, config)
    chat = await _chat_upstream(context, session_id, chat_body)
    if body.get("stream"):
        return await _relay_stream(context, chat, new_session, _ChatSSE(config))
    response = context_overflow_chat_response(config) if chat is None else chat_response_for_client(chat, body, config)
    return _set_session_cookie(_json_response(response), config, new_session)


# --- streaming: relay vLLM's SSE as it arrives --------------------------------------------------

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse_event(event: dict, written: dict | None = None) -> bytes:
    """One event as SSE: exactly `event: <type>\\ndata: <_dumps(event)>\\n\\n`, written the fast way for its kind.
    `written`: see _item_for_msgspec."""
    kind = event["type"]
    if kind == "response.output_text.delta" and not event["logprobs"]:
        # The event of nearly every token: formatted directly, byte for byte what _dumps would write,
        # at a tenth of the cost (ids are our own hex strings; the delta goes through the encoder).
        return ('event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
                f'{event["sequence_number"]},"item_id":"{event["item_id"]}","output_index":{event["output_index"]},'
                f'"content_index":{event["content_index"]},"delta":{_json_string(event["delta"])},"logprobs":[]}}\n\n').encode()
    # The others by msgspec where it writes the same: where no float can be (the last ones hold the whole text, up
    # to four times: the standard library's string encoder cost ~1,100 instructions per event of a 256-token stream).
    if _msgspec_encode is None:
        data = _dumps(event).encode()
    elif "response" in event:  # response.created ... completed: {type, sequence_number, response}, an envelope
        data = b'{"type":"%b","sequence_number":%d,"response":%b}' % (kind.encode(), event["sequence_number"],
                                                                      response_json(event["response"], written))
    elif "item" in event:  # output_item.added and .done: the item as the non-streaming reply writes it
        data = _msgspec_encode({**event, "item": _item_for_msgspec(event["item"], written)})
    elif event.get("logprobs") or (event.get("part") or {}).get("logprobs"):  # the floats of any other event
        data = _dumps(event).encode()
    else:
        data = _msgspec_encode(event)
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), data)


def _sse_bytes(events: list[dict]) -> bytes:
    written: dict = {}  # the events of one call hold the same lists (ids stay valid: the events hold them)
    return b"".join([_sse_event(event, written) for event in events])


async def _open_sse(context: RequestContext, new_session: str | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID_HEADER: context.request_id})
    _set_session_cookie(response, context.config, new_session)
    await response.prepare(context.request)
    return response


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


# What JSON allows around a value, and all that is stripped around a `data:` payload: bytes.strip() would also take a form
# feed or a vertical tab, making a payload valid JSON that a chat stream's runs pass on as it came, invalid.
_JSON_WHITESPACE = b" \t\r\n"


class _DataLines:
    """vLLM's SSE split into the payloads of its `data:` lines, one network read at a time (a burst of chunks goes out
    in one write); `done` once `data: [DONE]` came, after which nothing more is read."""

    __slots__ = ("pending", "done")

    def __init__(self) -> None:
        self.pending = b""  # an incomplete last line waits for the next read
        self.done = False

    def payloads(self, block: bytes) -> list[bytes]:
        lines = (self.pending + block).split(b"\n")
        self.pending = lines.pop()
        batch = []
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].strip(_JSON_WHITESPACE)
                if data == b"[DONE]":
                    self.done = True
                    break
                batch.append(data)
        return batch


def _whole_events(block: bytes) -> int:
    """How many events `block` is made of when it is nothing but whole `data: <payload>\n\n` events, none of them
    `[DONE]`, as nearly every read of vLLM's stream is (it writes each chunk so); 0 when it is anything else. Such a
    block's payloads are what `_DataLines` finds in it, up to the JSON whitespace around them, which it strips."""
    if not (block.startswith(b"data: ") and block.endswith(b"\n\n")) or block.find(b"[DONE]") >= 0:
        return 0
    count = block.count(b"\n\ndata: ") + 1
    return count if block.count(b"\n") == 2 * count else 0  # no line but the data lines and the blank ones


def _parse_chunk(data: bytes) -> dict:
    try:
        chunk = _loads(data, sendable=True)
    except LoneSurrogate:
        raise upstream_error(f"vLLM sent a stream chunk that {LONE_SURROGATE_IN_REPLY}") from None
    except (ValueError, UnicodeDecodeError):
        raise upstream_error("vLLM sent a stream chunk that is not JSON") from None
    if isinstance(chunk, dict) and chunk.get("error"):
        error = chunk["error"]
        raise upstream_error(f"vLLM failed mid-stream: {error.get('message') if isinstance(error, dict) else error}")
    return chunk


class _IdleWatch:
    """A stream's `stream_idle_timeout_s`, kept by one timer for its whole body. aiohttp's own (`sock_read`), which
    bounds the wait for vLLM's headers, re-arms a timer at every network read (1.6% of the relay's CPU at 64 streams,
    py-spy): the watch switches it off for the body it takes over. The relay notes when it starts to wait for vLLM
    (`waiting_since`; None while it converts and writes, as a slow client is not a silent engine); the timer fires when
    that wait may have lasted `idle` seconds, and is set again where it has not. A wait that has ends in the stream's
    read, with the timeout's 504. Without the timeout (null) it keeps nothing."""

    __slots__ = ("content", "config", "loop", "timer", "waiting_since")

    def __init__(self, upstream: aiohttp.ClientResponse, config: ServerConfig) -> None:
        self.content, self.config = upstream.content, config
        self.loop = asyncio.get_running_loop()
        self.waiting_since: float | None = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        if config.stream_idle_timeout_s:
            self.timer = self.loop.call_at(self.waiting_since + config.stream_idle_timeout_s, self._check)
            connection = upstream.connection
            protocol = connection.protocol if connection is not None else None  # None: the body is already all here
            if protocol is not None:  # for this response (the next request sets its own); its timer armed now, stopped
                protocol.read_timeout = None
                protocol.start_timeout()

    def _check(self) -> None:
        since, now, idle = self.waiting_since, self.loop.time(), self.config.stream_idle_timeout_s
        if since is not None and now - since >= idle:
            self.content.set_exception(upstream_error(
                f"vLLM sent nothing for {idle:g} s mid-stream (stream_idle_timeout_s of server `{self.config.name}`, "
                f"{self.config.source})", code="upstream_timeout", status=504))
        else:
            self.timer = self.loop.call_at((now if since is None else since) + idle, self._check)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _stream_failure(config: ServerConfig, exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return _timeout_error(config, "the stream")
    return upstream_error(f"vLLM broke off the stream: {exc.__class__.__name__}: {exc}", code="upstream_unreachable")


# The shortcut for the chunk of nearly every token (`_ResponsesSSE.convert`). vLLM writes each chunk of a stream with
# the same head, `{"id":"chatcmpl-…","object":"chat.completion.chunk","created":…,"model":"…","choices":[{"index":0,
# "delta":{`: checked once by _CHUNK_HEAD on a chunk that decoded, its bytes then vouch for every chunk that starts
# with them. After it, `"content":"<text>"` and one of _TEXT_CHUNK_TAILS make a chunk with nothing but that text, which
# is valid JSON where the text has no quote, backslash or control character (_NOT_PLAIN_TEXT) and is UTF-8: such a
# string's JSON is its bytes between quotes, as `_json_string` writes its decoded text. A text with escapes (a newline,
# a quote) is decoded and written again to check that its bytes are what `_json_string` writes (_escaped_chunk_texts).
_CHUNK_HEAD = re.compile(rb'\{"id":"[^"\\\x00-\x1f]*","object":"chat\.completion\.chunk","created":[0-9]+,'
                         rb'"model":"[^"\\\x00-\x1f]*","choices":\[\{"index":0,"delta":\{')
_TEXT_CHUNK_TAILS = (b'"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',  # vLLM 0.11+
                     b'"},"logprobs":null,"finish_reason":null}]}')
_NOT_PLAIN_TEXT = re.compile(rb'["\\\x00-\x1f]')


def _chunk_heads(data: bytes) -> tuple[bytes, bytes] | None:
    """The head of a chunk that decoded (_CHUNK_HEAD, the stream's), with `"content":"` and with `"reasoning":"`: what
    the stream's text chunks and those of vLLM's reasoning field start with. None for a chunk of another shape."""
    match = _CHUNK_HEAD.match(data)
    return (match.group() + b'"content":"', match.group() + b'"reasoning":"') if match else None


def _escaped_chunk_texts(texts: Sequence[bytes]) -> str | None:
    """The text of text chunks whose JSON strings (`texts`: their bytes between the quotes) hold escapes (a newline, a
    quote), where each is exactly what _json_string writes of its text, as vLLM writes it: its event can then be
    written from these bytes. None where one is not (another spelling of an escape, a raw control character, a lone
    surrogate, a quote that ends it) or does not decode. One decoding and one encoding of them all."""
    body = b'["%b"]' % b'","'.join(texts)
    try:
        values = _loads(body, sendable=True)
        if values.__class__ is list and len(values) == len(texts) and _string_list_json(values) == body:
            return "".join(values)
    except (ValueError, UnicodeDecodeError):  # feed's way reports it
        pass
    return None


def _chunk_text(raw_text: bytes) -> str | None:
    """A text chunk's text from its JSON string's bytes (between the quotes), where they are what _json_string writes
    of it (plain, or with escapes: _escaped_chunk_texts); None for an empty text (feed() sends nothing for it) or one
    that is not so."""
    if not raw_text:
        return None
    if _NOT_PLAIN_TEXT.search(raw_text) is None:
        try:
            return raw_text.decode()
        except UnicodeDecodeError:  # feed's way reports it
            return None
    return _escaped_chunk_texts((raw_text,))


def _text_chunk_parts(data: bytes, start: int) -> tuple[bytes, bytes, str] | None:
    """A chunk that is a head (`start` bytes long), a JSON string's bytes and one of _TEXT_CHUNK_TAILS: (the tail, the
    string's bytes, its text as `_chunk_text` gives it); None for any other chunk."""
    for tail in _TEXT_CHUNK_TAILS:
        if data.endswith(tail):
            break
    else:
        return None
    raw_text = data[start:len(data) - len(tail)]
    text = _chunk_text(raw_text)
    return None if text is None else (tail, raw_text, text)


def _string_list_json(values: list[str]) -> bytes:
    """`_dumps(values).encode()` for a list of str: msgspec escapes every character as json does (ensure_ascii off)."""
    return _msgspec_encode(values) if _msgspec_encode is not None else _dumps(values).encode()


# A token-ID stream's text chunk (`return_token_ids`, log probs), as `_ResponsesSSE._token_event` takes it: after the
# stream's head and `"content":"`, the text (as above), its tokens' log-prob entries and their ids (one token, or a few
# where vLLM sent several in one chunk, as it does when its engine is busy). The pattern only delimits them (an entry's
# token has no escape, so no `"`, and its bytes are numbers): what they hold is then decoded as JSON, as decoding the
# chunk would (the ids by int(), as JSON spells them), and a chunk whose parts do not decode goes feed's way.
_LOGPROB_ENTRY = rb'\{"token":"[^"\\\x00-\x1f]*","logprob":[-+.0-9eE]+,"bytes":\[[0-9,]*\],"top_logprobs":\[\]\}'
_TOKEN_ID = rb'(?:0|[1-9][0-9]*)'
# The text: not empty, plain characters and escapes (the loop unrolled: a class repeated runs at C speed in sre, where
# an alternation tried at every character cost 0.13 us a chunk).
_TOKEN_CHUNK_REST = re.compile(rb'((?!")[^"\\\x00-\x1f]*(?:\\[^\x00-\x1f][^"\\\x00-\x1f]*)*)"\},"logprobs":\{"content":\[(%b(?:,%b)*)\]\},'
                               rb'"finish_reason":null,"token_ids":\[(%b(?:,%b)*)' % (_LOGPROB_ENTRY, _LOGPROB_ENTRY, _TOKEN_ID, _TOKEN_ID))
_TOKEN_CHUNK_END = b"]}]}"                       # after the ids: their list, the choice, the choices and the chunk closed
_TOKEN_READ_END = _TOKEN_CHUNK_END + b"\n\n"
_TOKEN_SEPARATOR = _TOKEN_READ_END + b"data: "   # between two chunks' events in a read
_TOKEN_RUN_LAST = b'"finish_reason":null,"token_ids":['  # ends a token-ID stream's chunks but its last (finish, usage)
_TOKEN_RUN_MIN = 4
# The fewest bytes a token-ID chunk's event has after its head: a one-byte text, an entry with nothing in it, one id.
_TOKEN_CHUNK_SHORTEST_REST = len(b'x"},"logprobs":{"content":[{}]},"finish_reason":null,"token_ids":[0]}]}\n\n')
_TEXT_DELTA_EVENT = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
_TEXT_DELTA_END = b'","logprobs":[]}\n\n'
_TEXT_DELTA_NEXT = _TEXT_DELTA_END + _TEXT_DELTA_EVENT
_DECIMALS = tuple(b"%d" % number for number in range(4096))  # sequence numbers, written once
_MATCH_GROUPS = operator.methodcaller("groups")


class _ResponsesSSE:
    """`/v1/responses` framing for `_relay_stream`: chunks in, Responses events out (the state machine does the work).

    A chunk that only carries the open message's next text, nearly every one, takes a shortcut: recognized by its
    bytes, its event written from them (`_CHUNK_HEAD`), byte for byte what decoding it and feeding it to the machine
    would send, at a third of the CPU (paired against the pass-through, ~2 us less per event). So do a token-ID
    stream's text chunks (`_TOKEN_CHUNK_REST`: their ids and log-prob entries collected), the text of a leading
    `<think>` block and the chunks of vLLM's own reasoning field (held, nothing to send). A read's run of such chunks,
    nearly all of every read, is converted at once (`run_in`, `convert_run`). `sent` counts the events written."""

    def __init__(self, machine: ResponsesStream) -> None:
        self.machine = machine
        self.sent = 0
        self.text_chunk_head: bytes | None = None  # the stream's chunk head and `"content":"`, once checked
        self.reasoning_chunk_head: bytes | None = None  # the same and `"reasoning":"`: vLLM's reasoning field
        self.reasoning_read_head = b""             # a reasoning chunk's event up to its text
        self.head_checked = False
        self.text_read_head = b""                  # a text chunk's event up to its text
        self.text_read_head_after = b""            # the same after the event before it
        self.text_chunk_tail: bytes | None = None  # which of _TEXT_CHUNK_TAILS this stream's text chunks end with
        self.text_read_tail = b""                  # that tail and the event's end
        self.text_joint = b""                      # that tail and the next event's start up to its text
        self.reasoning_joint = b""                 # the same for a reasoning chunk
        self.cut_text: Callable[[bytes], bytes] = bytes  # a text chunk (head, text, tail) -> its text
        self.cut_reasoning_text: Callable[[bytes], bytes] = bytes  # the same for a reasoning chunk
        self.token_chunks = False                  # the stream's chunks carry token ids (_TOKEN_CHUNK_REST)
        # Their log-prob entries decoded as the machine keeps them (whole_entries), as _LogprobRead at half the cost.
        self.read_entries = _loads if machine.whole_entries else _read_logprob_entries
        self.delta_item: dict | None = None        # the message whose event middle is `delta_middle`
        self.delta_middle = b""
        self.delta_event = b""                     # its whole delta event, `% (number, text)` to write one
        self.delta_event_pair = b""                # the same twice, `% (number, text, number + 1, text)`

    def _written(self, events: list[dict]) -> bytes:
        self.sent += len(events)
        return _sse_bytes(events)

    def start(self) -> bytes:
        return self._written(self.machine.start())

    def convert(self, data: bytes) -> bytes:
        head = self.text_chunk_head
        if head is not None:
            event = None
            if data.startswith(head):
                event = (self._token_event(data, len(head)) if data.endswith(_TOKEN_CHUNK_END)
                         else self._text_event(data, len(head)))
            elif self.reasoning_chunk_head is not None and data.startswith(self.reasoning_chunk_head):
                event = self._reasoning_event(data, len(self.reasoning_chunk_head))
            if event is not None:
                return event
        chunk = _parse_chunk(data)
        if not self.head_checked:  # the first chunk that decoded: its head is the stream's
            self.head_checked = True
            heads = _chunk_heads(data)
            if heads:
                self.text_chunk_head, self.reasoning_chunk_head = heads
                self.text_read_head = b"data: " + self.text_chunk_head
                self.text_read_head_after = b"\n\n" + self.text_read_head
                self.reasoning_read_head = b"data: " + self.reasoning_chunk_head
        return self._written(self.machine.feed(chunk))

    def _text_event(self, data: bytes, start: int) -> bytes | None:
        parts = _text_chunk_parts(data, start)
        if parts is None:
            return None
        tail, raw_text, text = parts
        machine = self.machine
        taken = machine.take_text(text)
        if taken is None and not machine.hold_text(text):
            return None
        if tail is not self.text_chunk_tail:
            self._take_tail(tail)
        if taken is None:
            return b""
        self._set_delta_item(taken[0])
        self.sent += 1
        return self.delta_event % (taken[1], raw_text)

    def _take_tail(self, tail: bytes) -> None:
        """The tail this stream's text and reasoning chunks end with (one of _TEXT_CHUNK_TAILS), for their runs."""
        self.text_chunk_tail = tail
        self.text_read_tail = tail + b"\n\n"
        self.text_joint = tail + b"\n\ndata: " + self.text_chunk_head
        self.reasoning_joint = tail + b"\n\ndata: " + self.reasoning_chunk_head
        self.cut_text = operator.itemgetter(slice(len(self.text_chunk_head), -len(tail)))
        self.cut_reasoning_text = operator.itemgetter(slice(len(self.reasoning_chunk_head), -len(tail)))

    def _token_event(self, data: bytes, start: int) -> bytes | None:
        """`_text_event` for a token-ID stream's text chunk: its text, log-prob entries and ids (_TOKEN_CHUNK_REST)."""
        parts = self._token_parts(data, start)
        if parts is None:
            return None
        raw_text, text, entries, token_ids = parts
        machine = self.machine
        taken = machine.take_text(text)
        if taken is None and not machine.hold_text(text):
            return None
        machine.take_tokens(token_ids, entries)
        self.token_chunks = True
        if taken is None:
            return b""
        self._set_delta_item(taken[0])
        self.sent += 1
        return self.delta_event % (taken[1], raw_text)

    def _token_parts(self, data: bytes, start: int) -> tuple[bytes, str, list, list[int]] | None:
        """A token-ID chunk's text (as its bytes and decoded), log-prob entries and ids (_TOKEN_CHUNK_REST), each
        decoded as decoding the chunk would; None where the chunk is of another shape or a part does not decode."""
        match = _TOKEN_CHUNK_REST.fullmatch(data, start, len(data) - len(_TOKEN_CHUNK_END))
        if match is None:
            return None
        raw_text, entry, token_id = match.groups()
        try:  # the pattern let no quote or control character into the text, nor an empty one: _chunk_text's checks
            text = raw_text.decode() if raw_text.find(b"\\") < 0 else _escaped_chunk_texts((raw_text,))
            entries = self.read_entries(b"[%b]" % entry)
            token_ids = [int(token_id)] if token_id.find(b",") < 0 else list(map(int, token_id.split(b",")))
        except (ValueError, UnicodeDecodeError):  # feed's way reports it
            return None
        return None if text is None else (raw_text, text, entries, token_ids)

    def _reasoning_event(self, data: bytes, start: int) -> bytes | None:
        """A chunk of only vLLM's reasoning field, `"reasoning":"<text>"` after the stream's head (with its tokens'
        ids and log-prob entries in a token-ID stream), recognized by its bytes: held for the reasoning item, nothing
        to send (`hold_reasoning`), as feed() does; None where it is more (or the message has begun)."""
        if data.endswith(_TOKEN_CHUNK_END):
            parts = self._token_parts(data, start)
            if parts is None:
                return None
            _, text, entries, token_ids = parts
            if not self.machine.hold_reasoning(text):
                return None
            self.machine.take_tokens(token_ids, entries)
            self.token_chunks = True
            return b""
        parts = _text_chunk_parts(data, start)
        if parts is None or not self.machine.hold_reasoning(parts[2]):
            return None
        tail = parts[0]
        if tail is not self.text_chunk_tail:
            self._take_tail(tail)
        return b""

    def _token_events(self, raw_texts: Sequence[bytes], entries: Sequence[bytes], token_ids: Sequence[bytes],
                      reasoning: bool) -> bytes | None:
        """`_token_event` for a run of chunks, their parts as _TOKEN_CHUNK_REST delimits them (`_reasoning_event` where
        they are `reasoning`). Each part is decoded as decoding its chunk would (the texts one by one: a character split
        across two chunks is invalid in each)."""
        try:
            text = ("".join(map(bytes.decode, raw_texts)) if b"".join(raw_texts).find(b"\\") < 0
                    else _escaped_chunk_texts(raw_texts))
            logprobs = self.read_entries(b"[%b]" % b",".join(entries))
            ids = list(map(int, b",".join(token_ids).split(b",")))
        except (ValueError, UnicodeDecodeError):  # feed's way reports it
            return None
        if text is None:
            return None
        if reasoning:
            events = b"" if self.machine.hold_reasoning(text) else None
        else:
            events = self._texts_taken(raw_texts, text)
        if events is not None:
            self.machine.take_tokens(ids, logprobs)
        return events

    def _set_delta_item(self, item: dict) -> None:
        if item is not self.delta_item:
            self.delta_item = item
            self.delta_middle = (f',"item_id":"{item["id"]}","output_index":{len(self.machine.output) - 1},'
                                 f'"content_index":0,"delta":"').encode()
            self.delta_event = b"%b%%d%b%%b%b" % (_TEXT_DELTA_EVENT, self.delta_middle.replace(b"%", b"%%"), _TEXT_DELTA_END)
            self.delta_event_pair = self.delta_event * 2

    def run_in(self, block: bytes) -> tuple[int, int]:
        """Where a read's run of text chunks (`convert_run`) starts and ends: what comes before it (a stream's first
        chunk) and after it (its finish, usage and `[DONE]`; an event cut by the read's end) are not text chunks."""
        tail = self.text_read_tail
        if not (tail or self.token_chunks):
            return 0, 0
        if self.token_chunks and len(block) < _TOKEN_RUN_MIN * (len(self.text_read_head) + _TOKEN_CHUNK_SHORTEST_REST):
            return 0, 0  # too short for _TOKEN_RUN_MIN chunks: not worth the searches below
        start = (0 if block.startswith(self.text_read_head) or block.startswith(self.reasoning_read_head)
                 else block.find(self.text_read_head_after) + 2)
        if self.token_chunks:
            last = block.rfind(_TOKEN_RUN_LAST)
            end = block.find(_TOKEN_READ_END, last) + len(_TOKEN_READ_END) if last > start else 0
            # Fewer chunks than _TOKEN_RUN_MIN: `convert` takes them one by one faster (a run's steps cost ~4 us more).
            return (start, end) if start != 1 and block.count(_TOKEN_READ_END, start, end) >= _TOKEN_RUN_MIN else (0, 0)
        end = block.rfind(tail) + len(tail)
        # Shorter than two text chunks (a head, a byte of text and a tail each): one at most, which `convert` takes faster.
        return (start, end) if start != 1 and end - start >= 2 * (len(self.text_read_head) + 1 + len(tail)) else (0, 0)

    def convert_run(self, block: bytes) -> bytes | None:
        """A run of text chunks of the open message (`data: <head>"content":"<text><tail>\\n\\n`, each with the
        stream's head and tail, as `convert` takes them one by one), converted at once: split in one call, checked by
        one comparison, one search and one decoding, its events written by C loops, with no Python step per event; or a
        run of chunks of vLLM's reasoning field (`"reasoning":"<text>"` for `"content":"<text>"`), held at once. Byte
        for byte what converting its chunks one by one sends; None, with nothing changed, for anything else."""
        if self.token_chunks:
            return self._convert_token_run(block)
        tail = self.text_chunk_tail
        if tail is None or not block.endswith(self.text_read_tail):
            return None
        if block.startswith(self.text_read_head):
            read_head, joint, cut_text = self.text_read_head, self.text_joint, self.cut_text
        elif block.startswith(self.reasoning_read_head):
            read_head, joint, cut_text = self.reasoning_read_head, self.reasoning_joint, self.cut_reasoning_text
        else:
            return None
        middle = block[len(read_head):len(block) - len(tail) - 2]  # <text>, then `<tail>\n\ndata: <head><text>` each
        if len(middle) < 800:  # up to 4 chunks: one split at the joint between two texts
            texts = middle.split(joint)
        else:  # CPython splits at a separator this long (~200 bytes) with a set-up per match, ~0.4 us: split at each
            # event's end instead, cut each head and tail by length, and the texts are right where joining them back
            # gives the middle again (16 chunks 6.9 -> 3.7 us)
            texts = list(map(cut_text, block[6:-2].split(b"\n\ndata: ")))
            if joint.join(texts) != middle:
                return None
        if not all(texts):
            return None
        joined = b"".join(texts)
        if _NOT_PLAIN_TEXT.search(joined) is None:
            try:
                text: str | None = joined.decode()
                if len(texts) > 1:
                    middle.decode()  # the texts lie between ASCII bytes here: each is UTF-8 where this is
            except UnicodeDecodeError:
                return None
        else:
            text = _escaped_chunk_texts(texts)
            if text is None:
                return None
        if read_head is self.reasoning_read_head:
            return b"" if self.machine.hold_reasoning(text) else None
        return self._texts_taken(texts, text)

    def _convert_token_run(self, block: bytes) -> bytes | None:
        """`convert_run` for a token-ID stream: a run of its text chunks (`data: <head>"content":"<text>…]}]}\\n\\n`
        each), or of its reasoning chunks (`"reasoning":"<text>…`), split at each chunk's end, each head checked,
        what follows it delimited by _TOKEN_CHUNK_REST."""
        if not block.endswith(_TOKEN_READ_END):
            return None
        if block.startswith(self.text_read_head):
            chunk_head = self.text_chunk_head
        elif block.startswith(self.reasoning_read_head):
            chunk_head = self.reasoning_chunk_head
        else:
            return None
        chunks = block[6:-len(_TOKEN_READ_END)].split(_TOKEN_SEPARATOR)
        if not all(map(bytes.startswith, chunks, itertools.repeat(chunk_head))):
            return None
        matches = list(map(_TOKEN_CHUNK_REST.fullmatch, chunks, itertools.repeat(len(chunk_head))))  # from after the head
        if not all(matches):
            return None
        return self._token_events(*zip(*map(_MATCH_GROUPS, matches)), chunk_head is self.reasoning_chunk_head)

    def _texts_taken(self, texts: Sequence[bytes], text: str) -> bytes | None:
        """What feed() sends for chunks of only these texts (`text`, all of them decoded): the open message's next
        deltas, or nothing where a leading `<think>` block holds them; None, with nothing changed, where it has more to do."""
        machine = self.machine
        taken = machine.take_text(text, len(texts))
        if taken is not None:
            return self._delta_events(taken, texts)
        return b"" if machine.hold_text(text) else None

    def _delta_events(self, taken: tuple[dict, int], texts: Sequence[bytes]) -> bytes:
        """The output_text.delta events of `texts` (each a delta's JSON string without its quotes), numbered from what
        `take_text` gave, written by C loops: <number><middle><text> each, joined (one or two by a format)."""
        self._set_delta_item(taken[0])
        count = len(texts)
        self.sent += count
        first = taken[1]
        if count < 3:  # most reads at 64 streams: one format, where the joins below cost ~0.4 us more
            return (self.delta_event % (first, texts[0]) if count == 1
                    else self.delta_event_pair % (first, texts[0], first + 1, texts[1]))
        if first + count <= len(_DECIMALS):
            numbers: Iterable[bytes] = _DECIMALS[first:first + count]
        else:
            numbers = map(b"%d".__mod__, range(first, first + count))
        events = _TEXT_DELTA_NEXT.join(map(self.delta_middle.join, zip(numbers, texts)))
        return b"".join((_TEXT_DELTA_EVENT, events, _TEXT_DELTA_END))

    def finish(self) -> bytes:
        return self._written(self.machine.finish())

    def fail(self, failure: ApiError) -> bytes:
        return self._written(self.machine.fail(failure))

    def overflow(self) -> bytes:
        return self._written(self.machine.context_overflow())


class _ChatSSE:
    """`/v1/chat/completions` framing for `_relay_stream`: vLLM's chunks as they are (reasoning rewritten), `[DONE]`
    last. `sent` counts the events written."""

    token_chunks = False  # see _relay_read: vLLM's chunks are relayed as they are, token ids or not

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.relay = ChatStreamRelay(config)
        self.sent = 0
        self.reasoning_head: bytes | None = None  # the stream's chunk head and `"reasoning":"`, once checked
        self.content_head = b""                    # the same head and `"content":"`

    def start(self) -> bytes:
        return b""

    def convert(self, data: bytes) -> bytes:
        if self.relay.needs(data) or data.startswith(b'{"error"'):  # vLLM reports mid-stream failures so
            data = self._reasoning_as_content(data) or self._rewritten(data)
        self.sent += 1
        return b"data: " + data + b"\n\n"

    def _rewritten(self, data: bytes) -> bytes:
        chunk = _parse_chunk(data)
        rewritten = _dumps(self.relay.rewrite(chunk)).encode()
        if self.reasoning_head is None and self.config.uses_reasoning_parser:  # the stream's head, checked once
            heads = _chunk_heads(data)
            if heads:
                self.content_head, self.reasoning_head = heads
        return rewritten

    def _reasoning_as_content(self, data: bytes) -> bytes | None:
        """A chunk of only vLLM's reasoning field inside the `<think>` block its first one opened, as `rewrite` writes
        it, from its bytes: its `"reasoning":"<text>"` after the stream's head becomes `"content":"<text>"`, the rest
        kept (the head as _CHUNK_HEAD checked it, one of _TEXT_CHUNK_TAILS, a text as `_json_string` writes it: the
        bytes `_dumps` writes). None for any other chunk. Decoding and writing it again cost ~4 us, this ~1 us."""
        head = self.reasoning_head
        if head is None or not data.startswith(head) or 0 not in self.relay.in_reasoning:
            return None
        if _text_chunk_parts(data, len(head)) is None:
            return None
        return self.content_head + data[len(head):]

    def run_in(self, block: bytes) -> tuple[int, int]:
        """Where a read's run of whole events (`convert_run`) ends: at its last blank line, before a last `[DONE]`."""
        end = block.rfind(b"\n\n") + 2
        if end < 2:
            return 0, 0
        if block.endswith(b"data: [DONE]\n\n", 0, end):
            end -= len(b"data: [DONE]\n\n")
        return 0, end

    def convert_run(self, block: bytes) -> bytes | None:
        """A run of whole events none of which `convert` would rewrite (nearly every read), as vLLM wrote it."""
        if self.relay.needs(block) or block.find(b'{"error"') >= 0:  # needs: any of its chunks would need it
            return None
        count = _whole_events(block)
        if not count:
            return None
        self.sent += count
        return block

    def finish(self) -> bytes:
        self.sent += 1
        return b"data: [DONE]\n\n"

    def fail(self, failure: ApiError) -> bytes:
        self.sent += 1
        return f"data: {_dumps(failure.body())}\n\n".encode() + self.finish()

    def overflow(self) -> bytes:
        chunk = context_overflow_chat_response(self.config)
        chunk["object"] = "chat.completion.chunk"
        chunk["choices"][0]["delta"] = chunk["choices"][0].pop("message")
        self.sent += 1
        return f"data: {_dumps(chunk)}\n\n".encode() + self.finish()


def _relay_read(block: bytes, lines: _DataLines, framing: _ResponsesSSE | _ChatSSE, converted: list[bytes]) -> None:
    """Appends to `converted` what the client gets for one read of vLLM's stream (with the line the last read left
    incomplete). The run of whole events `framing` can take at once (`run_in`, nearly all of a read) goes in one step;
    what comes before and after it, and a run it cannot take, chunk by chunk, in order (what was converted before a
    chunk that failed stays). A read that is such a run and nothing else, as most are, is tried first (`convert_run`
    checks its ends; run_in's searches and a Python frame cost 0.4-0.7 us a read: at 64 streams a read holds about 2
    events), but not in a token-ID stream, whose runs of fewer than _TOKEN_RUN_MIN chunks go one by one faster:
    `run_in` counts them first."""
    if lines.pending:
        block, lines.pending = lines.pending + block, b""
    elif not framing.token_chunks:  # nearly every read is a run and nothing else: one step, without run_in's searches
        run = framing.convert_run(block)
        if run is not None:
            converted.append(run)
            return
    start, end = framing.run_in(block)
    if start < end:
        if start:
            for data in lines.payloads(block[:start]):
                converted.append(framing.convert(data))
            if lines.done:
                return
        run = framing.convert_run(block[start:end] if start or end < len(block) else block)
        if run is not None:
            converted.append(run)
            if end == len(block):  # nearly every read: nothing after the run
                return
            block = block[end:]
        else:
            block = block[start:]
    for data in lines.payloads(block):
        converted.append(framing.convert(data))


async def _relay_stream(context: RequestContext, upstream: aiohttp.ClientResponse | None, new_session: str | None,
                        framing: _ResponsesSSE | _ChatSSE, chat_body: dict | None = None) -> web.StreamResponse:
    """Relays vLLM's SSE to the client as it arrives, one write per network read, in `framing`'s format.

    Reading pauses while the client is slow (each write awaits the socket), so nothing buffers without bound. A client
    that is gone closes the upstream request at once (vLLM aborts the generation); a failure mid-stream ends the stream
    in the endpoint's own way; a stream that ends without `[DONE]` was cut. The loop is written out here, with no async
    generator or helper coroutine per read: each costs a frame and an awaitable per read (paired against the
    pass-through, ~1 us of CPU less per event: at 64 concurrent chat streams +3.1 against +3.9 to +4.8 us); what a read
    becomes is `_relay_read`'s, a plain function.
    """
    config, request = context.config, context.request
    events, path = context.metrics.stream_events, request.path
    response: web.StreamResponse | None = None
    try:
        tail = framing.start()  # before the headers: what fails here (a request too deep to echo) is a plain error
        response = await _open_sse(context, new_session)
        if upstream is None:
            tail += framing.overflow()
        else:
            await response.write(tail)
            events[path] += framing.sent  # counted as written: what the framing made and not yet counted
            framing.sent = 0
            lines = _DataLines()
            watch = _IdleWatch(upstream, config)
            clock = watch.loop.time
            try:
                async for block in upstream.content.iter_any():
                    watch.waiting_since = None
                    converted: list[bytes] = []
                    try:
                        _relay_read(block, lines, framing, converted)
                    finally:  # what was converted goes out, even when a later chunk of the read failed
                        payload = b"".join(converted)
                        if payload:  # a write to a client that is gone raises ConnectionResetError
                            await response.write(payload)
                            events[path] += framing.sent
                            framing.sent = 0
                    if not payload and _client_gone(request):  # reasoning held back: no write tells
                        raise ConnectionResetError("client disconnected")
                    if lines.done:
                        break
                    watch.waiting_since = clock()
                else:
                    raise upstream_error("vLLM closed the stream before `data: [DONE]`", code="upstream_unreachable")
                try:
                    tail = framing.finish()
                except PromptIdsMissing:  # a vLLM build that ignores `return_token_ids`: as without streaming
                    if chat_body is None:
                        raise
                    framing.machine.prompt_token_ids = await _tokenize(context, context.upstream, chat_body)
                    tail = framing.finish()
            except ConnectionResetError:
                raise
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = _stream_failure(config, exc)
                log.warning("server %s: request %s: stream failed: %s", config.name, context.request_id, failure.message)
                tail = framing.fail(failure)
            except Exception as exc:  # a bug of ours: the headers are sent, so the stream still ends in its own way
                log.error("server %s: request %s: internal error mid-stream: %r", config.name, context.request_id, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                exc.__traceback__ = None
                tail = framing.fail(ApiError(500, f"internal error in gym_vllm: {exc.__class__.__name__}"))
            finally:
                watch.stop()
        await response.write(tail)
        events[path] += framing.sent
        await response.write_eof()
    except ConnectionResetError:
        context.client_gone = True
        if response is None:  # gone before the headers: nothing to return (counted as 499)
            raise
        log.info("server %s: request %s: client disconnected mid-stream; upstream request closed", config.name, context.request_id)
    finally:
        if upstream is not None:
            upstream.close()  # a no-op after [DONE]; otherwise it aborts the generation in vLLM
            _observe_upstream(context, context.upstream)
    return response


async def handle_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    model = {"id": config.model, "object": "model", "created": int(request.app[STARTED_KEY]), "owned_by": "gym_vllm"}
    return _json_response({"object": "list", "data": [model]})


async def handle_health(request: web.Request) -> web.Response:
    """Liveness of the proxy (always 200 while it serves) and each upstream's health as the proxy sees it."""
    app = request.app
    balancer = app[BALANCER_KEY]
    upstreams = [{"base_url": u.base_url, "healthy": u.usable, "ejected": not u.healthy, "unavailable": u.unavailable,
                  "failures_in_a_row": u.failures, "last_error": u.last_error, "requests": u.requests} for u in balancer.upstreams]
    status = "ok" if any(u.usable for u in balancer.upstreams) else "degraded"
    return _json_response({"status": status, "server": app[CONFIG_KEY].name, "model": app[CONFIG_KEY].model,
                           "sessions": len(balancer.sessions), "upstreams": upstreams})


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; with several workers, every worker's figures (label `worker`)."""
    app = request.app
    workers_dir = app.get(METRICS_DIR_KEY)
    if not workers_dir:
        text = render_families(app[METRICS_KEY].families(app[BALANCER_KEY]))
    else:
        snapshots = _read_worker_snapshots(workers_dir, app[CONFIG_KEY].name)
        text = render_families(merge_families([_worker_families(app), *snapshots]))
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


_HTTP_MESSAGES = {
    404: "unknown path {path}; this server serves POST /v1/responses, POST /v1/chat/completions, GET /v1/models, "
         "GET /health and GET /metrics",
    405: "method {method} is not allowed on {path}",
}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Gives the request its id, turns every failure into OpenAI error JSON, counts and times the answer."""
    supplied_id = request.headers.get(REQUEST_ID_HEADER)
    context = RequestContext(request, supplied_id if supplied_id and _VALID_REQUEST_ID.fullmatch(supplied_id) else _random_hex_id()[:16])
    request[CONTEXT_KEY] = context
    metrics = context.metrics
    path = request.path
    endpoint = path if path in ENDPOINTS else "other"
    metrics.in_flight[endpoint] += 1
    started = time.perf_counter()
    status = 499  # nginx's "client closed request", kept if the handler is cancelled
    try:
        response = await _answer(context, handler)
        # 499: the client left, mid-stream or before a plain answer could be sent
        status = 499 if context.client_gone or (not response.prepared and _client_gone(request)) else response.status
        if not response.prepared:  # a stream has sent its headers, the id among them
            response.headers[REQUEST_ID_HEADER] = context.request_id
        return response
    finally:
        elapsed = time.perf_counter() - started
        metrics.in_flight[endpoint] -= 1
        metrics.requests[endpoint, status] += 1
        metrics.request_seconds[endpoint].observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            upstream = context.upstream
            access_log.info("server %s: %s %s %d %.1f ms request %s%s", context.config.name, request.method, path, status,
                            elapsed * 1000, context.request_id, f" upstream {upstream.base_url}" if upstream else "")
        # The request and its context refer to each other: without this, every request (body, headers, buffers) would
        # wait for the cyclic collector, which the CLIs run every 50,000 allocations (~8% more CPU per request at C=64).
        del request[CONTEXT_KEY]


async def _answer(context: RequestContext, handler) -> web.StreamResponse:
    """The handler's response, or the error JSON for what it raised. Each caught exception drops its traceback: its
    frames hold the request, and often the exception itself (raised from a local), and aiohttp keeps some exceptions on
    the request; that cycle would keep every failed request alive until the cyclic collector runs."""
    request, config = context.request, context.config
    try:
        if config.server_api_key and request.path != "/health":  # liveness probes carry no key
            supplied = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")  # bytes as sent
            if not hmac.compare_digest(supplied, b"Bearer " + config.server_api_key.encode()):
                raise ApiError(401, "missing or incorrect API key: send `Authorization: Bearer <server_api_key>`",
                               code="invalid_api_key")
        response = await handler(request)
    except ApiError as exc:
        exc.__traceback__ = None
        if exc.status >= 500:
            log.warning("server %s: request %s: %s %s -> %d %s", config.name, context.request_id, request.method, request.path,
                        exc.status, exc.message)
        response = _json_response(exc.body(), exc.status)
    except web.HTTPRequestEntityTooLarge as exc:
        exc.__traceback__ = None
        limit = _body_limit(config)
        response = _json_response(ApiError(413, f"request body is larger than {limit} bytes; raise `max_request_body_mb` "
                                                f"in {config.source} if this is intended", code="request_too_large").body(), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        exc.__traceback__ = None
        template = _HTTP_MESSAGES.get(exc.status, exc.reason or "request failed")
        message = template.format(path=request.path, method=request.method)
        response = _json_response(ApiError(exc.status, message).body(), exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except RecursionError as exc:  # msgspec reads JSON a little deeper than json writes it: the echo of such a request
        exc.__traceback__ = None
        log.warning("server %s: request %s: nested too deeply to process", config.name, context.request_id)
        response = _json_response(ApiError(400, "request JSON is nested too deeply to process (keep it under 900 levels)",
                                           code="nested_too_deeply").body(), 400)
    except Exception as exc:  # a bug of ours: answer cleanly, log one line with the cause
        log.error("server %s: request %s: internal error on %s %s: %r", config.name, context.request_id, request.method,
                  request.path, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        exc.__traceback__ = None
        response = _json_response(ApiError(500, f"internal error in gym_vllm: {exc.__class__.__name__}").body(), 500)
    return response


# --- metrics of several workers: each writes its figures to a shared folder every second -----------

METRICS_SNAPSHOT_INTERVAL_S = 1.0


def _metrics_file_name(server_name: str, pid: int) -> str:
    """`<server>.<pid>.json`: one worker's figures for one server."""
    return f"{_plain_name(server_name)}.{pid}.json"


def _metrics_file_owner(file_name: str) -> tuple[str, str] | None:
    """(server, pid) of a name `_metrics_file_name` made (the server part has no dots); None for any other file."""
    parts = file_name.split(".")
    return (parts[0], parts[1]) if len(parts) == 3 and parts[2] == "json" else None


def _worker_families(app: web.Application) -> list:
    return app[METRICS_KEY].families(app[BALANCER_KEY], {"worker": str(os.getpid())})


def _read_worker_snapshots(folder: str, server_name: str) -> list[list]:
    """The other workers' latest figures for this server (a torn or vanished file is skipped: the next scrape has it)."""
    server, own = _plain_name(server_name), str(os.getpid())
    snapshots = []
    for name in os.listdir(folder):
        owner = _metrics_file_owner(name)
        if owner and owner[0] == server and owner[1] != own:
            try:
                with open(os.path.join(folder, name)) as file:
                    snapshots.append(json.load(file))
            except (OSError, ValueError):
                continue
    return snapshots


async def _write_metrics_snapshots(app: web.Application):
    folder = app[METRICS_DIR_KEY]
    path = os.path.join(folder, _metrics_file_name(app[CONFIG_KEY].name, os.getpid()))

    def write() -> None:
        with open(path + ".tmp", "w") as file:
            json.dump(_worker_families(app), file)
        os.replace(path + ".tmp", path)  # readers never see half a file

    async def loop() -> None:
        while True:
            try:
                write()
            except OSError as exc:
                log.warning("server %s: cannot write metrics for the other workers to %s: %s", app[CONFIG_KEY].name, path, exc)
            await asyncio.sleep(METRICS_SNAPSHOT_INTERVAL_S)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(OSError):
        os.remove(path)


async def _health_checks(app: web.Application):
    """Background `GET /health` of every upstream; its own session, so a full request pool cannot starve it."""
    config = app[CONFIG_KEY]
    balancer = app[BALANCER_KEY]
    interval = config.health_check_interval_s

    async def check(http: aiohttp.ClientSession, upstream: Upstream) -> None:
        if upstream.unavailable:  # managed from outside (local_vllm restarting it)
            return
        try:
            async with http.get(f"{upstream.root_url}/health") as answer:
                balancer.record(upstream, answer.status == 200, f"health check: HTTP {answer.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            balancer.record(upstream, False, f"health check: {exc.__class__.__name__}")

    async def loop() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, min(interval, 5.0)))) as http:
            while True:
                await asyncio.gather(*(check(http, u) for u in balancer.upstreams))
                await asyncio.sleep(interval)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


PASSIVE_RETRY_S = 5.0  # without health checks, an ejected upstream takes requests again this long after its ejection


def _body_limit(config: ServerConfig) -> int:
    return int(config.max_request_body_mb * 1024 * 1024)


def build_app(config: ServerConfig, workers: int = 1, metrics_dir: str | None = None) -> web.Application:
    """The aiohttp application of one model server; the upstream client lives in `cleanup_ctx`.

    `workers` > 1: this is one of several processes sharing the port; session affinity is made deterministic,
    and with `metrics_dir` (a folder the workers share) `/metrics` shows every worker's figures.
    """
    app = web.Application(middlewares=[error_middleware], client_max_size=_body_limit(config))
    app[CONFIG_KEY] = config
    app[BALANCER_KEY] = Balancer(config.base_url, SessionTable(config.session_table_size, config.session_idle_timeout_s),
                                 config.eject_after_failures, config.readmit_after_successes, config.name, deterministic=workers > 1,
                                 retry_ejected_after_s=None if config.health_check_interval_s else PASSIVE_RETRY_S)
    app[STREAM_TIMEOUT_KEY] = aiohttp.ClientTimeout(total=config.request_timeout_s, sock_connect=config.connect_timeout_s,
                                                    sock_read=config.stream_idle_timeout_s)
    app[STARTED_KEY] = time.time()
    app[METRICS_KEY] = Metrics(config.name)

    async def upstream_client(app: web.Application):
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s, sock_connect=config.connect_timeout_s)
        # limit_per_host: with a limit, requests beyond it wait for a free connection (a queue, not a failure).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=config.max_concurrent_requests_per_upstream, keepalive_timeout=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as client:
            app[CLIENT_KEY] = client
            yield

    app.cleanup_ctx.append(upstream_client)
    if config.health_check_interval_s:
        app.cleanup_ctx.append(_health_checks)
    if metrics_dir:
        app[METRICS_DIR_KEY] = metrics_dir
        app.cleanup_ctx.append(_write_metrics_snapshots)
    app.router.add_post("/v1/responses", handle_responses)
    app.router.add_post("/v1/chat/completions", handle_chat_completions)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    return app


# ============================================================================================
# Embedding API: run servers inside your own event loop.
# ============================================================================================


# Connections the kernel completes while the event loop is busy, before it accepts them. aiohttp's default, 128, is
# too few for a rollout burst: past it, the kernel drops new SYNs and each client waits 1 s (then 3, 7 s) to retry.
# The kernel caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096


async def start_server(config: ServerConfig, host: str | None = None, port: int | None = None,
                       app: web.Application | None = None, workers: int = 1, metrics_dir: str | None = None) -> web.AppRunner:
    """Starts one server and returns its runner (`await runner.cleanup()` stops it).

    `port=0` picks a free port; read it back from `runner.addresses`. `app` serves an application
    already built with `build_app(config)` (local_vllm keeps hold of its upstreams). `workers` > 1:
    this process shares the port with the others (SO_REUSEPORT), and `metrics_dir` is their shared metrics folder.
    """
    # handler_cancellation: a client that hangs up (a timeout, a stopped rollout run) ends its request to vLLM at once,
    # which then stops generating for it, instead of generating to the end for nobody (aiohttp's default since 3.8
    # leaves the handler running; its test server cancels it, as here).
    runner = web.AppRunner(app or build_app(config, workers, metrics_dir), access_log=None, handle_signals=False,
                           shutdown_timeout=config.shutdown_timeout_s, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host or config.host, config.port if port is None else port, backlog=LISTEN_BACKLOG,
                       reuse_port=workers > 1 or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"{config.source}: {config.name}: cannot listen on {host or config.host}:"
                          f"{config.port if port is None else port}: {exc.strerror or exc}; choose another `port`") from None
    log.info("server %s listening on http://%s:%d, model %s, upstreams %s", config.name, *runner.addresses[0][:2],
             config.model, ", ".join(config.base_url))
    return runner


async def serve(configs: Sequence[ServerConfig], host: str | None = None, port: int | None = None, workers: int = 1,
                metrics_dir: str | None = None) -> None:
    """Serves every config until cancelled (each server on its own port)."""
    runners = []
    try:
        for config in configs:
            runners.append(await start_server(config, host, port, workers=workers, metrics_dir=metrics_dir))
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


# ============================================================================================
# Rollout collection: python -m gym_vllm collect --url URL --input in.jsonl --output out.jsonl
# ============================================================================================
# NeMo Gym's rollout format. An input line holds `responses_create_params` (its other keys ride along
# untouched) or is itself a Responses request. An output line is the input line plus `response`,
# `_ng_task_index` (which input line) and `_ng_rollout_index` (which repeat), written as requests finish:
# sort by the two indices to restore input order. The pure parts (parse_input_line, rollout_record,
# resume_state, response_from_reply, format_progress) are kept apart from the I/O loop (`collect`).

TASK_INDEX_KEY = "_ng_task_index"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"
COLLECT_LOG_INTERVAL_S = 10.0   # progress lines when stderr is a log file, not a terminal
COLLECT_TTY_INTERVAL_S = 0.25   # redraws of the `\r` progress line on a terminal


class CollectError(Exception):
    """A problem with the command line, the files or the server's address: one line on stderr, exit code 2."""


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_input_line(line: str | bytes, model: str | None = None) -> tuple[dict, dict]:
    """One input line -> (the request to send, the output record without its response).

    Raises ValueError with a short reason when the line holds no usable request.
    """
    try:
        row = _loads(line, sendable=True)
    except LoneSurrogate:
        raise
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object but {_json_type(row)}")
    nested = "responses_create_params" in row
    params = row["responses_create_params"] if nested else row
    where = "`responses_create_params`" if nested else "the line"
    if not isinstance(params, dict):
        raise ValueError(f"`responses_create_params` is {_json_type(params)}, not an object")
    if "input" not in params:
        raise ValueError(f"{where} has no `input`: expected {{\"responses_create_params\": {{\"input\": ...}}}} "
                         "or a Responses request")
    if not isinstance(params["input"], (str, list)):
        raise ValueError(f"`input` is {_json_type(params['input'])}, not a string or a list of items")
    request = {key: value for key, value in params.items() if key != "stream"}  # we need the whole object, not events
    if model and not request.get("model"):
        request["model"] = model
    # The record says what was sent; a bare request becomes NeMo Gym's shape, so every output line has one shape.
    record = {**row, "responses_create_params": request} if nested else {"responses_create_params": request}
    try:  # msgspec decodes deeper than json writes: such a line would crash the run where it is sent or written
        _dumps(record)
    except RecursionError:
        raise ValueError("nested too deeply to be sent") from None
    return request, record


def rollout_record(record: dict, response: dict, index: int, repeat: int) -> dict:
    """The output line: the input line, where it came from (input index, repeat) and the response."""
    return {**record, TASK_INDEX_KEY: index, ROLLOUT_INDEX_KEY: repeat, "response": response}


class _NotJsonLine(ValueError):
    """An output line that is not JSON at all: at the file's end without its newline, what a kill mid-write leaves."""


def _rollout_key(raw: bytes) -> tuple[int, int] | None:
    """(index, repeat) of one output line; None for a blank line; ValueError for anything else (_NotJsonLine where it
    is not JSON)."""
    if not raw.strip():
        return None
    try:
        record = _loads(raw)
    except ValueError:  # UnicodeDecodeError too: a character cut in two
        raise _NotJsonLine("not valid JSON") from None
    if not isinstance(record, dict):
        raise ValueError(f"{_json_type(record)}, not an object")
    key = record.get(TASK_INDEX_KEY), record.get(ROLLOUT_INDEX_KEY)
    if not all(type(part) is int for part in key):
        raise ValueError(f"no integer `{TASK_INDEX_KEY}` and `{ROLLOUT_INDEX_KEY}`")
    return key


@dataclasses.dataclass
class ResumeState:
    done: set[tuple[int, int]]
    keep_bytes: int           # the valid prefix of the output file; a torn last line lies beyond it
    torn_line: bool           # a last line cut short (a kill mid-write) was found and is to be dropped
    ends_mid_line: bool       # the last line is whole but has no newline (an edited file): add one before appending


def resume_state(lines: Iterable[bytes]) -> ResumeState:
    """Reads an existing output file's lines (each with its b"\\n"): which (index, repeat) pairs are done.

    Only the last line may be torn, and only a line without its newline that is not JSON is (a record cut short): it
    is dropped. A bad line anywhere else, or valid JSON that is not a record at the end (a file that is not a collect
    output, one line long), means the file is not a collect output or was damaged: ValueError, never an overwrite.
    """
    done: set[tuple[int, int]] = set()
    offset, ends_mid_line = 0, False
    for number, raw in enumerate(lines, 1):
        try:
            key = _rollout_key(raw)
        except ValueError as exc:
            if not raw.endswith(b"\n") and isinstance(exc, _NotJsonLine):
                return ResumeState(done, offset, torn_line=True, ends_mid_line=False)
            raise ValueError(f"line {number}: {exc}") from None
        if key is not None:
            done.add(key)
        offset += len(raw)
        ends_mid_line = not raw.endswith(b"\n")
    return ResumeState(done, offset, torn_line=False, ends_mid_line=ends_mid_line)


def response_from_reply(status: int, raw: bytes) -> tuple[dict | None, str | None]:
    """The server's reply -> (Responses object, None) or (None, why it is not a rollout)."""
    try:
        body = _loads(raw, sendable=True)  # the rollout is written out as UTF-8
    except LoneSurrogate:
        return None, f"HTTP {status}: the reply {LONE_SURROGATE_IN_REPLY}"
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict) and isinstance(body.get("output"), list):
        if body.get("status") == "failed":  # a Responses object can carry its own failure
            return None, f"response status `failed`: {_error_message(body) or 'no error message'}"
        return body, None  # `incomplete` (a length stop) is a rollout like any other
    message = _error_message(body) or raw[:300].decode("utf-8", "replace").strip() or "empty body"
    if status == 200:
        return None, f"HTTP 200 but not a Responses object: {message}"
    return None, f"HTTP {status}: {message}"


def _format_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(done: int, total: int, failed: int, new: int, elapsed_s: float) -> str:
    """`done/total`, failures, this run's rollouts/s and the ETA of what is left."""
    rate = new / elapsed_s if elapsed_s > 0 else 0.0
    left = total - done - failed
    eta = _format_duration(left / rate) if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return f"{done}/{total} done ({percent}%), {failed} failed, {rate:.1f} rollouts/s, ETA {eta}"


@dataclasses.dataclass
class CollectResult:
    total: int = 0             # rollouts asked for: usable input lines x num_repeats
    already_done: int = 0      # of those, found in the output file at the start
    written: int = 0           # written by this run
    failed: int = 0            # requests that failed (not written; a re-run retries them)
    bad_lines: int = 0         # input lines skipped
    stopped: str | None = None  # why the run stopped before sending everything

    @property
    def missing(self) -> int:
        return self.total - self.already_done - self.written

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.bad_lines == 0


class _Progress:
    """Messages and the progress line on stderr: a `\\r` line on a terminal, a plain line every few seconds in a log."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = COLLECT_TTY_INTERVAL_S if self.tty else COLLECT_LOG_INTERVAL_S
        self.done = self.total = self.failed = self.new = 0
        self.started = time.monotonic()
        self._drawn = False

    def line(self) -> str:
        return format_progress(self.done, self.total, self.failed, self.new, time.monotonic() - self.started)

    def show(self) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self.line()}")
            self._drawn = True
        else:
            self.stream.write(f"gym_vllm collect: {self.line()}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self._drawn:  # clear the progress line; the next tick redraws it below
            self.stream.write("\r\033[K")
            self._drawn = False
        self.stream.write(f"gym_vllm collect: {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.show()
            self.stream.write("\n")
            self._drawn = False

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.show()


def _base_url(url: str) -> str:
    """`--url` -> the API base (…/v1); a URL ending in /responses is taken too."""
    base = url.rstrip("/")
    base = base[: -len("/responses")] if base.endswith("/responses") else base
    try:
        parts = urllib.parse.urlsplit(base)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise CollectError(f"--url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CollectError(f"--url {url!r} is not an http(s) URL such as http://127.0.0.1:8080/v1")
    return base


def _read_input(path: str, limit: int | None, progress: _Progress, result: CollectResult) -> tuple[list[tuple[int, int, bytes]], int]:
    """(index, line number, raw line) of each usable line among the first `limit` non-blank ones, and how many ask
    for temperature 0; bad lines are reported and counted."""
    lines, greedy, index = [], 0, 0
    try:
        with open(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                if not raw.strip():
                    continue  # blank lines are not records: no index, not counted by --limit
                if limit is not None and index >= limit:
                    break
                try:
                    request, _ = parse_input_line(raw)
                    lines.append((index, number, raw))  # kept raw, parsed again when sent: memory ~ the file's size
                    greedy += request.get("temperature") == 0
                except ValueError as exc:
                    result.bad_lines += 1
                    progress.message(f"{path} line {number}: {exc}; skipped")
                index += 1
    except OSError as exc:
        raise CollectError(f"cannot read --input {path}: {exc.strerror or exc}") from None
    return lines, greedy


def _open_output(path: str, input_path: str) -> Any:
    """The output file, open for reading and appending, locked against a second collector on it."""
    if os.path.exists(path) and os.path.exists(input_path) and os.path.samefile(path, input_path):
        raise CollectError(f"--output {path} is the input file")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        file = open(path, "a+b")
    except OSError as exc:
        raise CollectError(f"cannot open --output {path}: {exc.strerror or exc}") from None
    try:
        import fcntl

        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no guard against two collectors on one file
        pass
    except OSError as exc:
        file.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CollectError(f"another collect is writing to {path}; wait for it or choose another --output") from None
        raise CollectError(f"cannot lock --output {path}: {exc.strerror or exc}") from None
    return file


def _resume(file: Any, path: str, progress: _Progress) -> set[tuple[int, int]]:
    """Reads what the output file already holds; drops a torn last line."""
    file.seek(0)
    try:
        state = resume_state(file)
    except ValueError as exc:
        raise CollectError(f"--output {path} is not a collect output ({exc}); choose another --output or repair "
                           "the file") from None
    if state.torn_line:
        progress.message(f"{path}: dropped a partial last line (the previous run was killed mid-write)")
        file.seek(state.keep_bytes)
        file.truncate()
    if state.ends_mid_line:
        file.write(b"\n")
    return state.done


# A server that did not take the request and says to come back (local_vllm's proxy while its engine restarts, a rate
# limit): the request is sent again after these pauses (or its Retry-After, up to the pause's cap), about a minute in
# all, where every line left failed at once. Still refused after them: the server is unavailable, not the line at fault.
_RETRY_STATUSES = (429, 503)
_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


async def _post_rollout(http: aiohttp.ClientSession, url: str, request: dict) -> tuple[dict | None, str | None, bool]:
    """(response, error, server unreachable) of one request."""
    for delay in (*_RETRY_DELAYS_S, None):
        try:
            async with http.post(url, json=request) as answer:
                status, raw = answer.status, await answer.read()
                retry_after = answer.headers.get("Retry-After", "")
        except aiohttp.ClientConnectionError as exc:  # refused, reset, dropped: not this line's fault
            return None, f"connection failed: {exc or exc.__class__.__name__}", True
        except aiohttp.ClientError as exc:
            return None, f"{exc.__class__.__name__}: {exc}", False
        if status not in _RETRY_STATUSES or delay is None:
            break
        await asyncio.sleep(min(float(retry_after), delay) if retry_after.isdigit() else delay)
    response, error = response_from_reply(status, raw)
    return response, error, status in _RETRY_STATUSES


async def _check_server(http: aiohttp.ClientSession, base: str, progress: _Progress) -> None:
    """GET …/models once: an unreachable server or a refused key stops the run before it starts."""
    try:
        async with http.get(f"{base}/models", timeout=aiohttp.ClientTimeout(total=30)) as answer:
            status = answer.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise CollectError(f"cannot reach {base}: {exc or exc.__class__.__name__}") from None
    if status in (401, 403):
        raise CollectError(f"{base} refused the API key (HTTP {status} on GET /models); pass --api-key or set OPENAI_API_KEY")
    if status == 404:  # some Responses servers have no /models: a hint, not an error
        progress.message(f"warning: GET {base}/models: HTTP 404; is --url the API base (ending in /v1)?")


async def collect(url: str, input_path: str, output_path: str, *, concurrency: int = 64, limit: int | None = None,
                  num_repeats: int = 1, api_key: str | None = None, model: str | None = None,
                  stream: Any = None) -> CollectResult:
    """Sends every (input line, repeat) not yet in `output_path` to `url` (…/v1) and appends each rollout.

    Messages and progress go to `stream` (stderr). Raises CollectError for bad arguments, files or URL.
    Cancelling it leaves the output valid JSONL; calling it again resumes.
    """
    base = _base_url(url)
    progress = _Progress(stream or sys.stderr)
    result = CollectResult()
    lines, greedy = _read_input(input_path, limit, progress, result)
    if num_repeats > 1 and greedy:
        progress.message(f"warning: {greedy} requests have temperature 0: their {num_repeats} repeats will be alike")
    with _open_output(output_path, input_path) as out:
        done = _resume(out, output_path, progress)
        jobs = [(index, repeat, number, raw) for index, number, raw in lines for repeat in range(num_repeats)
                if (index, repeat) not in done]
        result.total = progress.total = len(lines) * num_repeats
        result.already_done = progress.done = result.total - len(jobs)
        if not jobs:
            progress.message(f"all {result.total} rollouts are already in {output_path}; nothing to send" if lines
                             else f"no usable request in {input_path}; nothing to send")
            return result
        # One pooled session; no cookie jar: gym_vllm pins a cookie to one upstream, a collector wants them all.
        # No total timeout: generations can run for minutes (the server bounds them).
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency), cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30), json_serialize=_dumps) as http:
            await _check_server(http, base, progress)
            progress.message(f"{result.total} rollouts ({len(lines)} lines x {num_repeats}), {result.already_done} already "
                             f"in {output_path}; sending {len(jobs)} to {base}, {concurrency} at a time")
            run = _CollectRun(http, base, out, model, input_path, num_repeats, progress, result)
            interrupted = False
            ticker = asyncio.create_task(progress.tick())
            try:
                await run.send_all(jobs, concurrency)
            except asyncio.CancelledError:
                interrupted = True
                raise
            finally:
                ticker.cancel()
                progress.finish()
                _summarize(result, output_path, progress, interrupted)
    return result


@dataclasses.dataclass
class _CollectRun:
    """The I/O loop of one run: workers take the next job, send it, append the rollout or report the failure."""

    http: aiohttp.ClientSession
    base: str
    out: Any
    model: str | None
    input_path: str
    num_repeats: int
    progress: _Progress
    result: CollectResult
    unreachable_in_a_row: int = 0

    async def send_all(self, jobs: list, concurrency: int) -> None:
        pending = iter(jobs)  # shared: each worker takes the next job when it is free
        workers = [asyncio.create_task(self.worker(pending, max(8, concurrency))) for _ in range(min(concurrency, len(jobs)))]
        try:
            await asyncio.gather(*workers)
        finally:  # on an error or a cancel, no worker outlives the session
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def worker(self, pending: Iterable, stop_after: int) -> None:
        for index, repeat, number, raw in pending:
            if self.result.stopped:
                return
            request, record = parse_input_line(raw, self.model)
            response, error, unreachable = await _post_rollout(self.http, f"{self.base}/responses", request)
            if response is not None:
                self.out.write((_dumps(rollout_record(record, response, index, repeat)) + "\n").encode())
                self.out.flush()  # a kill loses only what is in flight
                self.result.written += 1
                self.progress.done += 1
                self.progress.new += 1
                self.unreachable_in_a_row = 0
                continue
            self.result.failed += 1
            self.progress.failed += 1
            where = f"line {number}, repeat {repeat}" if self.num_repeats > 1 else f"line {number}"
            self.progress.message(f"{self.input_path} {where}: {error}")
            # The server is gone (not this line's fault): stop rather than fail every line left.
            self.unreachable_in_a_row = self.unreachable_in_a_row + 1 if unreachable else 0
            if self.unreachable_in_a_row >= stop_after and not self.result.stopped:
                self.result.stopped = f"{self.unreachable_in_a_row} requests in a row could not reach {self.base}"


def _summarize(result: CollectResult, output_path: str, progress: _Progress, interrupted: bool) -> None:
    elapsed = time.monotonic() - progress.started
    rate = f"{result.written / elapsed:.1f}" if elapsed > 0 else "0"
    held = result.already_done + result.written
    progress.message(f"{'interrupted: ' if interrupted else ''}{result.written} rollouts written in {_format_duration(elapsed)} "
                     f"({rate}/s); {output_path} holds {held} of {result.total}")
    problems = [f"{result.failed} failed"] if result.failed else []
    problems += [f"{result.bad_lines} bad input line{'s' if result.bad_lines != 1 else ''} skipped"] if result.bad_lines else []
    if result.stopped:
        problems.append(f"stopped early: {result.stopped}")
    if result.missing:
        problems.append(f"run the same command again to collect the {result.missing} missing")
    if problems:
        progress.message("; ".join(problems))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def collect_main(argv: Sequence[str]) -> int:
    """`python -m gym_vllm collect ...`: 0 when every rollout is in the output, 1 when some are missing, 2 on bad usage."""
    parser = argparse.ArgumentParser(
        prog="python -m gym_vllm collect",
        description="Send each request of a JSONL file to a /v1/responses server and append each rollout to an output "
                    "JSONL; re-run the same command to resume.")
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="JSONL: lines with `responses_create_params` (NeMo Gym), or bare Responses requests")
    parser.add_argument("--output", required=True, metavar="FILE", help="JSONL the rollouts are appended to (resumed if present)")
    parser.add_argument("--concurrency", type=_positive_int, default=64, metavar="N", help="requests in flight (default 64)")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N input lines")
    parser.add_argument("--num-repeats", type=_positive_int, default=1, metavar="N",
                        help="rollouts per input line, e.g. a GRPO group (default 1)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), metavar="KEY",
                        help="sent as a Bearer token (default: $OPENAI_API_KEY if set)")
    parser.add_argument("--model", help="`model` for requests that have none")
    args = parser.parse_args(argv)

    async def run() -> CollectResult:
        cancel_on_signals()  # Ctrl-C / SIGTERM cancel the run; the output stays whole lines
        return await collect(args.url, args.input, args.output, concurrency=args.concurrency, limit=args.limit,
                             num_repeats=args.num_repeats, api_key=args.api_key, model=args.model)

    try:
        result = run_until_done(run)
    except (CollectError, ConfigError) as exc:  # ConfigError: GYM_VLLM_LOOP / GYM_VLLM_JSON
        print(f"gym_vllm collect: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the output failed (disk full, ...)
        print(f"gym_vllm collect: error: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 130
    return 0 if result.complete else 1


# ============================================================================================
# CLI: python -m gym_vllm --config a.yaml[,b.yaml] [--env env.yaml] [--host H] [--port P]
# ============================================================================================


def cancel_on_signals() -> None:
    """SIGINT/SIGTERM cancel the running task, so its `finally` blocks shut down cleanly (local_vllm uses it too)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)


SPEEDUP_SETTINGS = {"GYM_VLLM_LOOP": ("auto", "asyncio", "uvloop"), "GYM_VLLM_JSON": ("auto", "stdlib")}


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (vLLM depends on it), unless GYM_VLLM_LOOP=asyncio; None: asyncio's own loop.

    Every CLI calls it before starting, so it also checks GYM_VLLM_JSON (read when this module is imported)."""
    for variable, choices in SPEEDUP_SETTINGS.items():
        value = os.environ.get(variable, "auto")
        if value not in choices:
            raise ConfigError(f"{variable}={value!r} is not one of {', '.join(choices)}; unset it for the default (auto)")
    choice = os.environ.get("GYM_VLLM_LOOP", "auto")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("GYM_VLLM_LOOP=uvloop, but uvloop is not installed: pip install uvloop") from None
        return None
    return uvloop.new_event_loop


# Cyclic GC for a long-running server: requests free their objects by reference counting, so collecting every 700
# allocations (the default) only re-walks the requests in flight: 5.5% of the proxy's CPU at 64 concurrent requests,
# and ~20 ms pauses for full collections. Measured with gc.callbacks; 50,000 leaves well under 1%.
GC_THRESHOLDS = (50_000, 20, 100)


def run_until_done(main: Callable[[], Any]) -> Any:
    """Runs a CLI's top coroutine function on the chosen event loop (see `event_loop_factory`); a bad choice raises
    ConfigError before the coroutine is made. What is loaded by now (modules, config) lives as long as the process:
    `gc.freeze()` keeps collections from walking it again."""
    loop_factory = event_loop_factory()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _dumps(entry)


LOG_FORMATS = ("text", "json")


def configure_logging(level: str = "INFO", log_format: str = "text", access: bool = False) -> None:
    """Logging of both CLIs: one line per event on stderr; `access` turns on one line per request."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access_log.setLevel(logging.INFO if access else logging.WARNING)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own layout, except that text already laid out in lines (the key tables) is kept as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line if line.strip() else line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


_ENVIRONMENT_HELP = ("environment: GYM_VLLM_LOOP=auto|asyncio|uvloop picks the event loop (auto: uvloop when installed); "
                     "GYM_VLLM_JSON=stdlib decodes JSON with the standard library instead of msgspec (when installed).")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser laid out like `vllm serve --help`: titled groups, `--version` (local_vllm uses it too)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description, formatter_class=_HelpFormatter,
                                     epilog=_ENVIRONMENT_HELP)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, description: str) -> Any:
    """The Config group of both CLIs, `--config` and `--env` (returned, for local_vllm's `--dry-run`)."""
    files = parser.add_argument_group("Config", description)
    files.add_argument("--config", action="append", required=True, metavar="FILE[,FILE]",
                       help="config file(s); repeat or separate with commas")
    files.add_argument("--env", metavar="FILE", help="variables for ${name} (default: ./env.yaml if present)")
    return files


def add_logging_arguments(parser: argparse.ArgumentParser) -> Any:
    """The Logging group of both CLIs (returned, for local_vllm's own additions)."""
    logs = parser.add_argument_group("Logging")
    logs.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="log level (default: %(default)s)")
    logs.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                      help="text for people (default), json for log collectors: one object per line")
    logs.add_argument("--access-log", action="store_true",
                      help="one line per request (status, time, request id, upstream); off by default, it costs CPU at high rates")
    return logs


def add_config_key_group(parser: argparse.ArgumentParser, title: str, description: str,
                         rows: Iterable[tuple[str, str, str, str]]) -> None:
    """A help group listing config keys the way argparse lists options: `key: type`, then its meaning and default."""
    width = max(shutil.get_terminal_size().columns - 4, 40)  # argparse's width, less the group's indent
    lines = [*textwrap.wrap(description, width), ""]
    for name, type_text, default, meaning in rows:
        lines.append(f"{name}: {type_text}")
        lines += textwrap.wrap(f"{meaning} ({'required' if default == 'required' else f'default: {default}'})", width,
                               initial_indent=" " * 22, subsequent_indent=" " * 22, break_on_hyphens=False)
    parser.add_argument_group(title, "\n".join(lines))


INTERPOLATION_HELP = ("`${name}` comes from --env or top-level scalars of the config files, `${oc.env:VAR[,default]}` "
                       "from the environment.")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = new_parser("gym_vllm", "The OpenAI Responses API in front of vLLM: one server per `vllm_model` block of the "
                                    "config files, each on its own port. Rollout collection: python -m gym_vllm collect --help.")
    add_config_arguments(parser, "NeMo Gym's shape: `<server>: {responses_api_models: {vllm_model: {...}}}`, "
                                 "keys below; later files win key by key.")
    server = parser.add_argument_group("Server", "Overrides for a config with a single server.")
    server.add_argument("--host", help="listen host (default: the config's `host`, 127.0.0.1)")
    server.add_argument("--port", type=int, help="listen port (default: the config's `port`, 8080)")
    processes = parser.add_argument_group("Processes")
    processes.add_argument("--workers", type=int, default=1, metavar="N",
                           help="processes sharing each port (SO_REUSEPORT), for more than one core's worth of traffic "
                                "(default: %(default)s)")
    processes.add_argument("--worker-of", type=int, default=0, help=argparse.SUPPRESS)  # set by the parent of --workers
    processes.add_argument("--worker-metrics-dir", help=argparse.SUPPRESS)  # the workers' shared metrics folder
    add_logging_arguments(parser)
    add_config_key_group(parser, "vllm_model keys", f"The keys of a `vllm_model` block. {INTERPOLATION_HELP} "
                         f"Also accepted, and ignored: {', '.join(_IGNORED_KEYS)} (NeMo Gym's launcher key).",
                         config_key_rows(SERVER_KEYS.values(), ServerConfig))
    return parser.parse_args(argv)


def _supervise_workers(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The parent of `--workers N`: starts N copies of this command, restarts one that dies, stops all on a signal."""
    import subprocess
    import tempfile

    metrics_dir = tempfile.mkdtemp(prefix="gym_vllm-metrics-")
    command = [sys.executable, "-m", "gym_vllm", *argv, "--worker-of", str(args.workers), "--worker-metrics-dir", metrics_dir]
    workers: list[subprocess.Popen] = [subprocess.Popen(command) for _ in range(args.workers)]
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("started %d workers: %s", len(workers), ", ".join(str(w.pid) for w in workers))
    while not stopping:
        time.sleep(0.2)
        for i, worker in enumerate(workers):
            if worker.poll() is not None and not stopping:
                log.error("worker %d exited with code %s; starting a new one", worker.pid, worker.returncode)
                for name in os.listdir(metrics_dir):  # its figures leave with it
                    owner = _metrics_file_owner(name)
                    if owner and owner[1] == str(worker.pid):
                        os.remove(os.path.join(metrics_dir, name))
                time.sleep(1)
                workers[i] = subprocess.Popen(command)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "collect":
        return collect_main(argv[1:])
    args = _parse_args(argv)
    configure_logging(args.log_level, args.log_format, args.access_log)
    try:
        configs = load_config(args.config, args.env)
        if (args.host or args.port is not None) and len(configs) > 1:
            raise ConfigError(f"--host/--port apply to a single server, but the config defines {len(configs)}: "
                              f"{', '.join(c.name for c in configs)}; set `host`/`port` per server instead")
        if args.workers < 1:
            raise ConfigError("--workers must be at least 1")
        loop_factory = event_loop_factory()  # checks GYM_VLLM_LOOP before anything starts
    except ConfigError as exc:
        print(f"gym_vllm: error: {exc}", file=sys.stderr)
        return 2
    log.debug("event loop: %s; JSON: %s", "uvloop" if loop_factory else "asyncio", JSON_CODEC)
    if args.workers > 1 and not args.worker_of:
        return _supervise_workers(args, argv)

    async def run() -> None:
        cancel_on_signals()
        try:
            await serve(configs, args.host, args.port, workers=args.worker_of or 1, metrics_dir=args.worker_metrics_dir)
        except asyncio.CancelledError:
            log.info("shutting down")

    try:
        run_until_done(run)
    except ConfigError as exc:
        print(f"gym_vllm: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
