"""`--workers N`: several processes share the port, and session affinity holds whichever worker answers."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

import gym_vllm
import tiny_engine

REPO = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


async def scrape(port: int) -> dict:
    """/metrics of whichever worker the kernel picks (a new connection each time), parsed by Prometheus' parser."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as answer:
            return {f.name: f for f in text_string_to_metric_families(await answer.text())}


async def test_workers_share_the_port_and_keep_sessions_on_one_upstream(fake_upstreams, tmp_path):
    upstreams = await fake_upstreams(3)
    config = tmp_path / "workers.yaml"
    config.write_text("policy_model:\n  responses_api_models:\n    vllm_model:\n"
                      f"      base_url: {','.join(url for _, url in upstreams)}\n      api_key: k\n      model: m\n"
                      "      return_token_id_information: false\n      uses_reasoning_parser: true\n")
    port = tiny_engine.free_port()
    parent = subprocess.Popen([sys.executable, "-m", "gym_vllm", "--config", str(config), "--port", str(port), "--workers", "2"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{port}/health") as answer:
                        if answer.status == 200:
                            break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        workers = {str(pid) for pid in children_of(parent.pid)}
        assert len(workers) == 2
        for _ in range(100):  # both listening (each shows in /metrics once it runs), so the kernel can spread requests
            if {s.labels["worker"] for s in (await scrape(port))["process_cpu_seconds"].samples} == workers:
                break
            await asyncio.sleep(0.15)
        sessions = [f"session-{i}" for i in range(12)]
        for _ in range(4):  # every request on a new connection: the kernel spreads them over the workers
            for session in sessions:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.post(f"http://127.0.0.1:{port}/v1/responses", json={"input": session},
                                         headers={"X-Session-ID": session}) as answer:
                        assert answer.status == 200
        homes = {session: {i for i, (fake, _) in enumerate(upstreams)
                           if any(r["messages"][-1]["content"] == session for r in fake.requests)} for session in sessions}
        assert all(len(home) == 1 for home in homes.values()), homes  # one upstream per session, across workers
        assert len({next(iter(home)) for home in homes.values()}) > 1  # and sessions are spread over upstreams
        await asyncio.sleep(1.5)  # each worker writes its figures for the others every second
        for _ in range(6):  # whichever worker answers the scrape, it shows all of them, summing to every request
            families = await scrape(port)
            served = [s for s in families["gym_vllm_requests"].samples
                      if s.name == "gym_vllm_requests_total" and s.labels["endpoint"] == "/v1/responses"]
            assert {s.labels["worker"] for s in families["process_cpu_seconds"].samples} == workers
            assert {s.labels["worker"] for s in served} == workers  # 48 new connections over two listeners
            assert sum(s.value for s in served) == len(sessions) * 4
        # A worker that dies takes its figures with it; its replacement writes its own.
        cmdline = Path(f"/proc/{min(workers)}/cmdline").read_text().split("\0")
        metrics_dir = Path(cmdline[cmdline.index("--worker-metrics-dir") + 1])
        assert sorted(p.name for p in metrics_dir.iterdir()) == sorted(f"policy_model.{pid}.json" for pid in workers)
        os.kill(int(min(workers)), signal.SIGKILL)
        for _ in range(100):
            now = {str(pid) for pid in children_of(parent.pid)}
            if len(now) == 2 and min(workers) not in now and len(list(metrics_dir.glob("*.json"))) == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(p.name for p in metrics_dir.glob("*.json")) == sorted(f"policy_model.{pid}.json" for pid in now)
    finally:
        parent.send_signal(signal.SIGTERM)
        _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 0 and "started 2 workers" in stderr and "Traceback" not in stderr
    assert children_of(parent.pid) == []


def test_deterministic_affinity_skips_unusable_upstreams():
    balancer = gym_vllm.Balancer(["http://a/v1", "http://b/v1", "http://c/v1"], gym_vllm.SessionTable(10, 100), deterministic=True)
    other = gym_vllm.Balancer(["http://a/v1", "http://b/v1", "http://c/v1"], gym_vllm.SessionTable(10, 100), deterministic=True)
    picks = {f"s{i}": balancer.upstream_for(f"s{i}").base_url for i in range(30)}
    assert picks == {s: other.upstream_for(s).base_url for s in picks}  # no shared state needed
    assert len(set(picks.values())) == 3
    down = balancer.upstreams[0]
    down.healthy = False
    moved = {s: balancer.upstream_for(s).base_url for s in picks}
    assert all(moved[s] == picks[s] for s in picks if picks[s] != down.base_url)  # only its sessions move
    assert all(moved[s] != down.base_url for s in picks)
