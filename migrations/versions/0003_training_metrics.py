"""gradient norms, train accuracy, R2; early-stopping reason and lr search on jobs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('epoch_metrics') as batch_op:
        batch_op.add_column(sa.Column('grad_norm', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('grad_norm_per_layer', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('train_accuracy', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('val_r2', sa.Float(), nullable=True))
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('stop_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('lr_search', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('lr_search')
        batch_op.drop_column('stop_reason')
    with op.batch_alter_table('epoch_metrics') as batch_op:
        batch_op.drop_column('val_r2')
        batch_op.drop_column('train_accuracy')
        batch_op.drop_column('grad_norm_per_layer')
        batch_op.drop_column('grad_norm')
