"""Shared pieces of the benchmarks in bench/: child processes, CPU/RSS accounting, the closed-loop load.

Not a benchmark itself. `bench_stream.py`, `bench_proxy.py` and `bench_idle.py` import it as
`harness` (they are run as scripts, so `bench/` is on `sys.path`).

* `Child`: a server process (fake upstream, pass-through, gym_vllm) with its stderr in a temp file,
  started in its own session, SIGTERMed if the benchmark dies (PR_SET_PDEATHSIG), and a
  `wait_ready()` that polls a URL and reports the stderr tail if the process exits or never answers.
* `cpu_seconds(pid)` (utime+stime from /proc/<pid>/stat), `rss_kib(pid)` (VmRSS from
  /proc/<pid>/status), `machine_cpu()` and `foreign_load()` (/proc/stat).
* `closed_loop()`: C workers each sending one request after the other for warm-up + window, with
  the CPU of the watched processes, of the load generator and of the whole machine sampled at the
  window's edges; only requests that end inside the window count. `alternating_loop()`: the same over
  several targets, one request each in turn (the benchmarks' `--paired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import math
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Iterator, Sequence, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import gym_vllm  # noqa: E402  (the speed-up choices it makes from GYM_VLLM_LOOP / GYM_VLLM_JSON)
BENCH = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}


# ============================================================================================
# /proc readings
# ============================================================================================


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5), counted from `state`


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status), in KiB."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of a process."""
    fd_dir = f"/proc/{pid}/fd"
    total = sockets = 0
    for name in os.listdir(fd_dir):
        total += 1
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                sockets += 1
    return total, sockets


def raise_nofile(wanted: int) -> int:
    """Raises this process's soft RLIMIT_NOFILE towards `wanted` (children started later inherit it); returns the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def speedups() -> str:
    """The event loop and JSON decoder gym_vllm and the pass-through run with here (GYM_VLLM_LOOP, GYM_VLLM_JSON)."""
    loop = "uvloop" if gym_vllm.event_loop_factory() else "asyncio"
    return f"{loop} loop, {gym_vllm.JSON_CODEC} JSON"


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from the `cpu` line of /proc/stat."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)       # idle + iowait
    total = sum(ticks[:8])                                        # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


def foreign_load(seconds: float = 0.5) -> float:
    """How many cores were busy over `seconds`, before any of ours started."""
    busy0, _ = machine_cpu()
    time.sleep(seconds)
    busy1, _ = machine_cpu()
    return (busy1 - busy0) / seconds


# ============================================================================================
# Child processes
# ============================================================================================


class StartError(RuntimeError):
    """A child process did not come up; the message carries its stderr tail."""


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies without cleaning up (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Child:
    """A server process with its stderr in a temp file, and a URL that answers 200 once it is ready."""

    def __init__(self, name: str, argv: list[str], ready_url: str, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.ready_url = ready_url
        self.stderr_path = workdir / f"{name}.stderr"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def stderr_tail(self, lines: int = 25) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr captured)"
        return "\n".join(text.splitlines()[-lines:]) or "(stderr is empty)"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise StartError(f"{self.name} exited with code {code} before answering {self.ready_url}\n"
                                 f"command: {' '.join(self.argv)}\n--- stderr tail ---\n{self.stderr_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise StartError(f"{self.name} did not answer {self.ready_url} within {timeout_s:g} s ({last_error})\n"
                         f"command: {' '.join(self.argv)}\n--- stderr tail ---\n{self.stderr_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def gym_config(upstream_port: int, gym_port: int, token_ids: bool = False, name: str = "bench_model") -> str:
    """A one-server gym_vllm config in front of the fake upstream (reasoning parser on)."""
    return f"""{name}:
  responses_api_models:
    vllm_model:
      base_url: http://127.0.0.1:{upstream_port}/v1
      api_key: bench
      model: bench
      return_token_id_information: {'true' if token_ids else 'false'}
      uses_reasoning_parser: true
      port: {gym_port}
"""


def upstream_child(workdir: Path, port: int, token_delay_ms: float = 0.0, think_tokens: int = 0) -> Child:
    return Child("fake_upstream", [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port),
                                   "--token-delay-ms", str(token_delay_ms), "--think-tokens", str(think_tokens)],
                 f"http://127.0.0.1:{port}/health", workdir)


def passthrough_child(workdir: Path, port: int, upstream_port: int, profile: str | None = None) -> Child:
    profiler = ["-m", "cProfile", "-o", os.path.abspath(profile)] if profile else []
    return Child("passthrough", [sys.executable, *profiler, str(BENCH / "passthrough.py"), "--port", str(port),
                                 "--upstream", f"http://127.0.0.1:{upstream_port}"],
                 f"http://127.0.0.1:{port}/health", workdir)


def gym_child(workdir: Path, name: str, upstream_port: int, port: int, token_ids: bool = False,
              profile: str | None = None, launcher: str | None = None) -> Child:
    """`python -m gym_vllm` (or `python LAUNCHER`) with a temporary config; under cProfile if `profile`."""
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(gym_config(upstream_port, port, token_ids))
    profiler = ["-m", "cProfile", "-o", os.path.abspath(profile)] if profile else []
    entry = [os.path.abspath(launcher)] if launcher else ["-m", "gym_vllm"]
    return Child(name, [sys.executable, *profiler, *entry, "--config", str(config_path), "--log-level", "WARNING"],
                 f"http://127.0.0.1:{port}/health", workdir)


def start_all(children: Sequence[Child], started: list[Child]) -> None:
    """Starts every child (appending it to `started`, for the caller's cleanup), then waits until each answers."""
    for child in children:
        child.start()
        started.append(child)
    for child in children:
        child.wait_ready()


def stop_all(children: Sequence[Child]) -> None:
    for child in reversed(children):
        child.stop()


# ============================================================================================
# Closed-loop load
# ============================================================================================

S = TypeVar("S")


@dataclasses.dataclass
class Window(Generic[S]):
    """What one closed-loop run saw inside its measurement window."""

    samples: list[S]             # requests that ended inside the window
    span: float                  # seconds
    cpu: dict[str, float]        # CPU seconds of each watched process over the window
    loadgen_cpu: float           # CPU seconds of this (load generator) process
    machine_busy: float          # busy CPU seconds of the whole machine

    @property
    def other_cores(self) -> float:
        """Machine CPU outside the watched processes and the load generator, in cores (kernel, other jobs)."""
        return (self.machine_busy - sum(self.cpu.values()) - self.loadgen_cpu) / self.span


async def closed_loop(one: Callable[[], Awaitable[S]], concurrency: int, warmup_s: float, seconds: float,
                      watch: dict[str, int], end_of: Callable[[S], float] = lambda s: s.end) -> Window[S]:
    """`concurrency` workers call `one()` back to back for `warmup_s + seconds`; `watch` maps names to pids
    whose CPU is read at the window's edges. `end_of(sample)` is the perf_counter when a request ended."""
    samples: list[S] = []
    marks: dict[str, tuple[float, dict[str, float], float, float]] = {}
    begin = time.perf_counter()
    window_start, deadline = begin + warmup_s, begin + warmup_s + seconds

    def mark(name: str) -> None:
        marks[name] = (time.perf_counter(), {key: cpu_seconds(pid) for key, pid in watch.items()},
                       time.process_time(), machine_cpu()[0])

    async def at(when: float, name: str) -> None:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        mark(name)

    async def worker() -> None:
        while time.perf_counter() < deadline:
            samples.append(await one())

    await asyncio.gather(at(window_start, "start"), at(deadline, "end"), *(worker() for _ in range(concurrency)))
    t0, cpu0, me0, busy0 = marks["start"]
    t1, cpu1, me1, busy1 = marks["end"]
    return Window(samples=[s for s in samples if t0 <= end_of(s) <= t1], span=t1 - t0,
                  cpu={key: cpu1[key] - cpu0[key] for key in watch}, loadgen_cpu=me1 - me0, machine_busy=busy1 - busy0)


async def alternating_loop(requests: Sequence[tuple[str, Callable[[], Awaitable[S]]]], concurrency: int, warmup_s: float,
                           seconds: float, watch: dict[str, int], end_of: Callable[[S], float] = lambda s: s.end
                           ) -> Window[tuple[str, S]]:
    """`closed_loop` over several targets, given as (key, request) pairs: the workers send to them in turn, so each
    target's processes are read over the same window as the others' (whatever else the machine does weighs on all
    alike). Samples are (key, sample). It first opens C connections to each target."""
    await asyncio.gather(*(request() for _, request in requests for _ in range(concurrency)))
    turn = itertools.count()

    async def one() -> tuple[str, S]:
        key, request = requests[next(turn) % len(requests)]
        return key, await request()

    return await closed_loop(one, concurrency, warmup_s, seconds, watch, end_of=lambda sample: end_of(sample[1]))


# ============================================================================================
# Reporting helpers
# ============================================================================================


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def print_profile(path: str, limit: int = 30) -> None:
    if not os.path.exists(path):
        print(f"\n(no profile written to {path})")
        return
    print(f"\n## gym_vllm cProfile ({path}), top {limit} by own time\n")
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(limit)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: unwind, stopping the children on the way out."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def running_children(script: str) -> Iterator[tuple[Path, list[Child]]]:
    """A benchmark's work folder and the list its children go into; every child is stopped on the way out.

    SIGTERM is Ctrl-C meanwhile. A child that cannot start exits 1, an interruption 130 (SystemExit),
    each with one line on stderr; a child that crashed gets its stderr tail reported.
    """
    children: list[Child] = []
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    start_error: StartError | None = None
    with tempfile.TemporaryDirectory(prefix="gym_vllm_bench_") as tmp:
        try:
            yield Path(tmp), children
        except StartError as exc:
            start_error = exc
            print(f"{script}: error: {exc}", file=sys.stderr)  # carries the child's stderr tail already
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print(f"{script}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            stop_all(children)
            signal.signal(signal.SIGTERM, previous_sigterm)
            for child in children if start_error is None else ():
                if child.process is not None and child.process.returncode not in (0, -signal.SIGTERM):
                    progress(f"NOTE: {child.name} ended with code {child.process.returncode}; "
                             f"stderr tail:\n{child.stderr_tail(10)}")
