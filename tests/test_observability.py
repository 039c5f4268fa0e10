"""Operations: /metrics (Prometheus text format), request ids end to end, JSON and access logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gym_vllm
from conftest import REPO, assert_openai_error, server_config
import tiny_engine


async def scrape(base_url: str, **headers) -> dict:
    """/metrics parsed by Prometheus' own parser: {(sample name, frozenset(labels)): value}."""
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url.removesuffix("/v1") + "/metrics", headers=headers) as answer:
            assert answer.status == 200, await answer.text()
            assert answer.content_type == "text/plain"
            text = await answer.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    wanted = {"server": "policy_model", **{k: str(v) for k, v in labels.items()}}
    matches = [v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in wanted.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


async def post(base_url: str, path: str, body: dict, **headers) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + path, json=body, headers=headers) as answer:
            return answer.status, await answer.json(content_type=None), answer.headers


async def test_metrics_count_requests_statuses_latency_and_overflows(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    for _ in range(3):
        assert (await post(base, "/responses", {"input": "hi"}))[0] == 200
    assert (await post(base, "/responses", {"input": "ctx"}))[0] == 200  # overflow -> an empty incomplete reply
    assert (await post(base, "/responses", {"input": "bad400"}))[0] == 400
    assert (await post(base, "/chat/completions", {"messages": [{"role": "user", "content": "fail500"}]}))[0] == 502
    assert (await post(base, "/responses", {"input": 5}))[0] == 400  # rejected before any upstream call
    samples = await scrape(base)
    assert value(samples, "gym_vllm_requests_total", endpoint="/v1/responses", status=200) == 4
    assert value(samples, "gym_vllm_requests_total", endpoint="/v1/responses", status=400) == 2
    assert value(samples, "gym_vllm_requests_total", endpoint="/v1/chat/completions", status=502) == 1
    assert value(samples, "gym_vllm_request_duration_seconds_count", endpoint="/v1/responses") == 6
    assert value(samples, "gym_vllm_request_duration_seconds_bucket", endpoint="/v1/responses", le="+Inf") == 6
    assert value(samples, "gym_vllm_request_duration_seconds_sum", endpoint="/v1/responses") > 0
    # Every request that reached vLLM is timed against its upstream, the rejected one is not.
    assert value(samples, "gym_vllm_upstream_duration_seconds_count", upstream=url) == 6
    assert value(samples, "gym_vllm_upstream_requests_total", upstream=url) == 6 == len(fake.requests)
    assert value(samples, "gym_vllm_context_overflows_total") == 1
    assert value(samples, "gym_vllm_requests_in_flight", endpoint="/v1/responses") == 0
    assert value(samples, "gym_vllm_upstream_healthy", upstream=url) == 1
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_resident_memory_bytes") > 10_000_000


async def test_metrics_show_in_flight_requests_while_they_run(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    fake.delay = 1.0
    base = await proxy(server_config(url))
    pending = asyncio.create_task(post(base, "/responses", {"input": "hi"}))
    await asyncio.sleep(0.3)
    assert value(await scrape(base), "gym_vllm_requests_in_flight", endpoint="/v1/responses") == 1
    assert (await pending)[0] == 200
    assert value(await scrape(base), "gym_vllm_requests_in_flight", endpoint="/v1/responses") == 0


async def test_metrics_count_every_sse_event_sent(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    received = {}
    async with aiohttp.ClientSession() as http:
        for path, body in (("/responses", {"input": "hi", "stream": True}),
                           ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})):
            async with http.post(base + path, json=body) as answer:
                text = await answer.text()
            received[path] = text.count("data: ")
    samples = await scrape(base)
    assert received["/responses"] > 5 and received["/chat/completions"] > 5
    assert value(samples, "gym_vllm_stream_events_total", endpoint="/v1/responses") == received["/responses"]
    assert value(samples, "gym_vllm_stream_events_total", endpoint="/v1/chat/completions") == received["/chat/completions"]
    assert value(samples, "gym_vllm_upstream_duration_seconds_count", upstream=url) == 2


async def test_metrics_show_failover_ejection_and_sessions(fake_upstreams, proxy):
    (bad, bad_url), (_, good_url) = await fake_upstreams(2)
    bad.refuse = True
    base = await proxy(server_config([bad_url, good_url], eject_after_failures=1, health_check_interval_s=None))
    for i in range(4):
        status, _, _ = await post(base, "/responses", {"input": "hi"}, **{"X-Session-ID": f"s{i}"})
        assert status == 200
    samples = await scrape(base)
    assert value(samples, "gym_vllm_failovers_total") >= 1
    assert value(samples, "gym_vllm_upstream_ejections_total", upstream=bad_url) == 1
    assert value(samples, "gym_vllm_upstream_healthy", upstream=bad_url) == 0
    assert value(samples, "gym_vllm_upstream_healthy", upstream=good_url) == 1
    assert value(samples, "gym_vllm_sessions") == 4
    assert value(samples, "gym_vllm_engine_restarts_total", upstream=good_url) == 0


async def test_metrics_need_the_server_key_when_one_is_set(fake_upstreams, proxy):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url, server_api_key="client-key"))
    async with aiohttp.ClientSession() as http:
        async with http.get(base.removesuffix("/v1") + "/metrics") as answer:
            assert answer.status == 401
    assert value(await scrape(base, Authorization="Bearer client-key"), "gym_vllm_requests_total", endpoint="/metrics", status=401) == 1


def test_label_values_are_escaped_for_prometheus():
    metrics = gym_vllm.Metrics('odd "name"\\\n')
    metrics.requests["/v1/responses", 200] += 2
    balancer = gym_vllm.Balancer(["http://h:1/v1"], gym_vllm.SessionTable(10, 60))
    [family] = [f for f in text_string_to_metric_families(gym_vllm.render_families(metrics.families(balancer)))
                if f.name == "gym_vllm_requests"]
    assert family.samples[0].labels["server"] == 'odd "name"\\\n'
    assert family.samples[0].value == 2


def test_histogram_buckets_are_cumulative_and_bounded():
    metrics = gym_vllm.Metrics("m")
    for seconds in (0.001, 0.007, 0.3, 5000):
        metrics.request_seconds["/v1/responses"].observe(seconds)
    balancer = gym_vllm.Balancer(["http://h:1/v1"], gym_vllm.SessionTable(10, 60))
    text = gym_vllm.render_families(metrics.families(balancer))
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "gym_vllm_request_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.005"] == 1 and buckets["0.01"] == 2 and buckets["0.5"] == 3 and buckets["600"] == 3 and buckets["+Inf"] == 4
    assert list(buckets.values()) == sorted(buckets.values())


# --- request ids ------------------------------------------------------------------------------------


async def test_request_id_is_kept_sent_to_vllm_and_returned(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    status, _, headers = await post(base, "/responses", {"input": "hi"}, **{"X-Request-Id": "rollout-17.a"})
    assert status == 200 and headers["X-Request-Id"] == "rollout-17.a" and fake.request_ids[-1] == "rollout-17.a"
    # None given, or one unsafe for logs: the proxy makes one, and vLLM gets the same.
    for supplied in ({}, {"X-Request-Id": "has space"}, {"X-Request-Id": "x" * 200}):
        status, _, headers = await post(base, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, **supplied)
        assert status == 200 and len(headers["X-Request-Id"]) == 16 and fake.request_ids[-1] == headers["X-Request-Id"]
    # Streams carry it too (sent with the headers, before the first event), and errors.
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", json={"input": "hi", "stream": True}, headers={"X-Request-Id": "s-1"}) as answer:
            assert answer.headers["X-Request-Id"] == "s-1"
            await answer.read()
    status, body, headers = await post(base, "/responses", {"input": 3}, **{"X-Request-Id": "bad-1"})
    assert status == 400 and headers["X-Request-Id"] == "bad-1"
    assert fake.request_ids[-1] == "s-1"


# --- logs ---------------------------------------------------------------------------------------


def test_json_logs_and_access_log_from_the_cli(tmp_path):
    """`--log-format json --access-log`: every stderr line is one JSON object; one access line per request with its id."""
    from test_reliability import start_upstream  # bench/fake_upstream.py in its own process
    upstream_port, port = tiny_engine.free_port(), tiny_engine.free_port()
    upstream = start_upstream(upstream_port)
    config = tmp_path / "c.yaml"
    config.write_text(f"policy_model:\n  responses_api_models:\n    vllm_model:\n      base_url: http://127.0.0.1:{upstream_port}/v1\n"
                      "      api_key: k\n      model: m\n      return_token_id_information: false\n      uses_reasoning_parser: true\n")
    process = subprocess.Popen([sys.executable, "-m", "gym_vllm", "--config", str(config), "--port", str(port),
                                "--log-format", "json", "--access-log"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        async def requests() -> None:
            for _ in range(150):
                try:
                    await post(f"http://127.0.0.1:{port}/v1", "/models", {})
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.2)
            await post(f"http://127.0.0.1:{port}/v1", "/responses", {"input": "hi"}, **{"X-Request-Id": "trace-42"})
            await post(f"http://127.0.0.1:{port}/v1", "/responses", {"input": []})

        asyncio.run(requests())
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
        upstream.terminate()
        upstream.wait(timeout=10)
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "gym_vllm.access"]
    assert any("POST /v1/responses 200" in e["message"] and "request trace-42" in e["message"] for e in access), access
    assert any("POST /v1/responses 400" in e["message"] for e in access), access
    assert any("POST /v1/models 405" in e["message"] for e in access)
    assert any("listening on" in e["message"] for e in entries)


def test_access_log_is_off_by_default():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        gym_vllm.configure_logging("DEBUG", "text", access=False)
        assert not gym_vllm.access_log.isEnabledFor(logging.INFO)
        gym_vllm.configure_logging("WARNING", "json", access=True)
        assert gym_vllm.access_log.isEnabledFor(logging.INFO)
        assert isinstance(root.handlers[0].formatter, gym_vllm.JsonLogFormatter)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        gym_vllm.access_log.setLevel(logging.NOTSET)


# --- what the metrics say when things go wrong ------------------------------------------------------


async def test_clients_that_leave_are_counted_as_499(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    received = 0
    async with aiohttp.ClientSession() as http:  # a stream the client leaves after its first token
        async with http.post(base + "/responses", json={"input": "slow", "stream": True}) as answer:
            async for line in answer.content:
                received += line.startswith(b"data: ")
                if b"output_text.delta" in line:
                    break
    fake.delay = 1.0
    async with aiohttp.ClientSession() as http:  # a plain request the client gives up on while vLLM works
        with pytest.raises(asyncio.TimeoutError):
            async with http.post(base + "/responses", json={"input": "hi"}, timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
    for _ in range(50):
        samples = await scrape(base)
        if sum(v for (n, ls), v in samples.items() if n == "gym_vllm_requests_total" and ("status", "499") in ls) == 2:
            break
        await asyncio.sleep(0.1)
    assert value(samples, "gym_vllm_requests_total", endpoint="/v1/responses", status=499) == 2
    assert not [k for k in samples if k[0] == "gym_vllm_requests_total" and ("status", "200") in k[1]
                and ("endpoint", "/v1/responses") in k[1]]
    # Only what was written counts: at most what the client read plus the batch in flight when it left.
    sent = value(samples, "gym_vllm_stream_events_total", endpoint="/v1/responses")
    assert received <= sent < received + 10


@pytest.mark.parametrize("path, body, events", [
    ("/chat/completions", {"messages": [{"role": "user", "content": "error_mid"}], "stream": True}, "chat"),
    ("/responses", {"input": "error_mid", "stream": True}, "responses")])
async def test_events_of_a_failed_stream_are_counted_as_sent(fake_upstreams, proxy, path, body, events):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    async with aiohttp.ClientSession() as http:
        async with http.post(base + path, json=body) as answer:
            text = await answer.text()
    assert ("response.failed" in text) if events == "responses" else ('"error"' in text and text.endswith("data: [DONE]\n\n"))
    assert value(await scrape(base), "gym_vllm_stream_events_total", endpoint="/v1" + path) == text.count("\n\n")


async def test_upstream_time_includes_failures_and_refusals(fake_upstreams, proxy):
    (refusing, refusing_url), (_, url) = await fake_upstreams(2)
    refusing.refuse = True
    base = await proxy(server_config([refusing_url, url], request_timeout_s=0.5, health_check_interval_s=None, eject_after_failures=5))
    assert (await post(base, "/responses", {"input": "hang"}, **{"X-Session-ID": "a"}))[0] == 504  # vLLM too slow
    assert (await post(base, "/responses", {"input": "hi"}, **{"X-Session-ID": "b"}))[0] == 200
    samples = await scrape(base)
    assert value(samples, "gym_vllm_upstream_duration_seconds_count", upstream=url) == 2  # the timeout is timed too
    assert value(samples, "gym_vllm_upstream_duration_seconds_sum", upstream=url) >= 0.5
    refusals = value(samples, "gym_vllm_upstream_duration_seconds_count", upstream=refusing_url)  # each 503 answer
    assert refusals >= 1 and refusals == value(samples, "gym_vllm_failovers_total") == len(refusing.requests)


@pytest.mark.parametrize("method, path, headers, status", [("GET", "/nowhere", {}, 404), ("GET", "/v1/responses", {}, 405),
                                                            ("POST", "/v1/responses", {"Authorization": "Bearer wrong"}, 401)])
async def test_every_answer_carries_the_request_id(fake_upstreams, proxy, method, path, headers, status):
    [(_, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url, server_api_key="right") if status == 401 else server_config(url))
    async with aiohttp.ClientSession() as http:
        async with http.request(method, base.removesuffix("/v1") + path, json={"input": "x"},
                                headers={"X-Request-Id": "r-1", **headers}) as answer:
            assert answer.status == status and answer.headers["X-Request-Id"] == "r-1"
            assert_openai_error(status, await answer.text())


async def test_json_nested_too_deeply_is_a_400(fake_upstreams, proxy):
    [(fake, url)] = await fake_upstreams(1)
    base = await proxy(server_config(url))
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/responses", data=b"[" * 100_000 + b"]" * 100_000,
                             headers={"Content-Type": "application/json"}) as answer:
            assert answer.status == 400
            assert "nested too deeply" in assert_openai_error(400, await answer.text())["message"]
    assert fake.requests == []


def test_worker_snapshots_are_the_other_workers_files_of_this_server(tmp_path):
    own, other = os.getpid(), os.getpid() + 1
    families = [["gym_vllm_sessions", "gauge", "h", ['gym_vllm_sessions{server="a b"} 1']]]
    for server, pid in (("a b", own), ("a b", other), ("other", other)):
        (tmp_path / gym_vllm._metrics_file_name(server, pid)).write_text(json.dumps(families))
    (tmp_path / (gym_vllm._metrics_file_name("a b", other + 1) + ".tmp")).write_text("{")  # being written: not read
    (tmp_path / gym_vllm._metrics_file_name("a b", other + 2)).write_text("[")  # torn: skipped until the next scrape
    assert gym_vllm._metrics_file_name("a b", other) == f"a_b.{other}.json"
    assert gym_vllm._read_worker_snapshots(str(tmp_path), "a b") == [families]
