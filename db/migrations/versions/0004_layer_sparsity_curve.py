"""layer metrics: the whole rank- (neuron-) importance sparsity curve

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sparsity_curve', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.drop_column('sparsity_curve')
