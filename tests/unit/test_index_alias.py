"""The alias files: atomic moves, what a missing or damaged alias says, and names."""

from __future__ import annotations

import re

import pytest

from actors.index_alias import alias_path, list_aliases, read_alias, write_alias
from deployments.alias import alias_target
from schemas.errors import ConfigError
from schemas.settings import load_settings


def test_an_alias_moves_and_remembers_where_it_pointed(tmp_path):
    assert read_alias(tmp_path, "live") is None
    assert write_alias(tmp_path, "live", "a") is None
    assert write_alias(tmp_path, "live", "b") == "a"
    assert read_alias(tmp_path, "live") == "b"
    write_alias(tmp_path, "staging", "c")
    assert list_aliases(tmp_path) == {"live": "b", "staging": "c"}
    assert not [p for p in alias_path(tmp_path, "live").parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_names_and_damaged_files_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("alias '../x'")):
        alias_path(tmp_path, "../x")
    path = alias_path(tmp_path, "live")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_alias(tmp_path, "live")
    path.write_text('{"alias": "live"}')
    with pytest.raises(ConfigError, match="names no index"):
        read_alias(tmp_path, "live")


def test_an_app_serving_an_alias_that_points_nowhere_says_how_to_point_it(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path), "index": {"alias": "live"}})
    with pytest.raises(ConfigError, match="riverbed index alias live --to INDEX"):
        alias_target(settings)
    write_alias(settings.state_dir, "live", "v2")
    assert alias_target(settings) == "v2"


def test_served_indexes_are_the_alias_targets_and_the_configured_index_unless_an_alias_is_served(tmp_path):
    from cluster.index_admin import served_indexes

    plain = load_settings(overrides={"home": str(tmp_path), "index": {"name": "docs"}})
    assert served_indexes(plain) == {"docs": "index.name"}
    write_alias(plain.state_dir, "live", "docs-v2")
    assert served_indexes(plain) == {"docs": "index.name", "docs-v2": "alias 'live'"}
    aliased = load_settings(overrides={"home": str(tmp_path), "index": {"name": "docs", "alias": "live"}})
    assert served_indexes(aliased) == {"docs-v2": "alias 'live'"}  # docs is only where ingest writes
