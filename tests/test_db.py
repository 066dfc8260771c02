"""kiln.db.read_on_loop: the API's hottest reads run on the event loop on PostgreSQL, in the thread pool on SQLite."""

import asyncio
import os
import threading

import pytest
from sqlalchemy import Connection, literal, select, text

import kiln.db
from kiln.db import READ_POOL_SIZE, get_engine, get_read_engine, read_on_loop, reset_engine
from kiln.settings import get_settings

ON_POSTGRESQL = bool(os.environ.get("KILN_TEST_DATABASE_URL"))


@pytest.fixture
def kiln_database(database_url, monkeypatch):
    """This process's kiln settings pointed at the test database, and forgotten afterwards."""
    monkeypatch.setenv("KILN_DATABASE_URL", database_url)
    get_settings.cache_clear()
    reset_engine()
    yield
    get_settings.cache_clear()
    reset_engine()


def _where(conn: Connection, value: int) -> tuple[int, int]:
    return conn.scalar(select(literal(value))), threading.get_ident()


async def _dispose() -> None:
    if engine := get_read_engine():
        await engine.dispose()


def test_a_read_runs_on_the_loop_on_postgresql_and_in_a_thread_on_sqlite(kiln_database):
    async def main():
        try:
            return await read_on_loop(_where, 7), threading.get_ident()
        finally:
            await _dispose()

    (value, read_in), loop_thread = asyncio.run(main())
    assert value == 7
    assert (read_in == loop_thread) is ON_POSTGRESQL


def test_more_concurrent_reads_than_connections_all_complete_in_order(kiln_database):
    # Reads beyond the pool wait on the loop for a connection; each gets its own answer back.
    count = READ_POOL_SIZE * 4

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*(read_on_loop(_where, i) for i in range(count))), 60)
        finally:
            await _dispose()

    assert [value for value, _ in asyncio.run(main())] == list(range(count))


def _backend(conn: Connection) -> int:
    return conn.scalar(text("SELECT pg_backend_pid()"))


@pytest.mark.skipif(not ON_POSTGRESQL, reason="the read engine is PostgreSQL's (set KILN_TEST_DATABASE_URL)")
def test_a_read_after_the_server_dropped_its_connection_gets_a_fresh_one(kiln_database, monkeypatch):
    # As after a database restart or a failover: the pooled connection is dead. It is pinged, being idle (here
    # after 0 s), found dead and replaced; without the ping the read would fail.
    monkeypatch.setattr(kiln.db, "PING_AFTER_IDLE_S", 0.0)

    async def main():
        try:
            first = await read_on_loop(_backend)
            with get_engine().connect() as admin:
                assert admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            return first, await read_on_loop(_backend)
        finally:
            await _dispose()

    first, second = asyncio.run(main())
    assert second != first
