"""The README's commands, run as a newcomer would: `bash .ci/run serve` brings up vLLM + gym_vllm via local_vllm.

(`bash .ci/run` itself is what runs this suite.)
"""

import asyncio
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import gym_vllm
import tiny_engine
from conftest import server_config, strict_client, vllm_parses

REPO = Path(__file__).resolve().parent.parent


def run_curl(command: str) -> str:
    """A README curl line: run by curl when installed, else the same request by urllib (a fresh CI machine may lack curl)."""
    argv = shlex.split(command)
    if shutil.which("curl"):
        return subprocess.run(argv + ["-sS", "--fail-with-body"], capture_output=True, text=True, timeout=60, check=True).stdout
    url = argv[1]
    headers = dict(h.split(": ", 1) for h in argv[argv.index("-H") + 1::2][:1]) if "-H" in argv else {}
    data = argv[argv.index("-d") + 1].encode() if "-d" in argv else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as answer:
        return answer.read().decode()


@pytest.fixture
def fake_upstream_process():
    """bench/fake_upstream.py in its own process: the vLLM look-alike the README commands are pointed at."""
    from test_reliability import start_upstream
    port = tiny_engine.free_port()
    process = start_upstream(port)
    yield f"http://127.0.0.1:{port}/v1"
    process.kill()
    process.wait()


@pytest.mark.vllm
async def test_ci_run_serve_brings_up_the_demo_and_stops_cleanly(vllm_engine):
    # vllm_engine: the same skip-or-fail rule as the other real-engine tests (and the model is built).
    port = tiny_engine.free_port()
    process = subprocess.Popen(["bash", ".ci/run", "serve"], cwd=REPO, start_new_session=True,
                               env={**os.environ, "PORT": str(port)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the demo did not come up in 600 s"
                time.sleep(1)
        response = await strict_client(f"http://127.0.0.1:{port}/v1").responses.create(model="tiny", input="Hello", max_output_tokens=4)
        tokens = response.output[-1].model_dump()
        assert len(tokens["generation_token_ids"]) == len(tokens["generation_log_probs"]) == response.usage.output_tokens
        # The README's curl lines, against this port (curl itself where the machine has it).
        curls = [c for c, runner in README_COMMANDS.items() if runner == DEMO and c.startswith("curl")]
        outputs = {c: run_curl(c.replace("127.0.0.1:8080", f"127.0.0.1:{port}")) for c in curls}
        for command, output in outputs.items():
            if "/v1/responses" in command:
                assert json.loads(output)["object"] == "response", output
        [metrics] = [output for command, output in outputs.items() if command.endswith("/metrics")]
        assert 'gym_vllm_requests_total{server="policy_model",endpoint="/v1/responses",status="200"} 3' in metrics
    finally:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        output, _ = process.communicate(timeout=60)
    assert "listening on" in output and "ready: curl" in output
    [engine_metrics] = [line.split("metrics: ")[1].split()[0] for line in output.splitlines() if "(vLLM engine" in line]
    assert engine_metrics.startswith("http://127.0.0.1:") and engine_metrics.endswith("/metrics")
    ours = [line for line in output.splitlines() if not line.startswith("[policy_model]")]  # vLLM's own lines aside
    assert not any("Traceback" in line for line in ours), ours
    with pytest.raises(ProcessLookupError):  # nothing of the demo is left running: neither the supervisor...
        os.killpg(process.pid, 0)
    engines = subprocess.run(["pgrep", "-f", "api_server --model .cache/tiny-model"], capture_output=True, text=True)
    assert engines.stdout.strip() == ""  # ...nor the engine it started in its own process group


# --- every command in the README is run by a test, or says why it cannot run here ----------------


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks: continuations joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+", " ", re.split(r"\s+#\s", " " + line, maxsplit=1)[0]).strip()
            if command:
                commands.append(command)
    return commands


NO_DOCKER = "no Docker engine on these machines: tests/test_docker.py checks the Dockerfile without one, hadolint lints it"
DEMO = "test_ci_run_serve_brings_up_the_demo_and_stops_cleanly"
VLLM_SERVE = ("vllm serve Qwen/Qwen3-4B --api-key sk-local --enable-auto-tool-choice --tool-call-parser hermes")
# Each README command -> the test that runs it, or why it cannot run here (a new command fails the check below).
README_COMMANDS = {
    "bash .ci/run serve": DEMO,
    "bash .ci/run": "CI: `.ci/run` is what runs this suite",
    "curl http://127.0.0.1:8080/v1/responses -H 'Content-Type: application/json' -d '{\"input\": \"Hello\", \"max_output_tokens\": 16}'": DEMO,
    "curl http://127.0.0.1:8080/v1/responses -H 'Content-Type: application/json' -d '{\"input\": \"Hello\"}'": DEMO,
    "curl http://127.0.0.1:8080/metrics": DEMO,
    "pip install -e .": "CI: `.ci/run` installs the package the same way (`pip install -e '.[test,cpu]'`)",
    VLLM_SERVE: "test_readme_vllm_serve_commands_parse",
    VLLM_SERVE + " --max-num-seqs 512 --enable-prefix-caching --gpu-memory-utilization 0.92 --tensor-parallel-size 1 "
                 "--data-parallel-size 2": "test_readme_vllm_serve_commands_parse",
    "cp configs/env.example.yaml env.yaml": "test_readme_gym_vllm_commands",
    "python -m gym_vllm --config configs/vllm_model.yaml": "test_readme_gym_vllm_commands",
    "python -m gym_vllm --config configs/vllm_model.yaml,configs/vllm_judge_model.yaml": "test_readme_gym_vllm_commands",
    "python -m gym_vllm --config configs/vllm_model.yaml --workers 4": "test_readme_gym_vllm_commands",
    "export OPENAI_BASE_URL=http://127.0.0.1:8080/v1": "test_readme_openai_base_url_is_the_one_change",
    "python -m local_vllm --config configs/local/qwen3-30b-a3b-tp8.yaml":
        "needs 8 GPUs: the --dry-run below prints its exact engine command, which vLLM's own parser checks "
        "(test_local_vllm.py::test_vllms_own_parser_accepts_every_generated_command)",
    "python -m local_vllm --config configs/local/qwen3-30b-a3b-tp8.yaml --dry-run": "test_readme_local_vllm_dry_run",
    "docker build -t gym-vllm .": NO_DOCKER,
    "docker run --gpus all --ipc=host -p 8080:8080 -v ~/.cache/huggingface:/root/.cache/huggingface -e "
    "GYM_VLLM_MODEL=Qwen/Qwen3-4B -e HF_TOKEN gym-vllm": NO_DOCKER,
    "python -m gym_vllm collect --url http://127.0.0.1:8080/v1 --input prompts.jsonl --output rollouts.jsonl --num-repeats 4":
        "test_collect.py::test_the_readme_command",
    ".venv/bin/python bench/bench_stream.py --tokens 256 --concurrency 1,16,64 --seconds 6": "test_readme_bench_commands",
    ".venv/bin/python bench/bench_stream.py --paired --concurrency 1,64 --seconds 5": "test_readme_bench_commands",
    ".venv/bin/python bench/bench_stream.py --paired --token-ids --think-tokens 192 --concurrency 1,64 --seconds 5":
        "test_readme_bench_stream_rl_command",
    ".venv/bin/python bench/bench_proxy.py --concurrency 1,64,256,1024 --seconds 5 --rounds 3": "test_readme_bench_commands",
    ".venv/bin/python bench/bench_proxy.py --paired --ids-tokens 64 --rounds 3": "test_readme_bench_paired_command",
    ".venv/bin/python bench/bench_idle.py": "test_readme_bench_commands",
    ".venv/bin/python bench/bench_sessions.py": "test_readme_bench_commands",
    ".venv/bin/python bench/bench_instructions.py --conversion": "test_readme_bench_instructions_command",
}


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert set(commands) == set(README_COMMANDS), (
        f"README commands without a test: {sorted(set(commands) - set(README_COMMANDS))}; "
        f"listed here but gone from the README: {sorted(set(README_COMMANDS) - set(commands))}")
    sources = "".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    for command, runner in README_COMMANDS.items():
        for name in re.findall(r"(?<![\w/])test_\w+(?![\w.])", runner):  # the tests named (not file names)
            assert re.search(rf"def {name}\(", sources), f"{command!r}: no test named {name}"


def test_readme_tables_have_one_line_per_row():
    """A Markdown table row is one line: a row wrapped onto the next lines ends the table there, and its rest renders
    as loose text (round 13's row of "What made it faster" did). Outside code blocks, a line that starts a row ends it."""
    in_code = False
    for number, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("|"):
            assert line.rstrip().endswith("|"), f"README.md:{number}: a table row that goes on past its line: {line[:60]!r}"


# `python` is this interpreter (its venv's bin/ first on PATH), and the checkout is importable from anywhere.
NEWCOMER_PATH = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def run_shell(command: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A README command as a newcomer's shell runs it, with this interpreter as `python`."""
    environment = {**os.environ, **NEWCOMER_PATH, **(env or {})}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def newcomer_dir(tmp_path):
    """A copy of configs/ where the README's relative paths resolve, each shipped port swapped for a free one."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    ports = {}
    for config in (tmp_path / "configs").glob("*.yaml"):
        text = config.read_text()
        for port in set(re.findall(r"^\s+port: (\d+)", text, flags=re.M)):
            ports.setdefault(int(port), tiny_engine.free_port())
            text = re.sub(rf"(?m)^(\s+port: ){port}$", rf"\g<1>{ports[int(port)]}", text)
        config.write_text(text)
    return tmp_path, ports


@pytest.mark.parametrize("command", [c for c, r in README_COMMANDS.items() if r == "test_readme_gym_vllm_commands" and c.startswith("python")])
def test_readme_gym_vllm_commands(command, newcomer_dir, fake_upstream_process):
    """`cp configs/env.example.yaml env.yaml`, point it at an engine, then the README's command serves every server."""
    folder, ports = newcomer_dir
    assert run_shell("cp configs/env.example.yaml env.yaml", folder).returncode == 0
    env_yaml = (folder / "env.yaml").read_text()
    env_yaml = re.sub(r"(?m)^(policy|judge)_base_url: \S+", rf"\1_base_url: {fake_upstream_process}", env_yaml)
    (folder / "env.yaml").write_text(env_yaml)
    servers = [ports[8080]] + ([ports[8081]] if "judge" in command else [])
    process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=folder, start_new_session=True, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **NEWCOMER_PATH})
    try:
        for port in servers:
            deadline = time.monotonic() + 60
            while True:
                try:
                    body = json.dumps({"input": "hi", "max_output_tokens": 4}).encode()
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/responses", data=body,
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=5) as answer:
                        assert json.loads(answer.read())["object"] == "response"
                    break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "timeout"
                    time.sleep(0.2)
        workers = int(command.split("--workers ")[1]) if "--workers" in command else 1
        deadline = time.monotonic() + 30
        while workers > 1:  # every worker serves, and /metrics (any of them) shows all of them
            with urllib.request.urlopen(f"http://127.0.0.1:{servers[0]}/metrics", timeout=5) as answer:
                seen = set(re.findall(r'worker="(\d+)"', answer.read().decode()))
            if len(seen) == workers:
                break
            assert time.monotonic() < deadline, f"workers in /metrics: {seen}"
            time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and stderr.count("listening on") == len(servers) * workers, stderr


async def test_readme_openai_base_url_is_the_one_change(fake_upstreams, proxy, tmp_path):
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    [export] = [c for c in README_COMMANDS if c.startswith("export OPENAI_BASE_URL")]
    agent = tmp_path / "agent.py"  # agent code written for OpenAI's hosted API, unchanged
    agent.write_text("from openai import OpenAI\n"
                     "client = OpenAI()\n"
                     "print(client.responses.create(model='gpt-4.1', input='Hello').output_text)\n")
    result = await asyncio.to_thread(  # off the loop: the proxy under test runs on it
        run_shell, f"{export.replace('http://127.0.0.1:8080/v1', base)} && python {agent}", tmp_path,
        env={"OPENAI_API_KEY": "sk-anything", "OPENAI_BASE_URL": ""}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Hello from stub" and fake.requests[-1]["model"] == "tiny"


def test_readme_local_vllm_dry_run():
    [command] = [c for c in README_COMMANDS if c.startswith("python -m local_vllm") and c.endswith("--dry-run")]
    result = run_shell(command, REPO)
    assert result.returncode == 0, result.stderr
    assert "--tensor-parallel-size 8" in result.stdout and "server policy_model: http://127.0.0.1:8080/v1" in result.stdout


def test_readme_vllm_serve_commands_parse(vllm_engine):
    """The README's `vllm serve` lines are taken by vLLM's own argument parser and its validation."""
    commands = {c: ["--model", *shlex.split(c)[2:]] for c, r in README_COMMANDS.items() if r == "test_readme_vllm_serve_commands_parse"}
    assert len(commands) == 2
    parsed = vllm_parses(commands, ["model", "tool_call_parser", "enable_auto_tool_choice"])
    assert parsed == {c: ["Qwen/Qwen3-4B", "hermes", True] for c in commands}, parsed


BENCH_SHORT = {"bench_stream.py": "--seconds 0.3 --warmup 0.1 --concurrency 1 --tokens 16",
               "bench_proxy.py": "--seconds 0.3 --warmup 0.1 --concurrency 1 --rounds 2",
               "bench_idle.py": "--connections 16 --batch 8 --settle 0.1 --warmup-requests 2",
               "bench_sessions.py": "--sessions 20000"}


@pytest.mark.parametrize("command", [c for c, r in README_COMMANDS.items() if r == "test_readme_bench_commands"])
def test_readme_bench_commands(command):
    """Each benchmark as the README gives it, shortened (argparse keeps the last value of an option)."""
    script = command.split()[1].split("/")[-1]
    result = run_shell(f"{command.replace('.venv/bin/python', sys.executable)} {BENCH_SHORT[script]}", REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "|" in result.stdout or "MiB" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed (apt-get install valgrind)")
def test_readme_bench_instructions_command(tmp_path):
    """The instruction counter as the README gives it, on two targets and a few requests: gym_vllm's /v1/responses
    parses, converts and re-encodes, so it must execute more instructions per request than the pass-through; its
    conversion alone (`--conversion`) is part of that, not all of it (there is the I/O besides). Streams are counted
    per event the client got."""
    command = next(c for c, r in README_COMMANDS.items() if r == "test_readme_bench_instructions_command")
    out = tmp_path / "instructions.json"
    result = run_shell(f"{command.replace('.venv/bin/python', sys.executable)} --requests 20 --warmup 5 --stream-requests 4 "
                       f"--targets passthrough,gym-resp,passthrough-stream,gym-resp-stream --json {out}", REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["target"]: row for row in json.loads(out.read_text())["rows"]}
    for key in ("passthrough-stream", "gym-resp-stream"):  # a streamed event costs the proxy thousands, not millions
        assert 1_000 < rows[key]["instructions_per_event"] < 1_000_000 and rows[key]["events_per_client_read"] >= 1, rows
    assert "| gym_vllm responses stream | this checkout |" in result.stdout
    assert 100 < rows["passthrough"]["k_instructions"] < rows["gym-resp"]["k_instructions"], rows
    assert 50 < rows["gym-resp"]["k_conversion"] < rows["gym-resp"]["k_instructions"], rows
    assert "k_conversion" not in rows["passthrough"]
    assert "| gym_vllm responses | this checkout |" in result.stdout and "the conversion alone |" in result.stdout


def paired_rows(test_name: str, extra: str, tmp_path) -> tuple[list[dict], str]:
    """The paired rows (`--json`) and the printed table of the README's benchmark command that `test_name` tests,
    shortened by `extra` (argparse keeps the last value of an option); it must succeed."""
    command = next(c for c, r in README_COMMANDS.items() if r == test_name)
    out = tmp_path / "paired.json"
    result = run_shell(f"{command.replace('.venv/bin/python', sys.executable)} {extra} --json {out}", REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())["paired"], result.stdout


def test_readme_bench_stream_rl_command(tmp_path):
    """RL streams (token IDs, a `<think>` block) paired with the pass-through: both relay the same upstream stream with
    no error, and each gym_vllm target has its ratio per event and per stream (it sends fewer events than vLLM's chunks:
    the block becomes one reasoning item)."""
    rows, stdout = paired_rows("test_readme_bench_stream_rl_command", f"{BENCH_SHORT['bench_stream.py']} --think-tokens 8", tmp_path)
    assert sorted(r["target"] for r in rows) == ["gym-chat", "gym-resp"]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0 and row["floor_requests"] > 0, row
        assert row["vs_passthrough"] > 0 and row["vs_passthrough_per_stream"] > 0, row
    assert "| × per stream |" in stdout


def test_readme_bench_paired_command(tmp_path):
    """Every gym_vllm target paired with the pass-through of its shape: both measured, a ratio for each."""
    rows, stdout = paired_rows("test_readme_bench_paired_command", f"{BENCH_SHORT['bench_proxy.py']} --seconds 1", tmp_path)
    assert sorted(r["target"] for r in rows) == ["gym-chat", "gym-resp", "gym-resp-ids", "gym-resp-tools"]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0 and row["floor_requests"] > 0, row
        assert row["vs_passthrough"] > 0 and len(row["vs_passthrough_rounds"]) == 2, row
        assert row["excess_ms"] == pytest.approx(row["cpu_s_per_1k"] - row["floor_cpu_s_per_1k"]), row
    assert "| 1 | gym_vllm responses | " in stdout


def test_bench_proxy_reports_the_median_pair():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_proxy
    finally:
        sys.path.remove(str(REPO / "bench"))
    pairs = [bench_proxy.Paired(64, "gym-resp", "gym_vllm responses", "", 100, 100, 0, "", cpu, 0.2, cpu / 0.2)
             for cpu in (0.3, 0.2, 0.26)]
    failed = dataclasses.replace(pairs[0], failed="probe: boom", vs_passthrough=math.nan)
    chosen = bench_proxy.median_pair([pairs[0], failed, pairs[1], pairs[2]])
    assert chosen.cpu_s_per_1k == 0.26 and chosen.excess_ms == pytest.approx(0.06)
    assert chosen.vs_passthrough_rounds == pytest.approx([1.5, 1.0, 1.3])
    assert bench_proxy.median_pair([failed]).failed == "probe: boom"


def test_bench_proxy_reports_the_median_round():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_proxy
    finally:
        sys.path.remove(str(REPO / "bench"))
    target = bench_proxy.Target("gym-resp", "gym_vllm responses", "plain", "http://x", b"{}", "gym", "response",
                                bench_proxy.responses_signature, None)
    failed = bench_proxy._failed(target, 64, "probe: boom")
    rounds = [dataclasses.replace(failed, failed="", proxy_cpu_s_per_1k=cpu, p50_ms=p50) for cpu, p50 in ((0.3, 1.0), (0.5, 2.0), (0.2, 3.0))]
    chosen = bench_proxy.median_round([rounds[0], failed, rounds[1], rounds[2]])
    assert (chosen.proxy_cpu_s_per_1k, chosen.p50_ms, chosen.cpu_s_per_1k_rounds) == (0.3, 1.0, [0.3, 0.5, 0.2])
    assert bench_proxy._spread(chosen) == " (0.200–0.500)"
    direct = [dataclasses.replace(r, proxy_cpu_s_per_1k=None) for r in rounds]  # no proxy: the median by p50
    assert bench_proxy.median_round(direct).p50_ms == 2.0
    assert bench_proxy.median_round([failed]).failed == "probe: boom"


def test_bench_history_turns_give_both_proxies_the_same_messages():
    """`--history-turns`: the pass-through forwards the very messages gym_vllm makes of the Responses history, so the
    two carry the same token ids and log probs; without it the bodies are the single question they always were."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_proxy
        import fake_upstream
    finally:
        sys.path.remove(str(REPO / "bench"))
    ports = {"upstream": 1, "passthrough": 2, "gym": 3, "gym_ids": 4}

    def bodies(*flags: str) -> dict:
        args = bench_proxy.parse_args(["--targets", "passthrough-ids,gym-resp-ids", "--ids-tokens", "8", *flags])
        return {target.key: json.loads(target.body) for target in bench_proxy.build_targets(args, ports)}

    plain = bodies()
    assert plain["gym-resp-ids"]["input"] == bench_proxy.PROMPT and len(plain["passthrough-ids"]["messages"]) == 1
    history = bodies("--history-turns", "3")
    config = server_config("http://u/v1", return_token_id_information=True)
    converted = gym_vllm.responses_request_to_chat(history["gym-resp-ids"], config)["messages"]
    assert converted == history["passthrough-ids"]["messages"] and len(converted) == 7
    assert [len(m["prompt_token_ids"]) for m in converted if m["role"] == "assistant"] == [200, 228, 256]
    assert all(len(m["generation_log_probs"]) == 8 for m in converted if m["role"] == "assistant")
    # The fake vLLM's prompt holds the whole history, as a real engine's does, and its ids come back in the reply: the
    # last turn's prompt and answer, the template, then the tool's answer after them.
    assert fake_upstream._prompt_length(history["passthrough-ids"]) == 256 + 8 + 8 + len("18 C and sunny") // 4
    assert fake_upstream._prompt_length(plain["passthrough-ids"]) == 8 + len(bench_proxy.PROMPT) // 4
    # `--prompt-tokens N`: a question the fake vLLM counts as N tokens, the same text through both proxies.
    for tokens in (19, 20, 2000):
        long = bodies("--prompt-tokens", str(tokens))
        assert fake_upstream._prompt_length(long["passthrough-ids"]) == tokens
        assert long["gym-resp-ids"]["input"] == long["passthrough-ids"]["messages"][0]["content"]
    assert bodies("--prompt-tokens", "5")["gym-resp-ids"]["input"] == bench_proxy.PROMPT  # never shorter than the question
