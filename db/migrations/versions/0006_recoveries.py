"""recoveries: LoRA recovery of a run with per-layer ranks (uniform, error-proportional or RankAdaptor's search)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('recoveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('ranks', sa.JSON(), nullable=False),
    sa.Column('trainable_params', sa.Integer(), nullable=False),
    sa.Column('train_tokens', sa.Integer(), nullable=False),
    sa.Column('eval_tokens', sa.Integer(), nullable=False),
    sa.Column('perplexity_before', sa.Float(), nullable=False),
    sa.Column('perplexity_after', sa.Float(), nullable=False),
    sa.Column('dense_perplexity', sa.Float(), nullable=False),
    sa.Column('measured_flop_reduction_after', sa.Float(), nullable=False),
    sa.Column('search_history', sa.JSON(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id')
    )
    with op.batch_alter_table('recoveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recoveries_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('recoveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recoveries_run_id'))
    op.drop_table('recoveries')
