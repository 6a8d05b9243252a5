"""Fixtures shared by test modules: a real PostgreSQL server (see `tests/postgres.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server's URI (one per test process, started when first asked for)."""
    with postgres.postgres_server() as uri:
        yield uri


@pytest.fixture
def postgres_uri(postgres_server: str) -> Iterator[str]:
    """`postgresql+asyncpg://...` of an empty database of this test's own."""
    with postgres.fresh_database(postgres_server) as uri:
        yield uri
