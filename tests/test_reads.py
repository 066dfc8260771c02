"""kiln.reads: the API's hottest reads run on the event loop on PostgreSQL, in the thread pool on SQLite."""

import asyncio
import os
import threading

import httpx
import pytest
from sqlalchemy import Integer, bindparam, event, func, select, text
from sqlalchemy.exc import OperationalError

import kiln.db
from api.deps import Authenticate
from kiln import reads
from kiln.db import get_engine
from kiln.embedded import free_port

ON_POSTGRESQL = bool(os.environ.get("KILN_TEST_DATABASE_URL"))
VALUE = select(bindparam("value", type_=Integer).label("value"))
BACKEND = select(func.pg_backend_pid().label("pid"))


@pytest.fixture
def kiln_database(database_url, kiln_database_at):
    kiln_database_at(database_url)


def run(read):
    """Runs `read()` on a fresh event loop, closing that loop's read connections afterwards."""

    async def main():
        try:
            return await read()
        finally:
            await reads.close()

    return asyncio.run(main())


def test_a_read_runs_on_the_loop_on_postgresql_and_in_a_thread_on_sqlite(kiln_database):
    through_engine = []
    event.listen(get_engine(), "before_cursor_execute", lambda *_: through_engine.append(threading.get_ident()))
    (row,) = run(lambda: reads.rows(VALUE, value=7))
    assert row.value == 7
    if ON_POSTGRESQL:
        assert through_engine == []  # psycopg's asyncio connection, on the loop
    else:
        assert through_engine and threading.get_ident() not in through_engine


def test_more_concurrent_reads_than_connections_all_complete_with_their_own_answers(kiln_database):
    # Reads beyond the pool wait on the loop for a connection; each gets its own answer back.
    count = reads.READ_POOL_SIZE * 4

    async def all_of_them():
        return await asyncio.wait_for(asyncio.gather(*(reads.rows(VALUE, value=i) for i in range(count))), 60)

    assert [found[0].value for found in run(all_of_them)] == list(range(count))


@pytest.mark.skipif(not ON_POSTGRESQL, reason="the loop's connections are PostgreSQL's (set KILN_TEST_DATABASE_URL)")
@pytest.mark.parametrize("pinged", [True, False])
def test_connections_the_server_dropped_are_replaced(kiln_database, monkeypatch, pinged):
    # As after a database restart or a failover: both pooled connections are dead. Idle past the ping's threshold
    # (here 0 s), each is pinged, found dead and replaced: no read fails. Used within it (not pinged), the read on
    # the first fails (the API answers 503); that connection is dropped and the other one is pinged before its
    # next use, as the engine replaces its whole pool on a disconnect: one read fails, not one per connection.
    monkeypatch.setattr(kiln.db, "PING_AFTER_IDLE_S", 0.0 if pinged else 3600.0)
    paused = select(func.pg_backend_pid().label("pid"), func.pg_sleep(0.1).label("slept"))

    async def cut_then_read():
        opened = {row.pid for found in await asyncio.gather(reads.rows(paused), reads.rows(paused)) for row in found}
        with get_engine().connect() as admin:
            for pid in opened:
                assert admin.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        if not pinged:
            with pytest.raises(OperationalError):
                await reads.rows(BACKEND)
        after = [(await reads.rows(BACKEND))[0].pid for _ in range(2)]
        return opened, after

    opened, after = run(cut_then_read)
    assert len(opened) == 2 and not opened & set(after)


@pytest.mark.skipif(not ON_POSTGRESQL, reason="the loop's connections are PostgreSQL's (set KILN_TEST_DATABASE_URL)")
def test_reads_cancelled_mid_query_give_their_connections_back(kiln_database):
    # A client that disconnects cancels its request while the query runs. More of them than the pool holds, one
    # after another, and a read after them still gets a connection: the one they all used (psycopg cancels the
    # query on the server and the connection is idle again), with its own answer.
    slow = select(func.pg_sleep(5).label("slept"))

    async def abandon_then_read():
        (before,) = await reads.rows(BACKEND)
        for _ in range(reads.READ_POOL_SIZE + 1):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reads.rows(slow), 0.05)
        (after,) = await asyncio.wait_for(reads.rows(BACKEND), 30)
        return before.pid, after.pid

    before, after = run(abandon_then_read)
    assert after == before


def test_a_parameter_left_out_is_an_error_not_a_null(kiln_database):
    with pytest.raises(Exception, match="value"):  # the engine's words on SQLite, psycopg's on PostgreSQL
        run(lambda: reads.rows(VALUE))


def test_a_key_looked_up_while_the_database_is_down_is_a_503(kiln_database_at):
    # The Authenticate middleware looks a per-owner key up before the app's error handlers run: it must answer
    # the outage as they would (503, retry), not let it become a 500, and at once (before connect_timeout, 5 s).
    kiln_database_at(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/kiln")  # nothing listens there

    async def unreachable(scope, receive, send):
        raise AssertionError("the request went past a key that could not be checked")

    async def request():
        transport = httpx.ASGITransport(app=Authenticate(unreachable, deployment_key="the-deployment-key"))
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as http:
            return await asyncio.wait_for(
                http.get("/v1/jobs", headers={"Authorization": f"Bearer kiln_{'0' * 12}_{'a' * 43}"}), 4)

    response = run(request)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert response.headers["retry-after"] == "5"
