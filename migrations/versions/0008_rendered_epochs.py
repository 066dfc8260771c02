"""each epoch's JSON, rendered when the worker writes it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before stay NULL: the API renders those from their columns, as it did.
    with op.batch_alter_table('epoch_metrics') as batch:
        batch.add_column(sa.Column('rendered', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('epoch_metrics') as batch:
        batch.drop_column('rendered')
