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
