"""kiln.db.read_on_loop: the API's hottest reads run on the event loop on PostgreSQL, in the thread pool on SQLite."""

import asyncio
import os
import threading

import httpx
import pytest
from sqlalchemy import Connection, literal, select, text

import kiln.db
from api.deps import Authenticate
from kiln.db import READ_POOL_SIZE, get_engine, get_read_engine, read_on_loop, reset_engine
from kiln.embedded import free_port
from kiln.settings import get_settings

ON_POSTGRESQL = bool(os.environ.get("KILN_TEST_DATABASE_URL"))


@pytest.fixture
def kiln_database_at(monkeypatch):
    """Points this process's kiln settings at a database URL; they are forgotten afterwards."""

    def use(url: str) -> None:
        monkeypatch.setenv("KILN_DATABASE_URL", url)
        get_settings.cache_clear()
        reset_engine()

    yield use
    get_settings.cache_clear()
    reset_engine()


@pytest.fixture
def kiln_database(database_url, kiln_database_at):
    kiln_database_at(database_url)


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


def test_a_key_looked_up_while_the_database_is_down_is_a_503(kiln_database_at):
    # The Authenticate middleware looks a per-owner key up before the app's error handlers run: it must answer
    # the outage as they would (503, retry), not let it become a 500.
    kiln_database_at(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/kiln")  # nothing listens there

    async def unreachable(scope, receive, send):
        raise AssertionError("the request went past a key that could not be checked")

    async def main():
        try:
            transport = httpx.ASGITransport(app=Authenticate(unreachable, deployment_key="the-deployment-key"))
            async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as http:
                return await http.get("/v1/jobs", headers={"Authorization": f"Bearer kiln_{'0' * 12}_{'a' * 43}"})
        finally:
            await _dispose()

    response = asyncio.run(main())
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert response.headers["retry-after"] == "5"
