"""each job's Celery queue, chosen from its spec's resources

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs submitted before resources existed were all CPU jobs on the default queue.
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('queue', sa.String(length=100), server_default='kiln', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('queue')
