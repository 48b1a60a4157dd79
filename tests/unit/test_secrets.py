"""No secret reaches a terminal: every way a configuration holding an API key or the OpenAI key can
fail is run through the real CLI in a process of its own, and everything it prints (stdout, stderr,
tracebacks, log lines) is searched for the secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "Zq8-SECRET-4242-do-not-print"
SHORT = "SECRET-x1"  # too short to be a key: its own error must not print it either
KEY = {"key": SECRET, "scopes": ["read", "write"]}


def run_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RIVERBED_")}
    clean["RIVERBED_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def yaml_keys(*keys: dict) -> str:
    return "serve:\n  auth:\n    keys: " + json.dumps(list(keys)) + "\n"


CASES = {
    "key too short": lambda t: (["--set", f"serve.auth.keys=[{{key: {SHORT}, scopes: [read]}}]"], {}),
    "unknown scope": lambda t: (
        ["--config", write(t, "c.yaml", yaml_keys({**KEY, "scopes": ["admin"]}))],
        {},
    ),
    "repeated key": lambda t: (["--config", write(t, "c.yaml", yaml_keys(KEY, KEY))], {}),
    "key with whitespace": lambda t: (
        ["--config", write(t, "c.yaml", yaml_keys({**KEY, "key": SECRET + " x"}))],
        {},
    ),
    "unknown field beside a key": lambda t: (
        ["--config", write(t, "c.yaml", yaml_keys({**KEY, "scope": ["read"]}))],
        {},
    ),
    "malformed env JSON": lambda t: (
        [],
        {"RIVERBED_SERVE__AUTH__KEYS": f'[{{"key": "{SECRET}", "scopes": ['},
    ),
    "env key bad scope": lambda t: (
        [],
        {"RIVERBED_SERVE__AUTH__KEYS": json.dumps([{**KEY, "scopes": "nope"}])},
    ),
    "malformed YAML on the key's line": lambda t: (
        [
            "--config",
            write(t, "c.yaml", f"serve:\n  auth:\n    keys:\n      - key: {SECRET}\n        scopes: [read\n"),
        ],
        {},
    ),
    "malformed --set value": lambda t: (["--set", f"serve.auth.keys=[{{key: {SECRET}"], {}),
    "keys file entry bad": lambda t: (
        ["--set", "serve.auth.keys_file=" + write(t, "keys.yaml", json.dumps([{**KEY, "scopes": []}]))],
        {},
    ),
    "keys file not YAML": lambda t: (
        ["--set", "serve.auth.keys_file=" + write(t, "keys.yaml", f"- key: {SECRET}\n  scopes: [read\n")],
        {},
    ),
    "keys file repeats a configured key": lambda t: (
        [
            "--config",
            write(t, "c.yaml", yaml_keys(KEY)),
            "--set",
            "serve.auth.keys_file=" + write(t, "keys.json", json.dumps({"keys": [KEY]})),
        ],
        {},
    ),
    "openai key without base_url": lambda t: (
        ["--config", write(t, "c.yaml", f"serve:\n  llm:\n    backend: openai\n    api_key: {SECRET}\n")],
        {},
    ),
    "other section invalid beside keys": lambda t: (
        ["--config", write(t, "c.yaml", yaml_keys(KEY)), "--set", "serve.port=99999"],
        {},
    ),
    "serve section invalid as a whole": lambda t: (
        [],
        {
            "RIVERBED_SERVE": json.dumps(
                {"auth": {"keys": [KEY]}, "llm": {"backend": "openai", "api_key": SECRET}}
            )
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failing_configuration_never_prints_a_secret(tmp_path, case):
    args, env = CASES[case](tmp_path)
    result = run_cli(tmp_path, *args, "config", "show", env=env)
    printed = result.stdout + result.stderr
    assert result.returncode == 2, printed  # a configuration error, not a crash
    assert "invalid configuration" in printed or "--set" in printed, printed
    assert SECRET not in printed and SHORT not in printed, printed
    assert "Traceback" not in printed, printed


def test_config_show_masks_keys_and_the_openai_key(tmp_path):
    config = write(tmp_path, "c.yaml", yaml_keys(KEY) + f"  llm:\n    api_key: {SECRET}\n")
    result = run_cli(tmp_path, "--config", config, "config", "show", "--json")
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    shown = json.loads(result.stdout)["serve"]
    assert shown["auth"]["keys"][0]["scopes"] == ["read", "write"]  # the rest of the key's entry is shown
    assert shown["auth"]["keys"][0]["key"] == shown["llm"]["api_key"] == "**********"


def test_serve_on_a_public_address_without_keys_exits_2_before_starting_anything(tmp_path):
    result = run_cli(tmp_path, "serve", "--set", "serve.host=0.0.0.0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "serve.host" in result.stderr and "serve.auth.keys" in result.stderr
    assert not (tmp_path / "home" / "kafka").exists()  # no broker was started
