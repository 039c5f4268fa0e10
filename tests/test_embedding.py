"""The embedding API: host the proxy inside your own event loop in a few lines."""

import aiohttp

import gym_vllm
from conftest import server_config, strict_client


async def test_start_server_in_my_loop(fake_upstreams):
    [(fake, url)] = await fake_upstreams(1)
    runner = await gym_vllm.start_server(server_config(url), port=0)  # port 0: any free port
    try:
        host, port = runner.addresses[0][:2]
        response = await strict_client(f"http://{host}:{port}/v1").responses.create(model="tiny", input="hi")
        assert response.output_text == "Hello from stub" and len(fake.requests) == 1
    finally:
        await runner.cleanup()
    try:
        async with aiohttp.ClientSession() as http:
            await http.get(f"http://{host}:{port}/health")
        raise AssertionError("the server still answers after cleanup")
    except aiohttp.ClientConnectionError:
        pass


def test_config_from_a_dict_and_build_app():
    config = gym_vllm.server_config_from_dict("judge", {
        "base_url": ["http://a:1/v1", "http://b:2/v1"], "api_key": "k", "model": "judge-model",
        "return_token_id_information": False, "uses_reasoning_parser": False, "port": 0})
    app = gym_vllm.build_app(config)
    assert app[gym_vllm.CONFIG_KEY] is config
    assert [u.base_url for u in app[gym_vllm.BALANCER_KEY].upstreams] == ["http://a:1/v1", "http://b:2/v1"]


async def test_serve_runs_several_servers_each_on_its_port(fake_upstreams):
    import asyncio
    import dataclasses

    import tiny_engine

    [(policy_fake, policy_url), (judge_fake, judge_url)] = await fake_upstreams(2)
    ports = [tiny_engine.free_port(), tiny_engine.free_port()]
    policy = dataclasses.replace(server_config(policy_url), port=ports[0])
    judge = dataclasses.replace(server_config(judge_url), name="judge_model", model="judge", port=ports[1])
    task = asyncio.create_task(gym_vllm.serve([policy, judge]))
    try:
        for attempt in range(100):
            try:
                answers = [await strict_client(f"http://127.0.0.1:{port}/v1").responses.create(model="x", input="hi")
                           for port in ports]
                break
            except Exception:
                await asyncio.sleep(0.05)
        assert [a.model for a in answers] == ["tiny", "judge"]
        assert len(policy_fake.requests) == len(judge_fake.requests) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
