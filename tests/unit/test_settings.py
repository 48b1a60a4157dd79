import pytest

from schemas.errors import ConfigError
from schemas.settings import Settings, load_settings


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
