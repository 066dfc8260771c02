"""Database engine, sessions and the declarative base.

One engine per process (created lazily, so a forked Celery child builds its own), one session per
request or per unit of work. The schema is created by Alembic migrations only (see migrations/).
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from kiln.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes in and out, on SQLite (which stores none) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use kiln.db.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, idle_transaction_limit_s: float | None = None) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # WAL lets readers run beside the single writer; busy_timeout makes writers queue
            # instead of failing with "database is locked" when several workers commit at once.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    args = connect_args(url)
    if url.startswith("postgresql") and idle_transaction_limit_s:  # see end_idle_transactions_after
        args["options"] = f"-c idle_in_transaction_session_timeout={int(idle_transaction_limit_s * 1000)}"
    # No overflow: a connection opened beyond pool_size is closed again as soon as the pool has pool_size idle
    # ones, and under steady load that was one new PostgreSQL connection (a backend process forked, two thirds
    # of the database's CPU) every five status polls. So at most POOL_SIZE connections per process, opened on
    # demand and kept; a thread that finds them all busy waits for one (pool_timeout, 30 s).
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0, connect_args=args)
    _ping_after_idle(engine)
    return engine


def connect_args(url: str) -> dict[str, Any]:
    """Fail fast instead of hanging on a database that stopped answering: connect timeout, TCP keepalives."""
    if not url.startswith("postgresql"):
        return {}
    return {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3}


# Per process: enough for a 40-thread API process whose requests each hold one briefly. The database's
# max_connections must cover the API processes and workers at this many each.
POOL_SIZE = 30
# A connection back from the pool after this long idle is pinged first (below).
PING_AFTER_IDLE_S = 1.0


def _ping_after_idle(engine: Engine) -> None:
    """pool_pre_ping, but only for a connection that sat idle: one that a database restart, a failover or a
    proxy's idle timeout may have cut. A dead one is replaced before anyone uses it. A connection used within
    the last second is not pinged: under load that is every checkout, and the ping was a round trip and ~5% of a
    status poll's CPU. If the database goes away in that second, the request in flight fails and SQLAlchemy
    replaces every pooled connection (its disconnect handling), as pool_pre_ping would have done one call
    later."""

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn, record, proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return  # new, or just used
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as err:
            raise exc.DisconnectionError() from err  # the pool discards it and checks out another


# Set in worker processes by end_idle_transactions_after.
_idle_transaction_limit_s: float | None = None


def end_idle_transactions_after(seconds: float) -> None:
    """Have PostgreSQL end this process's sessions that sit in an open transaction for `seconds` (workers: the
    lease). A worker host cut off from the network in the middle of a transaction leaves its session open on the
    server, with the row locks it took, until TCP gives up on it (hours): the next attempt's claim and the
    reconciler would wait on those locks. Once the lease has run out that worker could write nothing anyway."""
    global _idle_transaction_limit_s
    _idle_transaction_limit_s = seconds
    reset_engine()


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().db_url, _idle_transaction_limit_s)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def autocommit_connection() -> Iterator[Connection]:
    """A pooled connection in autocommit mode, for a read that is a single statement: one round trip, where a
    session's transaction adds a BEGIN and a ROLLBACK."""
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


@contextmanager
def session_scope() -> Iterator[Session]:
    """A short unit of work: commit on success, roll back on error, always close."""
    with get_sessionmaker()() as session, session.begin():
        yield session


def dialect_insert(dialect: str):
    """The INSERT construct of kiln's dialects, PostgreSQL's and SQLite's, both with ON CONFLICT."""
    inserts = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    if dialect not in inserts:
        raise ValueError(f"kiln runs on PostgreSQL or SQLite, not {dialect}")
    return inserts[dialect]


def reset_engine() -> None:
    """Forget this process's engine; a forked child must never reuse its parent's connections."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
