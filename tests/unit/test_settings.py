import json
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.settings import Settings, check_exposure, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("RIVERBED_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = load_settings()
    assert s.kafka.bootstrap_servers is None
    assert s.embed.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.consumer_group == "riverbed.default"
    assert s.data_dir == s.home / "data" / "default"


def test_precedence_defaults_yaml_env_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "embed:\n  max_batch_tokens: 111\n  max_batch_size: 7\n  device: cpu\nindex:\n  n_shards: 3\n"
    )
    s = load_settings(cfg)
    assert (s.embed.max_batch_tokens, s.embed.max_batch_size, s.index.n_shards) == (111, 7, 3)
    monkeypatch.setenv("RIVERBED_EMBED__MAX_BATCH_TOKENS", "222")
    s = load_settings(cfg)
    assert s.embed.max_batch_tokens == 222 and s.embed.max_batch_size == 7  # env beats yaml, per field
    s = load_settings(cfg, {"embed": {"max_batch_tokens": 333}})
    assert s.embed.max_batch_tokens == 333 and s.embed.device == "cpu" and s.index.n_shards == 3


def test_config_file_from_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  name: squad\n")
    monkeypatch.setenv("RIVERBED_CONFIG", str(cfg))
    assert load_settings().index.name == "squad"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"embed": {"max_batch_tokens": 0}}, "embed.max_batch_tokens"),
        ({"embed": {"device": "tpu"}}, "embed.device"),
        ({"index": {"name": "Bad Name"}}, "index.name"),
        ({"kafka": {"bootstrap_servers": "nohostport"}}, "kafka.bootstrap_servers"),
        ({"chunk": {"max_tokens": 64, "overlap_tokens": 64}}, "chunk"),
        ({"kafka": {"topics": {"documents": "bad topic"}}}, "kafka.topics.documents"),
        ({"embed": {"no_such_field": 1}}, "embed.no_such_field"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    assert field in str(info.value)


def test_invalid_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("RIVERBED_SERVE__PORT", "99999")
    with pytest.raises(ConfigError, match=r"serve\.port"):
        load_settings()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embed: [unclosed\n")
    with pytest.raises(ConfigError):
        load_settings(cfg)


def test_frozen():
    s = load_settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen models
        s.embed.max_batch_tokens = 5  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_bootstrap_servers_list():
    s = load_settings(overrides={"kafka": {"bootstrap_servers": "a:9092, b.example:9093"}})
    assert s.kafka.bootstrap_servers == "a:9092, b.example:9093"


KEY = {"key": "k" * 20, "scopes": ["read"]}


def test_keys_from_yaml_env_and_a_keys_file_join(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n  - key: " + "f" * 20 + "\n    scopes: [write, read]\n    name: ops\n")
    monkeypatch.setenv("RIVERBED_SERVE__AUTH__KEYS", json.dumps([KEY]))
    s = load_settings(overrides={"serve": {"auth": {"keys_file": str(keys_file)}}})
    keys = [(k.key.get_secret_value(), k.scopes, k.name) for k in s.serve.auth.keys]
    assert keys == [("k" * 20, ["read"], None), ("f" * 20, ["read", "write"], "ops")]
    assert s.serve.auth.keys_file is None  # read once: a copy of the settings never reads it again
    again = Settings.model_validate(s.model_dump())  # as a Serve replica rebuilds them
    assert len(again.serve.auth.keys) == 2


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ([{"key": "short", "scopes": ["read"]}], "at least 16"),
        ([{"key": "k" * 20, "scopes": []}], "at least one scope"),
        ([{"key": "k" * 20, "scopes": ["admin"]}], "'read' or 'write'"),
        ([KEY, {**KEY, "scopes": ["write"]}], "repeats an earlier key"),
        ([{"key": "k" * 20 + "\t", "scopes": ["read"]}], "no whitespace"),
    ],
)
def test_bad_keys_are_refused_naming_the_entry(keys, words):
    with pytest.raises(ConfigError, match=r"serve\.auth\.keys") as info:
        load_settings(overrides={"serve": {"auth": {"keys": keys}}})
    assert words in str(info.value)


def test_a_bad_keys_file_is_named(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"nope": []}))
    with pytest.raises(ConfigError, match=r"keys_file .*keys.json: expected a list"):
        load_settings(overrides={"serve": {"auth": {"keys_file": str(path)}}})
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(overrides={"serve": {"auth": {"keys_file": str(tmp_path / "missing.yaml")}}})


@pytest.mark.parametrize(
    ("host", "keys", "refused"),
    [
        ("127.0.0.1", [], False),
        ("127.0.0.2", [], False),
        ("localhost", [], False),
        ("::1", [], False),
        ("0.0.0.0", [], True),
        ("::", [], True),
        ("10.0.0.5", [], True),
        ("search.example.com", [], True),
        ("0.0.0.0", [KEY], False),
    ],
)
def test_an_open_app_is_allowed_only_on_loopback(host, keys, refused):
    serve = load_settings(overrides={"serve": {"host": host, "auth": {"keys": keys}}}).serve
    if refused:
        with pytest.raises(ConfigError, match=r"serve\.host .*serve\.auth\.keys"):
            check_exposure(serve)
    else:
        check_exposure(serve)


@pytest.mark.parametrize(
    ("edge", "keys", "plane"),
    [
        ("auto", [], "proxy"),
        ("auto", [KEY], "haproxy"),
        ("proxy", [KEY], "proxy"),
        ("haproxy", [KEY], "haproxy"),
    ],
)
def test_the_edge_is_haproxy_only_with_keys_unless_named(edge, keys, plane):
    serve = load_settings(overrides={"serve": {"edge": edge, "auth": {"keys": keys}}}).serve
    check_exposure(serve)
    assert serve.data_plane() == plane


def test_haproxy_without_keys_is_refused_naming_both_settings():
    serve = load_settings(overrides={"serve": {"edge": "haproxy"}}).serve
    with pytest.raises(ConfigError, match=r"serve\.edge is 'haproxy' and serve\.auth\.keys is empty"):
        check_exposure(serve)


def test_images_defaults_name_the_trained_model():
    s = load_settings()
    assert s.images.model == "riverbed/lit-easy-vqa"
    assert (s.images.finetune.image_size, s.images.finetune.workers) == (64, 1)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"images": {"finetune": {"image_size": 64, "patch_size": 7}}}, "images.finetune"),
        ({"images": {"finetune": {"hidden_size": 100, "num_heads": 3}}}, "images.finetune"),
        ({"images": {"finetune": {"validation_fraction": 1.0}}}, "images.finetune.validation_fraction"),
        ({"images": {"finetune": {"batch_size": 1}}}, "images.finetune.batch_size"),
        ({"images": {"no_such_field": 1}}, "images.no_such_field"),
        ({"images": {"device": "tpu"}}, "images.device"),
    ],
)
def test_invalid_image_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    assert field in str(info.value)


def test_image_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("RIVERBED_IMAGES__FINETUNE__EPOCHS", "3")
    monkeypatch.setenv("RIVERBED_IMAGES__MODEL", "openai/clip-vit-base-patch32")
    s = load_settings()
    assert s.images.finetune.epochs == 3 and s.images.model == "openai/clip-vit-base-patch32"


def test_index_names_ending_in_images_are_reserved_for_an_index_s_images():
    with pytest.raises(ConfigError, match=r"index\.name: .*reserved for the images of an index .*'x-images'"):
        load_settings(overrides={"index": {"name": "x-images"}})
    settings = load_settings(overrides={"index": {"name": "x", "n_shards": 3}, "home": "/tmp/h"})
    images = settings.image_side()
    assert images.index.name == "x-images" and images.index.n_shards == 3
    assert images.data_dir != settings.data_dir and images.consumer_group != settings.consumer_group
    assert settings.index.name == "x"  # a copy: the text side is unchanged


def test_image_uri_roots_must_be_absolute():
    with pytest.raises(ConfigError, match=r"images\.uri_roots.*'relative/dir' is not an absolute path"):
        load_settings(overrides={"images": {"uri_roots": ["relative/dir"]}})
    roots = load_settings(overrides={"images": {"uri_roots": ["/srv/images"]}}).images.uri_roots
    assert roots == (Path("/srv/images"),)
