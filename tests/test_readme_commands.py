"""The README's commands, run as a newcomer would: `bash .ci/run serve` brings up vLLM + gym_vllm via local_vllm.

(`bash .ci/run` itself is what runs this suite.)
"""

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import tiny_engine
from conftest import strict_client

REPO = Path(__file__).resolve().parent.parent


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
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:  # the README's monitoring
            metrics = answer.read().decode()
        assert 'gym_vllm_requests_total{server="policy_model",endpoint="/v1/responses",status="200"} 1' in metrics
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
