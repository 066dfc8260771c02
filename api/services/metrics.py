"""A job's epoch history, GET /v1/jobs/{id}/metrics: whole or downsampled, with as little Python in the way as
possible, since a long history is megabytes of JSON.

Each epoch's JSON is rendered once, by the worker that writes the row (kiln.epochs.render_epoch), so a read only
joins those: on PostgreSQL the database concatenates them and no row reaches Python. Rows written before that
(migration 0008) are rendered from their columns, as plain rows, never ORM objects or validated models (those
were nearly all of a long history's cost), or by PostgreSQL's json_agg. Downsampling is a query too: the database
picks the epochs to keep and only those are read. And epoch rows are written once each, in order, and never
changed (the worker's fenced commit), so the JSON of a history's first epochs, once read, stays right: a later
read of the whole history in the same API process reads only the epochs after those (RenderedHistories).
"""

import json
import threading
from collections import OrderedDict

from pydantic import TypeAdapter
from sqlalchemy import Text, case, cast, func, literal_column, select, true
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from api.schemas import EpochMetrics
from api.services.jobs import METRIC_FIELDS, get_job
from kiln.db import get_sessionmaker
from kiln.tables import EpochMetric

_COLUMNS = [getattr(EpochMetric, name) for name in METRIC_FIELDS]
_EPOCHS = TypeAdapter(list[EpochMetrics])


class RenderedHistories:
    """The rendered JSON of each recently read history, by job id, with the last epoch it covers; the least
    recently used go first once they hold more than `capacity` bytes. Per process, shared by its threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, job_id: str) -> tuple[int, bytes]:
        """(last epoch, the array's elements up to it), or (0, b"") when none is kept."""
        with self._lock:
            if job_id not in self._items:
                return 0, b""
            self._items.move_to_end(job_id)
            return self._items[job_id]

    def put(self, job_id: str, last_epoch: int, elements: bytes) -> None:
        if len(elements) > self.capacity // 4:
            return
        with self._lock:
            if job_id in self._items:
                self._size -= len(self._items.pop(job_id)[1])
            self._items[job_id] = (last_epoch, elements)
            self._size += len(elements)
            while self._size > self.capacity:
                self._size -= len(self._items.popitem(last=False)[1][1])


rendered = RenderedHistories(capacity=64 * 2**20)


def job_metrics_json(owner: str, job_id: str, since: int, max_points: int | None = None) -> bytes:
    with get_sessionmaker()() as session:
        get_job(session, owner, job_id)
        if since or max_points:
            chosen = EpochMetric.epoch.in_(kept_epochs(job_id, since, max_points)) if max_points else true()
            elements, _ = _render(session, (EpochMetric.job_id == job_id, EpochMetric.epoch > since, chosen))
        else:
            done, elements = rendered.get(job_id)
            new, last = _render(session, (EpochMetric.job_id == job_id, EpochMetric.epoch > done))
            if new:
                elements = elements + b"," + new if elements else new
                rendered.put(job_id, last, elements)
    return b'{"job_id":' + json.dumps(job_id).encode() + b',"epochs":[' + elements + b"]}"


def _render(session: Session, where: tuple) -> tuple[bytes, int | None]:
    """The JSON array elements (no brackets) of the epochs `where` selects, in epoch order, and the last epoch."""
    if (joined := _joined(session, where)) is not None:
        return joined
    # Some were written before the worker rendered each epoch (migration 0008): render them all from the columns.
    if session.get_bind().dialect.name == "postgresql":
        rows = select(*_COLUMNS).where(*where).subquery("m")
        array = cast(func.json_agg(aggregate_order_by(rows.table_valued(), rows.c.epoch)), Text)
        text, last = session.execute(select(array, func.max(rows.c.epoch))).one()
        if text is None:
            return b"", None
        if '"NaN"' not in text and 'Infinity"' not in text:  # else: the path below writes null
            return text[1:-1].encode(), last
    rows = session.execute(select(*_COLUMNS).where(*where).order_by(EpochMetric.epoch)).all()
    if not rows:
        return b"", None
    epochs = [dict(zip(METRIC_FIELDS, row, strict=True)) for row in rows]
    try:
        text = json.dumps(epochs, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite value: pydantic writes it as null, as the other routes do
        text = _EPOCHS.dump_json(_EPOCHS.validate_python(epochs)).decode()
    return text[1:-1].encode(), rows[-1].epoch


def _joined(session: Session, where: tuple) -> tuple[bytes, int | None] | None:
    """The epochs `where` selects, joined from the JSON the worker rendered when it wrote each (the database only
    concatenates); None if any has none."""
    if session.get_bind().dialect.name == "postgresql":
        ordered = aggregate_order_by(literal_column("','"), EpochMetric.epoch)
        text, unrendered, last = session.execute(
            select(func.string_agg(EpochMetric.rendered, ordered), func.count().filter(EpochMetric.rendered.is_(None)),
                   func.max(EpochMetric.epoch)).where(*where)
        ).one()
        return None if unrendered else ((text or "").encode(), last)
    rows = session.execute(
        select(EpochMetric.epoch, EpochMetric.rendered).where(*where).order_by(EpochMetric.epoch)
    ).all()
    if any(text is None for _, text in rows):
        return None
    return ",".join(text for _, text in rows).encode(), rows[-1].epoch if rows else None


def kept_epochs(job_id: str, since: int, max_points: int):
    """The epochs after `since` that a chart of at most `max_points` keeps: every one if they fit; else the first
    and the last and, in each of (max_points - 2) // 4 equal buckets between, the epochs of the lowest and the
    highest train and validation loss (the earliest on a tie), so a spike survives however long the history.
    Rows numbered once, each bucket's extremes by GROUP BY and then the earliest epoch holding each, no sort per
    bucket; on SQLite and PostgreSQL alike."""
    buckets = max(1, (max_points - 2) // 4)
    mine = (EpochMetric.job_id == job_id, EpochMetric.epoch > since)
    n = select(func.count()).where(*mine).scalar_subquery()
    numbered = (
        select(EpochMetric.epoch, EpochMetric.train_loss, EpochMetric.val_loss, n.label("n"),
               (func.row_number().over(order_by=EpochMetric.epoch) - 1).label("i"))
        .where(*mine)
        .subquery("numbered")
    )
    i, n = numbered.c.i, numbered.c.n
    # The first and the last epoch are buckets of their own (-1, -2), so they are their buckets' extremes.
    bucket = case((i == 0, -1), (i == n - 1, -2), else_=(i - 1) * buckets // (n - 2))
    rows = select(numbered, bucket.label("bucket")).cte("bucketed")
    extremes = select(
        rows.c.bucket, func.min(rows.c.train_loss).label("train_lo"), func.max(rows.c.train_loss).label("train_hi"),
        func.min(rows.c.val_loss).label("val_lo"), func.max(rows.c.val_loss).label("val_hi"),
    ).group_by(rows.c.bucket).subquery("extremes")
    x = extremes.c
    picks = (
        select(*(func.min(rows.c.epoch).filter(column == value).label(name) for name, column, value in (
            ("train_lo", rows.c.train_loss, x.train_lo), ("train_hi", rows.c.train_loss, x.train_hi),
            ("val_lo", rows.c.val_loss, x.val_lo), ("val_hi", rows.c.val_loss, x.val_hi))))
        .join_from(rows, extremes, rows.c.bucket == x.bucket)
        .group_by(rows.c.bucket)
        .cte("picks")  # computed once, read four times
    )
    fits = select(rows.c.epoch).where(rows.c.n <= max_points)
    return fits.union(*(select(column).where(column.is_not(None)) for column in picks.c))
