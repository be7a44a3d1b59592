"""layer_metrics: the keep fraction the allocation chose for each module (hybrid: per QKV and per MLP)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('planned_keep', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.drop_column('planned_keep')
