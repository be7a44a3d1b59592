"""latency_results: the run a measurement belongs to (a stored run's engine, not a synthetic shape), and per layer
the share of FLOPs its masks kept and the time of its sections in a profiled replay

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('latency_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('layers', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_latency_results_run_id'), ['run_id'], unique=False)
        batch_op.create_foreign_key('fk_latency_results_run_id_runs', 'runs', ['run_id'], ['id'], ondelete='CASCADE')


def downgrade() -> None:
    with op.batch_alter_table('latency_results', schema=None) as batch_op:
        batch_op.drop_constraint('fk_latency_results_run_id_runs', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_latency_results_run_id'))
        batch_op.drop_column('layers')
        batch_op.drop_column('run_id')
