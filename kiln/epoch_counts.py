"""Epochs counted by duration as workers write them, for /metrics' kiln_epoch_duration_seconds.

Each epoch adds one to its bucket's row in the transaction that writes the epoch's own row, so a scrape reads a
dozen rows instead of every epoch ever trained. Like any Prometheus counter the counts never go down."""

import functools
import math

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from kiln.db import dialect_insert
from kiln.tables import EpochDurations

# Upper bounds of the histogram's buckets, in seconds; +Inf beyond the last.
EPOCH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def bucket(duration_s: float) -> float:
    """The upper bound of the smallest bucket that holds `duration_s` (inf past the last)."""
    return next((bound for bound in EPOCH_BUCKETS if duration_s <= bound), math.inf)


def count_epoch(session: Session, duration_s: float) -> None:
    """Adds an epoch. Its bucket's row stays locked until the transaction ends: the caller makes this its last
    statement, so that two epochs of the same bucket committing at once wait for one round trip at most."""
    statement = _counted(session.get_bind().dialect.name)
    session.execute(statement, {"le": bucket(duration_s), "seconds": duration_s})


@functools.cache
def _counted(dialect: str):
    """The upsert adding one epoch, built once per dialect: building it took as long as running it."""
    row = dialect_insert(dialect)(EpochDurations).values(le=bindparam("le"), epochs=1, seconds=bindparam("seconds"))
    return row.on_conflict_do_update(
        index_elements=[EpochDurations.le],
        set_={EpochDurations.epochs: EpochDurations.epochs + 1,
              EpochDurations.seconds: EpochDurations.seconds + row.excluded.seconds},
    )


def histogram(session: Session) -> tuple[list[tuple[float, int]], int, float]:
    """([(upper bound, epochs at most that long)] for each of EPOCH_BUCKETS, all epochs, their total seconds)."""
    rows = session.execute(select(EpochDurations.le, EpochDurations.epochs, EpochDurations.seconds)).all()
    cumulative = [(bound, sum(n for le, n, _ in rows if le <= bound)) for bound in EPOCH_BUCKETS]
    return cumulative, sum(n for _, n, _ in rows), sum(s for _, _, s in rows)
