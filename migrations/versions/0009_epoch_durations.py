"""epochs counted by duration as they are written, so /metrics no longer reads every epoch

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# kiln.epoch_counts.EPOCH_BUCKETS as of this revision.
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
INFINITY = {'postgresql': "'Infinity'::float8", 'sqlite': '9e999'}  # SQLite reads 9e999 as +Inf


def upgrade() -> None:
    durations = op.create_table(
        'epoch_durations',
        sa.Column('le', sa.Float(), nullable=False),
        sa.Column('epochs', sa.BigInteger(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('le'),
    )
    # The epochs written before this revision, counted once; one statement, so `alembic upgrade --sql` prints it.
    metrics = sa.table('epoch_metrics', sa.column('duration_s', sa.Float()))
    past_last = sa.literal_column(INFINITY[op.get_context().dialect.name])
    le = sa.case(*((metrics.c.duration_s <= bound, sa.literal(float(bound))) for bound in BUCKETS), else_=past_last)
    bucketed = sa.select(le.label('le'), metrics.c.duration_s).subquery()
    counted = sa.select(bucketed.c.le, sa.func.count(), sa.func.sum(bucketed.c.duration_s)).group_by(bucketed.c.le)
    op.execute(durations.insert().from_select(['le', 'epochs', 'seconds'], counted))


def downgrade() -> None:
    op.drop_table('epoch_durations')
