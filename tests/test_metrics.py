"""Reading a job's epoch history (api.services.metrics): downsampling in the database, on a real database (SQLite, or
PostgreSQL with KILN_TEST_DATABASE_URL), checked against the rule written out in Python; the rendered histories a
later read extends, over real HTTP. test_events.py reads a downsampled history over HTTP too."""

import json
import math
import random
import uuid

from sqlalchemy import create_engine, insert
from sqlalchemy.orm import Session

from api.schemas import EpochMetrics
from api.services.metrics import RenderedHistories, _render, kept_epochs
from kiln.db import utcnow
from kiln.epochs import EPOCH_FIELDS, render_epoch
from kiln.tables import EpochMetric, Job, JobStatus
from worker.runner import epoch_values
from worker.training import EpochMetrics as LoopEpoch


def history(engine, losses: list[tuple[float, float | None]]) -> str:
    """A finished job whose epoch e (from 1) had losses[e - 1] as (train_loss, val_loss)."""
    job_id = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(insert(Job), [dict(
            id=job_id, owner="o", status=JobStatus.succeeded, spec={}, queue="kiln", created_at=utcnow(),
            epochs_completed=len(losses), attempt=1, cancel_requested=False)])
        if losses:
            conn.execute(insert(EpochMetric), [dict(
                job_id=job_id, epoch=e, attempt=1, train_loss=train, val_loss=val, lr=0.1, duration_s=0.1,
                samples_per_s=1.0, created_at=utcnow()) for e, (train, val) in enumerate(losses, start=1)])
    return job_id


def kept(engine, job_id: str, max_points: int, since: int = 0) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(kept_epochs(job_id, since, max_points)))


def expected(losses: list[tuple[float, float | None]], max_points: int, since: int = 0) -> list[int]:
    """The rule, in Python: all if they fit; else the ends and each bucket's lowest and highest of each loss."""
    epochs = list(range(since + 1, len(losses) + 1))
    n = len(epochs)
    if n <= max_points:
        return epochs
    buckets = max(1, (max_points - 2) // 4)
    keep = {epochs[0], epochs[-1]}
    for b in range(buckets):
        chunk = [epochs[i] for i in range(1, n - 1) if (i - 1) * buckets // (n - 2) == b]
        for series in (0, 1):
            points = [e for e in chunk if losses[e - 1][series] is not None]
            if points:  # min and max return the earliest on a tie, as the query does
                keep.add(min(points, key=lambda e, s=series: losses[e - 1][s]))
                keep.add(max(points, key=lambda e, s=series: losses[e - 1][s]))
    return sorted(keep)


def test_spikes_survive_and_the_ends_are_kept(engine):
    losses = [(100.0 if e == 3333 else 1 / e, -1.0 if e == 1234 else 2 / e) for e in range(1, 5001)]
    job_id = history(engine, losses)
    epochs = kept(engine, job_id, 100)
    assert len(epochs) <= 100 and {1, 1234, 3333, 5000} <= set(epochs)
    assert epochs == expected(losses, 100)


def test_random_histories_with_ties_and_missing_validation_match_the_rule(engine):
    rng = random.Random(7)
    for n, max_points, since in [(1000, 10, 0), (997, 37, 0), (5000, 1000, 250), (300, 299, 0), (300, 301, 0)]:
        # Rounded losses tie often; a third of the epochs have no validation loss.
        losses = [(round(rng.random(), 2), None if rng.random() < 0.33 else round(rng.random(), 1))
                  for _ in range(n)]
        job_id = history(engine, losses)
        epochs = kept(engine, job_id, max_points, since)
        assert epochs == expected(losses, max_points, since), (n, max_points, since)
        assert len(epochs) <= max_points


def test_a_history_that_fits_is_returned_whole_and_none_is_empty(engine):
    losses = [(1 / e, None) for e in range(1, 51)]
    job_id = history(engine, losses)
    assert kept(engine, job_id, 50) == list(range(1, 51))
    assert kept(engine, job_id, 10, since=45) == [46, 47, 48, 49, 50]
    assert kept(engine, job_id, 10, since=50) == []
    assert kept(engine, history(engine, [(0.5, 0.5)]), 10) == [1]


def test_a_history_read_again_gains_its_new_epochs(stack, client):
    """The second read renders only the epochs after the first's and joins them on: same rows, same order, a
    non-finite loss written as null, exactly what a read that renders everything says."""
    job = client.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 500}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    stack.wait_for_job(client, job["id"], lambda j: j["status"] == "cancelled")
    engine = create_engine(stack.settings.db_url)

    def write(epochs: range, rendered: bool) -> None:  # replacing anything the worker trained before the cancel
        rows = [dict(job_id=job["id"], epoch=e, attempt=1, train_loss=1 / e, val_loss=math.nan if e == 120 else 2 / e,
                     lr=0.1, duration_s=0.1, samples_per_s=1.0, created_at=utcnow()) for e in epochs]
        with engine.begin() as conn:
            if epochs.start == 1:
                conn.execute(EpochMetric.__table__.delete().where(EpochMetric.job_id == job["id"]))
            conn.execute(insert(EpochMetric), [row | {"rendered": render_epoch(row) if rendered else None}
                                               for row in rows])

    def read(**params) -> list[dict]:
        response = client.get(f"/v1/jobs/{job['id']}/metrics", params=params)
        assert response.status_code == 200, response.text
        return response.json()["epochs"]

    try:
        write(range(1, 101), rendered=False)  # as written before workers rendered each epoch (migration 0008)
        assert [m["epoch"] for m in read()] == list(range(1, 101))
        write(range(101, 151), rendered=True)  # as a worker writes them now
        again = read()
        assert [m["epoch"] for m in again] == list(range(1, 151))
        assert again[119]["val_loss"] is None and again[118]["val_loss"] == 2 / 119
        assert again == read(max_points=100_000) == read(), "the joined history differs from a whole rendering"
        assert read(since=140) == again[140:]
    finally:
        engine.dispose()


def test_epochs_rendered_when_written_read_as_those_rendered_from_their_columns(engine):
    """The worker renders each epoch as it writes it; rows written before that are rendered by the API from their
    columns. Both say the same, non-finite numbers as null included, and so does a history mixing the two. A
    per-layer norm that overflowed is stored as null: PostgreSQL refuses JSON that holds an infinity."""
    assert list(EpochMetrics.model_fields) == list(EPOCH_FIELDS), "the API shows the fields the worker renders"
    epochs = [LoopEpoch(epoch=e, train_loss=1 / e, val_loss=None if e == 2 else math.inf if e == 3 else 2 / e,
                        val_accuracy=0.5, lr=0.01, duration_s=0.25, samples_per_s=4000.0,
                        grad_norm=math.nan if e == 4 else e,
                        grad_norm_per_layer={"0.weight": 0.5 / e, "0.bias": math.inf if e == 5 else 1.0})
              for e in range(1, 7)]

    def read(rendered: set[int]) -> list[dict]:
        job_id = history(engine, [])
        rows = [epoch_values(m, attempt=2) | {"job_id": job_id, "created_at": utcnow()} for m in epochs]
        with engine.begin() as conn:
            conn.execute(insert(EpochMetric), [
                row | {"rendered": render_epoch(row) if row["epoch"] in rendered else None} for row in rows])
        with Session(engine) as session:
            elements, last = _render(session, (EpochMetric.job_id == job_id,))
        assert last == 6
        return json.loads(b"[" + elements + b"]")

    by_columns = read(rendered=set())
    assert by_columns[2]["val_loss"] is None and by_columns[3]["grad_norm"] is None
    assert by_columns[4]["grad_norm_per_layer"] == {"0.weight": 0.1, "0.bias": None}
    assert by_columns[0] == {"epoch": 1, "attempt": 2, "train_loss": 1.0, "val_loss": 2.0, "val_accuracy": 0.5,
                             "lr": 0.01, "duration_s": 0.25, "samples_per_s": 4000.0, "grad_norm": 1,
                             "grad_norm_per_layer": {"0.weight": 0.5, "0.bias": 1.0}, "train_accuracy": None,
                             "val_r2": None}
    assert read(rendered=set(range(1, 7))) == by_columns
    assert read(rendered={1, 2, 3}) == by_columns


def test_rendered_histories_keep_the_most_recently_read_within_their_bytes():
    histories = RenderedHistories(capacity=160)
    for job_id in "abcd":
        histories.put(job_id, 3, job_id.encode() * 40)
    assert histories.get("a") == (3, b"a" * 40)  # now the most recently used
    histories.put("e", 1, b"e" * 40)  # over capacity: b, the least recently used, goes
    assert histories.get("b") == (0, b"") and histories.get("e") == (1, b"e" * 40)
    histories.put("a", 4, b"a" * 30)  # replaced, not added twice: nothing else goes
    assert histories.get("a") == (4, b"a" * 30) and all(histories.get(j)[0] for j in "cde")
    histories.put("f", 9, b"f" * 41)  # over a quarter of the capacity: not kept at all
    assert histories.get("f") == (0, b"")
