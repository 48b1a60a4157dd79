import json

import pytest

from cluster.cli import main
from schemas.settings import load_settings


def test_config_show_json(capsys, monkeypatch):
    monkeypatch.setenv("RIVERBED_INDEX__N_SHARDS", "5")
    assert main(["config", "show", "--json", "--set", "embed.max_batch_tokens=77", "--index", "abc"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["embed"]["max_batch_tokens"] == 77
    assert data["index"] == data["index"] | {"name": "abc", "n_shards": 5}


def test_global_flags_before_command_are_kept(capsys):
    assert main(["--set", "serve.port=9001", "config", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["serve"]["port"] == 9001


def test_invalid_setting_exits_2_naming_field(capsys):
    assert main(["--set", "embed.max_batch_tokens=abc", "config", "show"]) == 2
    err = capsys.readouterr().err
    assert "embed.max_batch_tokens" in err


def test_bad_set_syntax_exits_2(capsys):
    assert main(["config", "show", "--set", "novalue"]) == 2
    assert "section.field=value" in capsys.readouterr().err


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_kafka_start_refuses_when_external_broker_configured(capsys):
    assert main(["kafka", "start", "--bootstrap-servers", "example:9092"]) == 2
    assert "bootstrap_servers is set" in capsys.readouterr().err


def test_produce_missing_path_exits_2(capsys, tmp_path):
    assert main(["produce", str(tmp_path / "missing.jsonl"), "--bootstrap-servers", "127.0.0.1:1"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_finetune_image_text_parses_its_flags():
    from cluster.cli import build_parser, cmd_finetune

    args = build_parser().parse_args(
        ["finetune", "image-text", "--dataset", "easy-vqa", "--out", "o", "--limit", "5", "--evaluate"]
    )
    assert (args.func, args.dataset, args.out, args.limit, args.evaluate) == (
        cmd_finetune,
        "easy-vqa",
        "o",
        5,
        "test",
    )
    assert build_parser().parse_args(["finetune", "image-text", "--dataset", "d"]).evaluate is None


def test_finetune_of_a_missing_dataset_exits_2(capsys, tmp_path):
    assert (
        main(["finetune", "image-text", "--dataset", str(tmp_path / "missing"), "--home", str(tmp_path)]) == 2
    )
    assert "neither" in capsys.readouterr().err


def test_the_demo_builds_the_graph_unless_told_not_to() -> None:
    from cluster.demo import demo_settings

    assert demo_settings(load_settings(), graph_chosen=False).graph.enabled is True
    off = load_settings(overrides={"graph": {"enabled": False}})
    assert demo_settings(off, graph_chosen=True) is off


@pytest.mark.parametrize(
    ("argv", "env", "yaml_text", "chosen"),
    [
        ([], {}, None, False),
        (["--set", "graph.enabled=false"], {}, None, True),
        ([], {"RIVERBED_GRAPH__ENABLED": "false"}, None, True),
        ([], {}, "graph:\n  enabled: false\n", True),
        ([], {}, "graph:\n  n_shards: 2\n", False),
        ([], {}, "index:\n  name: x\n", False),
    ],
)
def test_the_demo_sees_graph_enabled_chosen_in_any_source(
    tmp_path, monkeypatch, argv, env, yaml_text, chosen
):
    """``--set``, the environment and the config file each count as choosing, whatever the value."""
    from cluster.cli import _GLOBAL_DEFAULTS, _chosen, build_parser

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RIVERBED_CONFIG", raising=False)
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    args = build_parser().parse_args(["demo", *argv])
    for name, default in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    assert _chosen(args, "graph", "enabled") is chosen
