"""Config loading, interpolation and the CLI's one-line errors."""

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gym_vllm
import local_vllm
from gym_vllm import ConfigError

REPO = Path(__file__).resolve().parent.parent
SERVER = """\
policy_model:
  responses_api_models:
    vllm_model:
{body}
"""
REQUIRED = """\
      base_url: http://127.0.0.1:8000/v1
      api_key: k
      model: m
      return_token_id_information: false
      uses_reasoning_parser: true
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def server(tmp_path, body=REQUIRED, name="config.yaml"):
    return write(tmp_path, SERVER.format(body=body.rstrip("\n")), name)


def test_shipped_configs_load_with_the_example_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    env = str(REPO / "configs" / "env.example.yaml")
    [policy] = gym_vllm.load_config([str(REPO / "configs" / "vllm_model.yaml")], env)
    assert (policy.name, policy.base_url, policy.api_key, policy.model) == ("policy_model", ("http://127.0.0.1:8000/v1",), "from-env", "Qwen/Qwen3-4B")
    assert policy.uses_reasoning_parser and not policy.return_token_id_information and policy.port == 8080
    [training] = gym_vllm.load_config([str(REPO / "configs" / "vllm_model_for_training.yaml")], env)
    assert training.return_token_id_information
    both = gym_vllm.load_config([f"{REPO}/configs/vllm_model.yaml,{REPO}/configs/vllm_judge_model.yaml"], env)
    assert [(c.name, c.port) for c in both] == [("policy_model", 8080), ("judge_model", 8081)]
    assert both[1].api_key == "EMPTY"  # JUDGE_API_KEY is unset: the ${oc.env:...,EMPTY} default


def test_defaults_and_types(tmp_path):
    [config] = gym_vllm.load_config([server(tmp_path)])
    assert config.replace_developer_role_with_system is False and config.chat_template_kwargs is None
    assert config.extra_body is None and config.propagate_context_overflow_errors is False
    assert (config.host, config.port, config.request_timeout_s) == ("127.0.0.1", 8080, 3600.0)
    assert "api_key='k'" not in repr(config) and "api_key=***" in repr(config)


@pytest.mark.parametrize("value, urls", [
    ("http://a:1/v1", ("http://a:1/v1",)),
    ("http://a:1/v1/, http://b:2/v1", ("http://a:1/v1", "http://b:2/v1")),
    ("[http://a:1/v1, http://b:2/v1]", ("http://a:1/v1", "http://b:2/v1")),
])
def test_base_url_forms(tmp_path, value, urls):
    body = REQUIRED.replace("base_url: http://127.0.0.1:8000/v1", f"base_url: {value}")
    assert gym_vllm.load_config([server(tmp_path, body)])[0].base_url == urls


def test_interpolation_from_env_file_environment_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GV_KEY", "secret")
    monkeypatch.delenv("GV_UNSET", raising=False)
    write(tmp_path, "urls: [http://a/v1, http://b/v1]\nhost_part: myhost\nnested: {name: deep}\n", "env.yaml")  # read by default
    config_path = write(tmp_path, """\
        model_var: from-config
        policy_model:
          responses_api_models:
            vllm_model:
              base_url: ${urls}
              api_key: ${oc.env:GV_KEY}
              model: ${model_var}-${nested.name}
              return_token_id_information: false
              uses_reasoning_parser: true
              host: ${oc.env:GV_UNSET,127.0.0.2}
              chat_template_kwargs: {greeting: "hi ${host_part}"}
        """)
    [config] = gym_vllm.load_config([config_path])
    assert config.base_url == ("http://a/v1", "http://b/v1")  # a whole ${...} keeps its list type
    assert (config.api_key, config.model, config.host) == ("secret", "from-config-deep", "127.0.0.2")
    assert config.chat_template_kwargs == {"greeting": "hi myhost"}


def test_later_files_win_and_merge(tmp_path):
    first = server(tmp_path)
    second = write(tmp_path, "policy_model:\n  responses_api_models:\n    vllm_model:\n      model: other\n      port: 9000\n", "b.yaml")
    [config] = gym_vllm.load_config([first, second])
    assert (config.model, config.port, config.api_key) == ("other", 9000, "k")


@pytest.mark.parametrize("body, fragment", [
    (REQUIRED + "      modle_name: x\n", "vllm_model.modle_name: unknown key (did you mean `model`?)"),
    (REQUIRED + "      return_token_ids_information: true\n", "did you mean `return_token_id_information`?"),
    (REQUIRED.replace("      api_key: k\n", ""), "vllm_model.api_key: required key is missing"),
    (REQUIRED.replace("false", "'no'"), "return_token_id_information: expected true or false, got 'no'"),
    (REQUIRED + "      port: true\n", "port: expected an integer, got True"),
    (REQUIRED + "      port: 70000\n", "port: must be between 0 and 65535"),
    (REQUIRED + "      request_timeout_s: -1\n", "request_timeout_s: must be positive"),
    (REQUIRED + "      chat_template_kwargs: [1]\n", "chat_template_kwargs: expected a mapping or null"),
    (REQUIRED + "      server_api_key: ''\n", "server_api_key: must not be empty"),
    (REQUIRED + "      max_attempts: 0\n", "max_attempts: must be at least 1"),
    (REQUIRED + "      max_concurrent_requests_per_upstream: -1\n", "must be 0 (no limit) or more"),
    (REQUIRED + "      health_check_interval_s: 0\n", "health_check_interval_s: must be positive"),
    (REQUIRED.replace("http://127.0.0.1:8000/v1", "127.0.0.1:8000"), "must start with http:// or https://"),
    (REQUIRED.replace("http://127.0.0.1:8000/v1", "' , '"), "base_url is empty"),
    (REQUIRED.replace("m\n", "${missing_var}\n"), "vllm_model.model: variable ${missing_var} is not defined"),
    (REQUIRED.replace("api_key: k", "api_key: ${oc.env:GV_SURELY_UNSET}"), "environment variable GV_SURELY_UNSET is not set"),
    # what YAML reads as no JSON value: every request failed (a 500 with json, a date sent as a string with msgspec)
    (REQUIRED + "      extra_body: {since: 2024-01-01}\n", "`extra_body.since` is a date (datetime.date(2024, 1, 1)), which JSON cannot"),
    (REQUIRED + "      extra_body: {structured_outputs: {on: 1}}\n", "`extra_body.structured_outputs` has the key True, which is not a string"),
    (REQUIRED + "      chat_template_kwargs: {budget: .inf}\n", "`chat_template_kwargs.budget` is inf, which JSON cannot carry"),
    (REQUIRED + "      chat_template_kwargs: {tags: [a, !!binary YQ==]}\n", "`chat_template_kwargs.tags[1]` is a bytes"),
    # no HTTP header carries them: every request was a 500
    (REQUIRED.replace("api_key: k", 'api_key: "k\\n"'), "api_key: holds a control character"),
    (REQUIRED + '      server_api_key: "s\\te"\n', "server_api_key: holds a control character"),
])
def test_config_errors_name_file_and_key(tmp_path, body, fragment):
    path = server(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        gym_vllm.load_config([path])
    assert fragment in str(info.value) and re.match(rf"{re.escape(path)}:\d+: policy_model\.", str(info.value)), str(info.value)


def test_config_errors_point_at_the_line_of_the_key(tmp_path):
    def error(*paths):
        with pytest.raises(ConfigError) as info:
            gym_vllm.load_config(list(paths))
        return str(info.value)

    path = server(tmp_path, REQUIRED + "      modle: x\n")  # line 9: after the server, its kind and five keys
    assert error(path) == f"{path}:9: policy_model.responses_api_models.vllm_model.modle: unknown key (did you mean `model`?)"
    path = server(tmp_path, REQUIRED.replace("      api_key: k\n", ""))  # a missing key: the line of its block
    assert error(path).startswith(f"{path}:3: policy_model.responses_api_models.vllm_model.api_key: required key is missing")
    path = server(tmp_path, REQUIRED.replace("http://127.0.0.1:8000/v1", "[http://a/v1, b]"))
    assert error(path).startswith(f"{path}:4: policy_model.responses_api_models.vllm_model.base_url: base_url 'b' must start")
    path = server(tmp_path, REQUIRED + "      extra_body:\n        seed: 1\n        stop: [a, '${nope}']\n")
    assert error(path).startswith(f"{path}:11: policy_model.responses_api_models.vllm_model.extra_body.stop[1]: variable ${{nope}}")
    path = server(tmp_path, REQUIRED + "      extra_body:\n        seed: 1\n        stream: true\n")  # the proxy's field
    assert error(path) == (f"{path}:9: policy_model.responses_api_models.vllm_model.extra_body: must not set stream: the "
                           f"proxy sets them per request")
    path = server(tmp_path, REQUIRED + "      extra_body:\n        chat_template_kwargs: [enable_thinking]\n")
    assert "extra_body: `chat_template_kwargs` must be a mapping" in error(path)
    first = server(tmp_path)  # a key from a later file is reported at its line in that file
    second = write(tmp_path, "# override\npolicy_model:\n  responses_api_models:\n    vllm_model:\n      port: -1\n", "b.yaml")
    assert error(first, second).startswith(f"{second}:5: policy_model.responses_api_models.vllm_model.port: must be between")
    assert error(write(tmp_path, "policy_model:\n  responses_api_models:\n    vllm_modle: {}\n")).startswith(
        f"{tmp_path}/config.yaml:3: policy_model.responses_api_models.vllm_modle: unknown server type (did you mean `vllm_model`?)")
    assert error(write(tmp_path, "a: 1\nb: [unclosed\n")).startswith(f"{tmp_path}/config.yaml:3: invalid YAML")


def test_config_errors_from_python_name_the_source_without_a_line():
    with pytest.raises(ConfigError) as info:
        gym_vllm.server_config_from_dict("p", {"base_url": "http://a/v1", "api_key": "k", "model": "m",
                                               "return_token_id_information": False, "uses_reasoning_parser": True, "prot": 1})
    assert str(info.value) == "<python>: p.responses_api_models.vllm_model.prot: unknown key (did you mean `port`?)"


@pytest.mark.parametrize("text, fragment", [
    ("policy_model: {responses_api_models: {local_vllm_model: {}}}", "python -m local_vllm"),
    ("policy_model: {responses_api_models: {vllm_modle: {}}}", "unknown server type (did you mean `vllm_model`?)"),
    ("policy_model: {responses_api_model: {}}", "policy_model.responses_api_model: unknown key (did you mean `responses_api_models`?)"),
    ("just: a scalar", "no model server found"),
    ("- a list", "must be a mapping"),
    ("a: [unclosed", "invalid YAML"),
])
def test_shape_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        gym_vllm.load_config([write(tmp_path, text)])
    assert fragment in str(info.value)


def test_two_servers_on_one_port_is_an_error(tmp_path):
    first = server(tmp_path)
    second = server(tmp_path, name="b.yaml")
    Path(second).write_text(Path(second).read_text().replace("policy_model", "judge_model"))
    with pytest.raises(ConfigError) as info:
        gym_vllm.load_config([first, second])
    assert "both listen on 127.0.0.1:8080; give each server its own `port`" in str(info.value)


def test_other_nemo_gym_blocks_are_skipped(tmp_path):
    path = write(tmp_path, SERVER.format(body=REQUIRED.rstrip("\n")) + "math:\n  resources_servers:\n    math: {}\n")
    assert [c.name for c in gym_vllm.load_config([path])] == ["policy_model"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gym_vllm", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("make_args, fragment", [
    (lambda p: ["--config", str(p / "missing.yaml")], "missing.yaml: config file not found"),
    (lambda p: ["--config", server(p, REQUIRED + "      modle: x\n")], "unknown key (did you mean `model`?)"),
    (lambda p: ["--config", write(p, "x: [1")], "invalid YAML"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, make_args, fragment):
    result = run_cli(*make_args(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gym_vllm: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_port_flag_needs_a_single_server(tmp_path):
    first = server(tmp_path)
    second = server(tmp_path, REQUIRED + "      port: 8090\n", "b.yaml")
    Path(second).write_text(Path(second).read_text().replace("policy_model", "judge_model"))
    result = run_cli("--config", first, "--config", second, "--port", "1234")
    assert result.returncode == 2 and "--host/--port apply to a single server" in result.stderr


def test_cli_port_in_use_is_a_clean_error(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("--config", server(tmp_path), "--port", str(busy.getsockname()[1]))
    assert result.returncode == 1 and "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    import signal
    import socket
    import time
    import urllib.request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "gym_vllm", "--config", server(tmp_path), "--port", str(port)],
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and "listening on" in stderr and "Traceback" not in stderr


# --- the key tables: one source (SERVER_KEYS, local_vllm.ENGINE_KEYS) for --help and README.md -------


def markdown_rows(rows):
    return [f"| `{key}` | {type_text} | {default if default == 'required' else f'`{default}`'} | {meaning} |"
            for key, type_text, default, meaning in rows]


@pytest.mark.parametrize("section, rows", [
    ("## Configuration", gym_vllm.config_key_rows(gym_vllm.SERVER_KEYS.values(), gym_vllm.ServerConfig)),
    ("## Run vLLM and the proxy together", gym_vllm.config_key_rows(local_vllm.ENGINE_KEYS.values(), local_vllm.EngineConfig)),
], ids=["vllm_model", "local_vllm_model"])
def test_readme_key_tables_match_the_code(section, rows):
    text = (REPO / "README.md").read_text().split(section, 1)[1].split("\n## ", 1)[0]
    table = [line for line in text.splitlines() if line.startswith("| `")]
    cells = [[cell.strip() for cell in line.strip("| ").split(" | ", 3)] for line in table]
    expected = [[cell.strip() for cell in line.strip("| ").split(" | ", 3)] for line in markdown_rows(rows)]
    paste = "\n".join(["| key | type | default | meaning |", "|---|---|---|---|", *markdown_rows(rows)])
    assert [c[:3] for c in cells] == [e[:3] for e in expected], f"README.md {section}: keys, types or defaults differ; use:\n{paste}"
    assert cells == expected, f"README.md {section}: meanings differ; use:\n{paste}"


def test_cli_help_documents_every_key_and_version():
    help_text = run_cli("--help").stdout
    for group in ("Config:", "Server:", "Processes:", "Logging:", "vllm_model keys:"):
        assert f"\n{group}\n" in help_text
    for key, type_text, default, _ in gym_vllm.config_key_rows(gym_vllm.SERVER_KEYS.values(), gym_vllm.ServerConfig):
        assert f"\n  {key}: {type_text}\n" in help_text
    assert "(default: 100000)" in help_text and "(required)" in help_text
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"gym_vllm {gym_vllm.__version__}"
    assert gym_vllm.__version__ == importlib.metadata.version("gym-vllm")
