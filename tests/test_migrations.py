"""The schema comes only from Alembic, and the migrations match the ORM tables exactly."""

import os

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

from kiln import epoch_counts
from kiln.db import make_engine
from kiln.migrate import check, upgrade


def _upgrade_and_check(url: str) -> None:
    upgrade(url)
    upgrade(url)  # idempotent: a second run is a no-op
    check(url)  # raises if the ORM and the migrated schema differ
    engine = create_engine(url)
    try:
        assert {"jobs", "epoch_metrics", "alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_upgrade_head_has_no_drift(tmp_path):
    _upgrade_and_check(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.skipif(not os.environ.get("KILN_TEST_DATABASE_URL"), reason="set KILN_TEST_DATABASE_URL for PostgreSQL")
def test_postgres_upgrade_head_has_no_drift(database_url):
    _upgrade_and_check(database_url)


def test_epochs_written_before_0009_are_counted_once(make_database):
    url = make_database()
    upgrade(url, "0008")
    durations = [0.004, 0.02, 0.02, 2.0, 7200.0]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # revision 0008's columns, as SQL: today's ORM classes may have more
            conn.execute(text(
                "INSERT INTO jobs (id, owner, status, spec, queue, created_at, epochs_completed, checkpoint_epoch, "
                "attempt, cancel_requested) VALUES ('old', 'default', 'succeeded', '{}', 'kiln', CURRENT_TIMESTAMP, "
                "5, 5, 1, false)"))
            conn.execute(text(
                "INSERT INTO epoch_metrics (job_id, epoch, attempt, train_loss, lr, duration_s, samples_per_s, "
                "created_at) VALUES ('old', :epoch, 1, 1.0, 0.1, :duration, 1.0, CURRENT_TIMESTAMP)"),
                [{"epoch": i, "duration": d} for i, d in enumerate(durations, 1)])
        upgrade(url)
        with Session(engine) as session:
            cumulative, count, total = epoch_counts.histogram(session)
    finally:
        engine.dispose()
    assert dict(cumulative) == {0.01: 1, 0.05: 3, 0.1: 3, 0.5: 3, 1: 3, 5: 4, 10: 4, 30: 4, 60: 4, 300: 4, 900: 4,
                                3600: 4}
    assert count == 5 and total == pytest.approx(sum(durations))
