"""The schema comes only from Alembic, and the migrations match the ORM tables exactly."""

import os

import pytest
from sqlalchemy import create_engine, inspect

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
