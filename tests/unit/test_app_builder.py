"""``deployments.app:app_builder``, the import path a Serve config (a RayService) names: its args
are Riverbed settings, refused field by field, and the broker must be named."""

from __future__ import annotations

import pytest
from ray.serve import Application

from deployments.app import app_builder
from schemas.errors import ConfigError


def test_settings_as_args_build_the_app():
    app = app_builder({"index": {"name": "docs"}, "kafka": {"bootstrap_servers": "kafka:9092"}})
    assert isinstance(app, Application)


def test_a_bad_setting_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"index\.n_shard"):
        app_builder({"index": {"n_shard": 2}, "kafka": {"bootstrap_servers": "kafka:9092"}})


def test_without_a_broker_address_the_builder_says_which_setting(monkeypatch):
    monkeypatch.delenv("RIVERBED_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        app_builder({"index": {"name": "docs"}})
