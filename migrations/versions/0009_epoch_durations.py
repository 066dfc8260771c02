"""epochs counted by duration as they are written, so /metrics no longer reads every epoch

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
import math
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# kiln.epoch_counts.EPOCH_BUCKETS as of this revision.
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def upgrade() -> None:
    durations = op.create_table(
        'epoch_durations',
        sa.Column('worker', sa.String(length=200), nullable=False),
        sa.Column('le', sa.Float(), nullable=False),
        sa.Column('epochs', sa.BigInteger(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('worker', 'le'),
    )
    # The epochs trained before this revision, counted once, under a worker name of their own.
    metrics = sa.table('epoch_metrics', sa.column('duration_s', sa.Float()))
    index = sa.case(*((metrics.c.duration_s <= bound, i) for i, bound in enumerate(BUCKETS)), else_=len(BUCKETS))
    buckets = sa.select(index.label('i'), metrics.c.duration_s).subquery()
    counted = op.get_bind().execute(
        sa.select(buckets.c.i, sa.func.count(), sa.func.sum(buckets.c.duration_s)).group_by(buckets.c.i)
    ).all()
    op.bulk_insert(durations, [
        {'worker': 'before 0009', 'le': BUCKETS[i] if i < len(BUCKETS) else math.inf, 'epochs': n, 'seconds': s}
        for i, n, s in counted
    ])


def downgrade() -> None:
    op.drop_table('epoch_durations')
