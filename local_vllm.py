"""local_vllm: spawn and supervise `vllm serve`, and serve gym_vllm in front of it.

Not built yet (tracked as its own issue). Until then, start vLLM yourself and point
`python -m gym_vllm --config configs/vllm_model.yaml` at it, or use `bash .ci/run serve`
for the embedded tiny-model demo.
"""

import sys


def main() -> int:
    print("local_vllm: error: the supervisor is not built yet; start `vllm serve` yourself and run "
          "`python -m gym_vllm --config configs/vllm_model.yaml` (see README)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
