"""local_vllm: config and command building (pure), vLLM's own parser, the supervisor with a fake and a real engine."""

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

import gym_vllm
import local_vllm
from gym_vllm import ConfigError
from local_vllm import EngineConfig
from conftest import vllm_parses

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs" / "local").glob("*.yaml"))
FAKE_ENGINE = str(Path(__file__).parent / "fake_engine.py")


def block(values, name="policy_model", kind="local_vllm_model"):
    return gym_vllm.ServerBlock(name, kind, values, "test.yaml")


def local_values(**overrides):
    values = {"model": "org/model", "return_token_id_information": True, "uses_reasoning_parser": True,
              "vllm_serve_kwargs": {"data_parallel_size": 1, "tensor_parallel_size": 2, "pipeline_parallel_size": 1},
              "vllm_serve_env_vars": {"VLLM_RAY_DP_PACK_STRATEGY": "strict"}}
    return {**values, **overrides}


# --- config and command building (pure) ---------------------------------------------------------


def test_kwargs_to_flags():
    assert local_vllm.kwargs_to_flags({
        "tensor_parallel_size": 8, "enforce_eager": True, "enable_prefix_caching": False, "served_model_name": ["a", "b"],
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}, "max_model_len": None, "gpu-memory-utilization": 0.9,
    }) == ["--tensor-parallel-size", "8", "--enforce-eager", "--no-enable-prefix-caching", "--served-model-name", "a", "b",
           "--speculative-config", '{"method":"ngram","num_speculative_tokens":3}', "--gpu-memory-utilization", "0.9"]


def test_engine_command_injects_ray_port_key_and_download_dir():
    engine, proxy = local_vllm.engine_from_block(block(local_values(hf_home="/hf")))
    argv, env = local_vllm.engine_command(engine, 12345, "secret-key", python="/py")
    assert argv == ["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/model",
                    "--data-parallel-size", "1", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1",
                    "--distributed-executor-backend", "ray", "--data-parallel-backend", "ray", "--data-parallel-size-local", "1",
                    "--host", "0.0.0.0", "--port", "12345", "--download-dir", "/hf/hub", "--api-key", "secret-key"]
    assert env == {"HF_HOME": "/hf", "VLLM_RAY_DP_PACK_STRATEGY": "strict"}
    assert proxy["model"] == "org/model" and "vllm_serve_kwargs" not in proxy
    span, _ = local_vllm.engine_from_block(block(local_values(vllm_serve_env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "span"})))
    assert "--data-parallel-size-local" not in local_vllm.engine_command(span, 1, "k")[0]
    no_ray, _ = local_vllm.engine_from_block(block(local_values(use_ray=False, engine_host="127.0.0.1",
                                                                vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1,
                                                                                   "pipeline_parallel_size": 1, "distributed_executor_backend": "uni",
                                                                                   "served_model_name": ["tiny", "alias"]})))
    argv = local_vllm.engine_command(no_ray, 1, "k")[0]
    assert "ray" not in argv and argv[argv.index("--host") + 1] == "127.0.0.1" and "uni" in argv
    assert no_ray.served_model_name == "tiny"


@pytest.mark.parametrize("values, fragment", [
    (local_values(base_url="http://x/v1"), "base_url: filled in by local_vllm"),
    (local_values(api_key="k"), "api_key: filled in by local_vllm"),
    (local_values(vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1}), "pipeline_parallel_size: required"),
    (local_values(vllm_serve_env_vars={}), "VLLM_RAY_DP_PACK_STRATEGY: required"),
    (local_values(vllm_serve_env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "fill"}), "got 'fill'"),
    (local_values(vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "port": 1}),
     "vllm_serve_kwargs.port: set by local_vllm"),
    (local_values(vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "host": "x"}),
     "use `engine_host`"),
    (local_values(vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                                     "distributed_executor_backend": "mp"}), "distributed_executor_backend: set by local_vllm"),
    (local_values(vllm_serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "download-dir": "/x"}),
     "download-dir: set by local_vllm"),
    (local_values(hf_hom="/x"), "unknown key (did you mean `hf_home`?)"),
    (local_values(use_ray="no"), "use_ray: expected true or false"),
    ({k: v for k, v in local_values().items() if k != "model"}, "model: required key is missing"),
    # found by a review: YAML's false and null became "False" and "None" (vLLM's int() of them fails); NaN never ran out
    (local_values(vllm_serve_env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict", "VLLM_USE_V1": False}),
     "vllm_serve_env_vars.VLLM_USE_V1: an environment variable's value is a string or a number, got False"),
    (local_values(vllm_serve_env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict", "HF_TOKEN": None}), "HF_TOKEN: an environment"),
    (local_values(startup_timeout_s=float("nan")), "startup_timeout_s: must be positive"),
])
def test_engine_config_errors(values, fragment):
    with pytest.raises(ConfigError) as info:
        local_vllm.plan_from_blocks([block(values)])
    assert fragment in str(info.value) and str(info.value).startswith("test.yaml: policy_model.responses_api_models.local_vllm_model")


def test_engine_config_errors_point_at_the_line(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text("policy_model:\n  responses_api_models:\n    local_vllm_model:\n      model: m\n"
                    "      return_token_id_information: false\n      uses_reasoning_parser: true\n"
                    "      vllm_serve_kwargs: {data_parallel_size: 1, tensor_parallel_size: 1, pipeline_parallel_size: 1,\n"
                    "                          port: 1}\n      vllm_serve_env_vars: {VLLM_RAY_DP_PACK_STRATEGY: strict}\n")
    with pytest.raises(ConfigError) as info:
        local_vllm.load_plan([str(path)])
    assert str(info.value) == f"{path}:8: policy_model.responses_api_models.local_vllm_model.vllm_serve_kwargs.port: set by local_vllm; remove it"


def test_local_engine_references():
    plan = local_vllm.plan_from_blocks([
        block(local_values(port=8080)),
        block({"base_url": "local:policy_model", "return_token_id_information": False, "uses_reasoning_parser": False,
               "chat_template_kwargs": {"enable_thinking": False}, "port": 8081}, "no_thinking", "vllm_model"),
        block({"base_url": "http://elsewhere:8000/v1", "api_key": "k", "model": "m", "return_token_id_information": False,
               "uses_reasoning_parser": False, "port": 8082}, "remote", "vllm_model"),
    ])
    assert [e.name for e in plan.engines] == ["policy_model"]
    assert [(s.name, s.model, engine) for s, engine in plan.servers] == [
        ("policy_model", "org/model", "policy_model"), ("no_thinking", "org/model", "policy_model"), ("remote", "m", None)]
    assert plan.servers[1][0].chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError) as info:
        local_vllm.plan_from_blocks([block(local_values()), block({"base_url": "local:polcy_model", "return_token_id_information": False,
                                                                   "uses_reasoning_parser": False, "port": 1}, "x", "vllm_model")])
    assert "no local engine named 'polcy_model'" in str(info.value) and "did you mean `policy_model`" in str(info.value)
    with pytest.raises(ConfigError) as info:  # gym_vllm alone cannot serve it
        gym_vllm.load_config([str(REPO / "configs" / "local" / "proxy-thinking-on-off.yaml")])
    assert "python -m local_vllm" in str(info.value)


def test_evaluator_deployment_block():
    plan = local_vllm.plan_from_blocks([block({"type": "vllm", "hf_model_handle": "Qwen/Qwen3-8B", "served_model_name": "q",
                                               "port": 8000, "tensor_parallel_size": 2, "extra_args": "--max-model-len 4096",
                                               "endpoints": {"chat": "/v1/chat/completions", "health": "/health"}},
                                              "deployment", "deployment")])
    [engine] = plan.engines
    argv, _ = local_vllm.engine_command(engine, engine.port, "k")
    assert engine.port == 8000 and not engine.use_ray and argv[-2:] == ["--max-model-len", "4096"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and plan.servers[0][0].model == "q"
    for bad, fragment in (({"type": "sglang", "hf_model_handle": "m"}, "only `vllm`"), ({"type": "vllm"}, "exactly one of"),
                          ({"type": "vllm", "hf_model_handle": "m", "prot": 1}, "did you mean `port`"),
                          # found by a review: a traceback, and options local_vllm sets, and no parallelism at all
                          ({"type": "vllm", "hf_model_handle": "m", "extra_args": "--chat-template 'x"}, "balance its quotes"),
                          ({"type": "vllm", "hf_model_handle": "m", "extra_args": "--port 19000"}, "`--port` is set by local_vllm"),
                          ({"type": "vllm", "hf_model_handle": "m", "extra_args": ["--api-key=s"]}, "`--api-key` is set by"),
                          ({"type": "vllm", "hf_model_handle": "m", "tensor_parallel_size": 0}, "must be a positive integer"),
                          # the deployment's proxy serves on 8080: the engine started, then the proxy could not listen
                          ({"type": "vllm", "hf_model_handle": "m", "port": 8080}, "both use port 8080")):
        with pytest.raises(ConfigError) as info:
            local_vllm.plan_from_blocks([block(bad, "deployment", "deployment")])
        assert fragment in str(info.value)


def test_port_pool_never_hands_out_a_port_twice():
    pool = local_vllm.PortPool(20000, 20050)
    ports = [pool.allocate() for _ in range(40)]
    assert len(set(ports)) == 40 and all(20000 <= p <= 20050 for p in ports)
    pool.release(ports[0])
    import socket
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        narrow = local_vllm.PortPool(taken, taken)
        with pytest.raises(RuntimeError):
            narrow.allocate()


def test_cli_help_documents_every_key_and_version():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "local_vllm", *args], capture_output=True, text=True, timeout=60, cwd=REPO)

    help_text = run("--help").stdout
    for group in ("Config:", "Server:", "Logging:", "local_vllm_model keys:", "vllm_model keys:"):
        assert f"\n{group}\n" in help_text
    proxy_keys = [k for name, k in gym_vllm.SERVER_KEYS.items() if name not in ("base_url", "api_key", "model")]
    for key, type_text, _, _ in [*gym_vllm.config_key_rows(local_vllm.ENGINE_KEYS.values(), EngineConfig),
                                 *gym_vllm.config_key_rows(proxy_keys, gym_vllm.ServerConfig)]:
        assert f"\n  {key}: {type_text}\n" in help_text
    assert "\n  base_url:" not in help_text  # filled in by local_vllm
    assert run("--version").stdout.strip() == f"local_vllm {gym_vllm.__version__}"


def test_cli_host_and_port_override_a_single_server(tmp_path):
    result = subprocess.run([sys.executable, "-m", "local_vllm", "--config", str(REPO / "configs" / "local" / "tiny-cpu.yaml"),
                             "--dry-run", "--host", "0.0.0.0", "--port", "9000"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and "server policy_model: http://0.0.0.0:9000/v1" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-m", "local_vllm", "--config", str(REPO / "configs" / "local" / "two-instances-tp4.yaml"),
                             "--dry-run", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "--host/--port apply to a single server" in result.stderr


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_dry_run_on_every_shipped_config(config):
    result = subprocess.run([sys.executable, "-m", "local_vllm", "--config", str(config), "--dry-run"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "command: " in result.stdout and "--api-key '***'" in result.stdout and "executor: " in result.stdout


def test_vllms_own_parser_accepts_every_generated_command(vllm_engine):
    """The real `vllm serve` argument parser (and its validation) takes what we generate for every shipped config."""
    commands = {}
    for config in SHIPPED:
        for engine in local_vllm.load_plan([str(config)]).engines:
            commands[f"{config.name}:{engine.name}"] = local_vllm.engine_command(engine, 12345, "key")[0][3:]
    typed = EngineConfig("typed", "x", "m", {"data_parallel_size": 1, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                                             "enforce_eager": False, "enable_prefix_caching": True, "served_model_name": ["a", "b"],
                                             "speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                                    "prompt_lookup_max": 5, "prompt_lookup_min": 2},
                                             "max_num_seqs": 256},
                         {"VLLM_RAY_DP_PACK_STRATEGY": "strict"}, "/hf")
    commands["typed"] = local_vllm.engine_command(typed, 1, "k")[0][3:]
    parsed = vllm_parses(commands, ["model", "port", "tensor_parallel_size"])
    assert set(parsed) == set(commands)
    for name, outcome in parsed.items():
        assert isinstance(outcome, list), f"{name}: {outcome}"
    assert parsed["typed"] == ["m", 1, 1]


# --- the supervisor with a fake engine (faults on demand) ----------------------------------------


def fake_engine(mode="serve", **overrides) -> EngineConfig:
    values = dict(name="fake", source="test.yaml", model="m", serve_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 1,
                                                                           "pipeline_parallel_size": 1},
                  env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict", "FAKE_ENGINE_MODE": mode}, hf_home="/tmp/hf", use_ray=False,
                  engine_host="127.0.0.1", startup_timeout_s=20, restart_backoff_s=0.5, vllm_command=("{python}", FAKE_ENGINE))
    return EngineConfig(**{**values, **overrides})


async def ask(base_url):
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/responses", json={"input": "hi"}) as answer:
            return answer.status, await answer.json()


async def test_supervisor_restarts_a_crashed_engine_and_the_proxy_says_503_meanwhile(tmp_path, aiohttp_server):
    config = gym_vllm.server_config_from_dict("p", {"base_url": "http://127.0.0.1:1/v1", "api_key": "x", "model": "m",
                                                    "return_token_id_information": False, "uses_reasoning_parser": False}, "t")
    app = gym_vllm.build_app(config)
    [upstream] = app[gym_vllm.BALANCER_KEY].upstreams
    async with local_vllm.LocalVLLM(fake_engine(restart_backoff_s=1.5), log_dir=tmp_path, upstreams=[upstream], echo_logs=False) as engine:
        app[gym_vllm.CONFIG_KEY] = dataclasses.replace(config, api_key=engine.api_key)
        base = f"http://127.0.0.1:{(await aiohttp_server(app)).port}/v1"
        status, body = await ask(base)
        first_port = engine.port
        assert status == 200 and body["output"][0]["content"][0]["text"] == f"engine on {first_port}"
        os.kill(engine.process.pid, signal.SIGKILL)  # the engine crashes
        for _ in range(40):  # passive ejection may answer 503 first; then the supervisor says why
            status, body = await ask(base)
            if status == 503 and "restarting" in body["error"]["message"]:
                break
            await asyncio.sleep(0.05)
        assert status == 503 and "restarting" in body["error"]["message"] and body["error"]["code"] == "upstream_unavailable"
        for _ in range(100):
            status, body = await ask(base)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and engine.restarts == 1 and body["output"][0]["content"][0]["text"] == f"engine on {engine.port}"
        async with aiohttp.ClientSession() as http:  # the restart shows in /metrics
            async with http.get(base.removesuffix("/v1") + "/metrics") as answer:
                assert f'gym_vllm_engine_restarts_total{{server="p",upstream="{upstream.base_url}"}} 1' in await answer.text()
        pgid = engine.process.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert upstream.unavailable and "stopped" in upstream.unavailable


async def test_supervisor_gives_up_after_max_restarts(tmp_path):
    engine = local_vllm.LocalVLLM(fake_engine(max_restarts=0), log_dir=tmp_path, upstreams=[gym_vllm.Upstream("x")], echo_logs=False)
    await engine.start()
    try:
        os.kill(engine.process.pid, signal.SIGKILL)
        await asyncio.wait_for(engine.gave_up.wait(), 10)
        assert "crashed 1 times in a row" in engine.upstreams[0].unavailable
    finally:
        await engine.stop()


async def test_startup_failure_reports_the_log_tail(tmp_path):
    engine = local_vllm.LocalVLLM(fake_engine("exit_at_once"), log_dir=tmp_path, echo_logs=False)
    with pytest.raises(local_vllm.EngineError) as info:
        await engine.start()
    assert "exited with code 3" in str(info.value) and "failing on purpose" in str(info.value)
    assert engine.api_key not in str(info.value) and "api_key=***" in str(info.value)  # the tail goes to stderr
    assert engine.api_key not in (tmp_path / "fake-engine.log").read_text()
    hanging = local_vllm.LocalVLLM(fake_engine("hang", startup_timeout_s=1.5), log_dir=tmp_path, echo_logs=False)
    with pytest.raises(local_vllm.EngineError) as info:
        await hanging.start()
    assert "not healthy after 2 s" in str(info.value) and "startup_timeout_s" in str(info.value)


async def test_an_engine_redrawing_a_progress_bar_starts_and_its_log_keeps_the_last_state(tmp_path):
    """300 KB of a `\r`-redrawn progress bar with no newline: the log pump read lines, and one over asyncio's 64 KiB
    limit ended it, so nothing read the engine's output, the pipe filled and the engine blocked: never healthy."""
    async with local_vllm.LocalVLLM(fake_engine("progress", startup_timeout_s=15), log_dir=tmp_path, echo_logs=False) as engine:
        assert await ask_engine(engine) == 200
    log_lines = (tmp_path / "fake-engine.log").read_text().splitlines()
    assert "Loading safetensors checkpoint shards: 100.0% |" in log_lines[0] and "5999/6000" in log_lines[0]
    assert len(log_lines[0]) < 200 and any(line.startswith("fake engine listening") for line in log_lines)


async def ask_engine(engine) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(engine.base_url.removesuffix("/v1") + "/health") as answer:
            return answer.status


def test_the_engine_is_reached_where_it_binds():
    """`engine_host` one address (not every interface): the health checks and the proxy went to 127.0.0.1, which
    cannot reach it: never healthy. Found by a review."""
    for host, url in (("0.0.0.0", "http://127.0.0.1:9/v1"), ("127.0.0.1", "http://127.0.0.1:9/v1"), ("::", "http://127.0.0.1:9/v1"),
                      ("127.0.0.2", "http://127.0.0.2:9/v1"), ("10.1.2.3", "http://10.1.2.3:9/v1"), ("fd00::5", "http://[fd00::5]:9/v1")):
        engine = local_vllm.LocalVLLM(fake_engine(engine_host=host), echo_logs=False)
        engine.port = 9
        assert engine.base_url == url, host


async def test_an_engine_that_cannot_start_is_a_one_line_error(tmp_path):
    """A `vllm_command` that is not there, and a fixed port someone holds: each an EngineError that says what to fix
    (the first was a traceback at the CLI, the second `local_vllm: error: port_taken`). Found by a review."""
    missing = local_vllm.LocalVLLM(fake_engine(vllm_command=(str(tmp_path / "no-such-vllm"), "serve")), log_dir=tmp_path,
                                   echo_logs=False)
    with pytest.raises(local_vllm.EngineError, match=r"cannot run .*no-such-vllm: No such file or directory; check "
                                                     r"`vllm_command` in test.yaml"):
        await missing.start()
    import tiny_engine
    taken = tiny_engine.free_port()
    engine = fake_engine("port_in_use", port=taken, env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict", "FAKE_ENGINE_MODE": "port_in_use",
                                                              "FAKE_ENGINE_BUSY_PORT": str(taken)})
    with pytest.raises(local_vllm.EngineError, match=f"port {taken} is already in use .*choose another `port` in test.yaml"):
        await local_vllm.LocalVLLM(engine, log_dir=tmp_path, echo_logs=False).start()


async def test_a_port_lost_to_a_race_is_retried_on_another(tmp_path):
    import tiny_engine

    class RacyPool(local_vllm.PortPool):
        """Hands out first a port that someone else grabs before the engine binds it."""

        def __init__(self, lost: int) -> None:
            super().__init__()
            self.lost = [lost]

        def allocate(self) -> int:
            return self.lost.pop() if self.lost else super().allocate()

    lost = tiny_engine.free_port()
    engine = fake_engine("port_in_use", env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict", "FAKE_ENGINE_MODE": "port_in_use",
                                                  "FAKE_ENGINE_BUSY_PORT": str(lost)})
    async with local_vllm.LocalVLLM(engine, ports=RacyPool(lost), log_dir=tmp_path, echo_logs=False) as running:
        assert running.port != lost
        assert "address already in use" in (tmp_path / "fake-engine.log").read_text()


# --- the real engine ------------------------------------------------------------------------------


def tiny_config(tmp_path, port):
    model_dir = os.environ.get("GYM_VLLM_TINY_MODEL_DIR", str(REPO / ".cache" / "tiny-model"))
    text = (REPO / "configs" / "local" / "tiny-cpu.yaml").read_text()
    text = text.replace("model: .cache/tiny-model", f"model: {model_dir}").replace("port: 8080", f"port: {port}")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.vllm
async def test_real_engine_serves_restarts_and_stops_clean(vllm_engine, tmp_path):
    import tiny_engine
    port = tiny_engine.free_port()
    plan = local_vllm.load_plan([tiny_config(tmp_path, port)])
    task = asyncio.create_task(local_vllm.run(plan, tmp_path))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                status, body = await ask(base)
                break
            except aiohttp.ClientError:
                assert not task.done(), task
                await asyncio.sleep(0.5)
        assert status == 200 and body["model"] == "tiny" and body["output"][-1]["generation_token_ids"]
        # find the engine process: the only api_server on the tiny model started by this run
        out = subprocess.run(["pgrep", "-f", f"api_server --model {plan.engines[0].model}"], capture_output=True, text=True).stdout.split()
        assert out, "engine process not found"
        os.kill(int(out[0]), signal.SIGKILL)
        started = time.monotonic()
        statuses = set()
        while time.monotonic() - started < 180:
            status, body = await ask(base)
            statuses.add(status)
            if status == 200 and len(statuses) > 1:
                break
            await asyncio.sleep(0.5)
        assert status == 200 and 503 in statuses  # restarted, and unavailable (not hanging) meanwhile
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    leftover = subprocess.run(["pgrep", "-f", f"api_server --model {plan.engines[0].model}"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


@pytest.mark.vllm
def test_sigterm_during_startup_leaves_no_process(vllm_engine, tmp_path):
    import tiny_engine
    process = subprocess.Popen([sys.executable, "-m", "local_vllm", "--config", tiny_config(tmp_path, tiny_engine.free_port()),
                                "--log-dir", str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    engine_pid = None
    for line in process.stderr:
        if "engine policy_model: pid " in line:
            engine_pid = int(line.split("pid ")[1].split(",")[0])
            break
    assert engine_pid is not None
    time.sleep(3)  # well inside vLLM's start-up
    process.send_signal(signal.SIGTERM)
    process.stderr.read()
    assert process.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(engine_pid, 0)


def supervisor_of_a_fake_engine(tmp_path, mode: str, subreaper: bool = False) -> tuple[subprocess.Popen, int]:
    """`python -m local_vllm` with the fake engine in `mode`, once ready: (the process, the engine's pid). `subreaper`:
    the supervisor reaps orphans, as PID 1 does in a container without an init (the Dockerfile's way)."""
    import tiny_engine
    config = tmp_path / "fake.yaml"
    config.write_text(textwrap.dedent(f"""\
        policy_model:
          responses_api_models:
            local_vllm_model:
              model: m
              use_ray: false
              return_token_id_information: false
              uses_reasoning_parser: false
              port: {tiny_engine.free_port()}
              startup_timeout_s: 30
              restart_backoff_s: 0.5
              vllm_command: ["{{python}}", "{FAKE_ENGINE}"]
              vllm_serve_kwargs: {{data_parallel_size: 1, tensor_parallel_size: 1, pipeline_parallel_size: 1}}
              vllm_serve_env_vars: {{VLLM_RAY_DP_PACK_STRATEGY: strict, FAKE_ENGINE_MODE: {mode}}}
        """))
    argv = [sys.executable, "-m", "local_vllm", "--config", str(config), "--log-dir", str(tmp_path)]
    if subreaper:  # PR_SET_CHILD_SUBREAPER (36) survives the exec
        argv = [sys.executable, "-c", "import ctypes, os, sys; ctypes.CDLL('libc.so.6').prctl(36, 1); "
                                      "os.execv(sys.argv[1], sys.argv[1:])", *argv]
    process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    engine_pid = None
    for line in process.stderr:
        if "engine policy_model: pid " in line:
            engine_pid = int(line.split("pid ")[1].split(",")[0])
        if "ready: curl" in line:
            break
    assert engine_pid is not None
    return process, engine_pid


def test_a_second_ctrl_c_kills_an_engine_that_ignores_sigterm_at_once(tmp_path):
    """Ctrl-C, then Ctrl-C again while the engine (ignoring SIGTERM) has its 20 s of grace: the supervisor kills the
    engine's group at once and exits. The second one cancelled the stop itself: the supervisor exited at once with 0
    and left the engine running."""
    process, engine_pid = supervisor_of_a_fake_engine(tmp_path, "ignore_term")
    process.send_signal(signal.SIGINT)
    time.sleep(1.5)
    os.killpg(engine_pid, 0)  # still there: it ignored SIGTERM and has its grace period
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=15) == 0 and time.monotonic() - started < 10, rest
    assert "stopping at once" in rest
    with pytest.raises(ProcessLookupError):
        os.killpg(engine_pid, 0)


def test_as_pid_1_an_engine_killed_under_its_workers_is_restarted_and_stopped(tmp_path):
    """The engine's own process killed (the OOM killer), its worker left: as PID 1 (or a subreaper) the worker, when
    it exits, is a zombie of ours, and a zombie kept the group alive to killpg: the restart waited for good, and so did
    a shutdown. Found by a review of local_vllm."""
    import threading
    process, engine_pid = supervisor_of_a_fake_engine(tmp_path, "fork_worker", subreaper=True)
    watchdog = threading.Timer(60, process.kill)  # a hang ends the stream of lines, and the test fails
    watchdog.start()
    try:
        os.kill(engine_pid, signal.SIGKILL)
        assert any("healthy after" in line for line in process.stderr), "the engine was not restarted"
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=30) == 0, rest
        with pytest.raises(ProcessLookupError):
            os.killpg(engine_pid, 0)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_golden_commands_of_the_shipped_configs(config, monkeypatch):
    """The exact argv and environment each shipped config produces (tests/golden/<config>.json)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("GYM_VLLM_MODEL", raising=False)  # docker.yaml's model
    produced = {}
    for engine in local_vllm.load_plan([str(config)]).engines:
        argv, env = local_vllm.engine_command(engine, 12345, "KEY", python="python")
        produced[engine.name] = {"argv": [a.replace(str(REPO), "<repo>") for a in argv],
                                 "env": {k: v.replace(str(REPO), "<repo>") for k, v in env.items()}}
    assert produced == json.loads((Path(__file__).parent / "golden" / f"{config.stem}.json").read_text())


def test_embedded_supervisor_shows_engine_lines_without_logging_setup(tmp_path):
    """`LocalVLLM(..., echo_logs=True)` in a program that configured no logging still shows the engine's lines."""
    script = ("import asyncio, sys\n"
              "sys.path.insert(0, 'tests')\n"
              "import local_vllm\n"
              "from test_local_vllm import fake_engine\n"
              "async def main():\n"
              f"    engine = local_vllm.LocalVLLM(fake_engine('exit_at_once'), log_dir={str(tmp_path)!r})\n"
              "    try:\n"
              "        await engine.start()\n"
              "    except local_vllm.EngineError:\n"
              "        print('start failed as expected')\n"
              "asyncio.run(main())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "start failed as expected" in result.stdout, result.stderr
    assert "[fake] fake engine: failing on purpose" in result.stderr


def test_engine_lines_are_shown_whatever_the_log_level():
    root, output = logging.getLogger(), local_vllm.engine_output
    saved = root.level, output.level, output.handlers[:], output.propagate
    try:
        root.setLevel(logging.ERROR)
        local_vllm.show_engine_output("text")
        assert output.isEnabledFor(logging.INFO) and len(output.handlers) == 1 and not output.propagate
        local_vllm.show_engine_output("text")  # a second CLI run in one process adds no second handler
        assert len(output.handlers) == 1
        local_vllm.show_engine_output("json")  # JSON lines come from the root handler
        assert output.isEnabledFor(logging.INFO) and output.handlers == [] and output.propagate
    finally:
        root.setLevel(saved[0])
        output.setLevel(saved[1])
        output.handlers[:], output.propagate = saved[2], saved[3]
