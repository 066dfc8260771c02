"""The API's hottest reads, on the event loop: GET /v1/jobs/{id}, which clients poll, and a per-owner key's lookup.

`rows(statement, **params)` runs a Core select and returns its rows, each with its columns as attributes. On
PostgreSQL it runs on the event loop over psycopg's asyncio connections, the statement compiled to SQL once; on
SQLite (no asyncio driver) in a thread, through the engine.

Why not SQLAlchemy's asyncio engine, which did this before: its checkout, greenlet bridge and result processing
were two thirds of a status poll's CPU (a read 890 -> 300 us; BENCHMARKS.md, section 5). The rows come back as
the driver builds them, so no SQLAlchemy type processing: a non-native enum arrives as its string (JobStatus is
a StrEnum, equal to it), a timestamptz as an aware datetime, JSON parsed, as the engine would give them.

The connections are this module's own small pool rather than psycopg_pool's, for its failure behaviour: it
connects on demand and fails at once when the database is down (the API answers 503 with Retry-After), where
psycopg_pool reconnects in the background and keeps a request waiting out its timeout. The rest mirrors the
engine's pool (kiln.db): at most READ_POOL_SIZE connections per process, a connection idle for
PING_AFTER_IDLE_S pinged before use, and only connections back in a clean state kept.
"""

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from typing import Any

import anyio.to_thread
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Select, exc, make_url

from kiln import db
from kiln.settings import get_settings

# Per API process. Each read holds its connection for one round trip; a read that finds all of them busy waits
# on the loop for one, up to WAIT_S (as the engine's pool_timeout), then fails as the database being unavailable.
READ_POOL_SIZE = 30
WAIT_S = 30.0


async def rows(statement: Select, **params: Any) -> Sequence[Any]:
    """The rows of `statement`, a select whose bound parameters are plain values, with `params` bound."""
    url = get_settings().db_url
    if not url.startswith("postgresql+psycopg"):
        return await anyio.to_thread.run_sync(_rows_in_thread, statement, params)
    sql, defaults = _compiled(statement)
    try:
        async with _pool().connection() as conn:
            cursor = conn.cursor(row_factory=namedtuple_row)
            await cursor.execute(sql, defaults | params)
            return await cursor.fetchall()
    except psycopg.OperationalError as err:  # raised as the engine would: the app's handlers answer 503
        raise exc.OperationalError(sql, params, err) from err
    except psycopg.InterfaceError as err:
        raise exc.InterfaceError(sql, params, err) from err


def _rows_in_thread(statement: Select, params: dict[str, Any]) -> Sequence[Any]:
    with db.autocommit_connection() as conn:
        return conn.execute(statement, params).all()


@lru_cache(maxsize=64)  # the hot statements are module constants: each compiled once per process
def _compiled(statement: Select) -> tuple[str, dict[str, Any]]:
    """The SQL, and the values of the parameters bound in the statement itself; a parameter left for the caller
    is not given one, so a missing one is an error, as through the engine, not a NULL that matches nothing."""
    compiled = statement.compile(dialect=db.get_engine().dialect)
    bound = {name: value for name, value in compiled.params.items() if not compiled.binds[name].required}
    return compiled.string, bound


class _Pool:
    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.slots = asyncio.Semaphore(size)
        self.idle: list[tuple[psycopg.AsyncConnection, float]] = []  # (connection, idle since), newest last

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        conn = await self.acquire()
        try:
            yield conn
        finally:
            await self.release(conn)

    async def acquire(self) -> psycopg.AsyncConnection:
        try:
            async with asyncio.timeout(WAIT_S):
                await self.slots.acquire()
        except TimeoutError:
            raise psycopg.OperationalError(f"no read connection came free in {WAIT_S:.0f} s") from None
        try:
            while self.idle:
                conn, idle_since = self.idle.pop()
                if time.monotonic() - idle_since < db.PING_AFTER_IDLE_S or await _answers(conn):
                    return conn
            return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        except BaseException:
            self.slots.release()
            raise

    async def release(self, conn: psycopg.AsyncConnection) -> None:
        try:
            if conn.info.transaction_status == TransactionStatus.IDLE:
                self.idle.append((conn, time.monotonic()))
            else:  # cut off mid-read (psycopg itself recovers one from a cancelled query): never reused
                await conn.close()
                # A restart or failover cut the others too: ping each before its next use, as the engine's
                # disconnect handling replaces its whole pool, so one read fails, not one per connection.
                self.idle = [(idle, -math.inf) for idle, _ in self.idle]
        finally:
            self.slots.release()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn, _ in idle:
            await conn.close()


async def _answers(conn: psycopg.AsyncConnection) -> bool:
    """Whether a connection that sat idle still works: a database restart, a failover or a proxy's idle timeout
    may have cut it. A dead one is closed, and the caller takes another."""
    try:
        await conn.execute("")
        return True
    except psycopg.Error:
        await conn.close()
        return False
    except BaseException:  # cancelled mid-ping: it is nobody's now
        await conn.close()
        raise


# One pool per event loop: an asyncio connection belongs to the loop that opened it.
_pools: dict[asyncio.AbstractEventLoop, _Pool] = {}


def _pool() -> _Pool:
    loop = asyncio.get_running_loop()
    if loop not in _pools:
        # What the engine connects with (its URL, its timeout and keepalives), quoted for libpq, less the
        # dialect's own type adapters.
        url = get_settings().db_url
        _, params = db.get_engine().dialect.create_connect_args(make_url(url))
        params.pop("context", None)
        _pools[loop] = _Pool(make_conninfo(**params, **db.connect_args(url)), READ_POOL_SIZE)
    return _pools[loop]


async def close() -> None:
    """Close this loop's idle read connections (the API's shutdown; tests)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()
