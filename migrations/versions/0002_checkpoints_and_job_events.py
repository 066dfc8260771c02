"""checkpoints, metric attempts and job events

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('job_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events'))
    )
    op.create_index('ix_job_events_job_id_id', 'job_events', ['job_id', 'id'])
    # Existing rows get a value, then the default is dropped so the schema matches the ORM exactly.
    with op.batch_alter_table('epoch_metrics') as batch_op:
        batch_op.add_column(sa.Column('attempt', sa.Integer(), nullable=False, server_default='1'))
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('checkpoint_epoch', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('epoch_metrics') as batch_op:
        batch_op.alter_column('attempt', server_default=None)
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.alter_column('checkpoint_epoch', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('checkpoint_epoch')
    with op.batch_alter_table('epoch_metrics') as batch_op:
        batch_op.drop_column('attempt')
    op.drop_index('ix_job_events_job_id_id', 'job_events')
    op.drop_table('job_events')
