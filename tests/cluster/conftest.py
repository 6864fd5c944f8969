"""Fixtures of the cluster tests."""

import pytest

from tests.cluster.redis_support import running_redis


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on loopback, as GCS fault tolerance runs it (TLS, password)."""
    with running_redis(tmp_path) as server:
        yield server
