"""layer metrics: which adapter ran each module, and its rank-importance sparsity

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('sparsity', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('layer_metrics', schema=None) as batch_op:
        batch_op.drop_column('sparsity')
        batch_op.drop_column('adapter')
