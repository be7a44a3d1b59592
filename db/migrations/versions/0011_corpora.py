"""runs and evaluations: the text behind the numbers, each corpus's name, split rule and digest
(rana_core.corpora); rows from before are Brown's (NULL)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('corpora', sa.JSON(), nullable=True))
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('corpus', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('corpus')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('corpora')
