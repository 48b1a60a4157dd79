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


def test_release_refuses_served_side_and_just_abandoned_indexes_by_name(tmp_path):
    import time

    from cluster.index_admin import SWITCH_GRACE_S, release_index

    settings = load_settings(
        overrides={"home": str(tmp_path), "index": {"name": "docs", "alias": "live", "alias_check_s": 5}}
    )
    write_alias(settings.state_dir, "live", "docs")
    with pytest.raises(ConfigError, match="'docs' is served \\(alias 'live' names it\\)"):
        release_index(settings, "docs")
    with pytest.raises(ConfigError, match="images or graph index beside another"):
        release_index(settings, "docs-images")
    write_alias(settings.state_dir, "live", "docs-v2")
    with pytest.raises(ConfigError, match=r"moved from index 'docs' 0 s ago.*release it in 65 s"):
        release_index(settings, "docs")
    later = time.time() + 5 + SWITCH_GRACE_S + 1
    with pytest.raises(ConfigError, match=r"moved from index 'docs' 60 s ago.*release it in 5 s"):
        release_index(settings, "docs", now=later - 6)
    # past the grace it stops the shards (tests/integration/test_index_alias.py: needs Ray)
