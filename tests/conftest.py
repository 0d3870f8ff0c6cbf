"""Shared fixtures: one real Redis for the session (REDIS_URL, or a redis-server we start)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from services.common.testing import RedisServer

# Test speech (espeak-ng sentences and recorded voices) for every test that needs audio.
from tests.speech import clips  # noqa: F401


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of the test's own, so tests never see each other's data."""
    return f"test:{uuid.uuid4().hex[:12]}:"
