"""jobs: sweeps, attempts, host, device, author, tags; runs: provenance and artifacts; latency results

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('latency_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('device_name', sa.String(length=200), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('engine', sa.String(length=32), nullable=False),
    sa.Column('flop_reduction', sa.Float(), nullable=False),
    sa.Column('measured_flop_reduction', sa.Float(), nullable=True),
    sa.Column('context_tokens', sa.Integer(), nullable=False),
    sa.Column('new_tokens', sa.Integer(), nullable=False),
    sa.Column('ms_per_token', sa.Float(), nullable=False),
    sa.Column('dense_ms_per_token', sa.Float(), nullable=True),
    sa.Column('shapes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'model', 'engine', 'flop_reduction', 'context_tokens')
    )
    with op.batch_alter_table('latency_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_latency_results_job_id'), ['job_id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_attempts', sa.Integer(), server_default='3', nullable=False))
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('host', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('device', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('author', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('tags', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.create_index(batch_op.f('ix_jobs_parent_id'), ['parent_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_parent_id', 'jobs', ['parent_id'], ['id'])

    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('job_id', sa.Integer(), nullable=True))
        batch_op.create_unique_constraint('uq_evaluations_job_id', ['job_id'])
        batch_op.create_foreign_key('fk_evaluations_job_id', 'jobs', ['job_id'], ['id'])

    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('author', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('tags', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column('provenance', sa.JSON(), server_default=sa.text("'{}'"), nullable=False))
        batch_op.add_column(sa.Column('artifact_path', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('artifact_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_runs_author'), ['author'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_constraint('fk_evaluations_job_id', type_='foreignkey')
        batch_op.drop_constraint('uq_evaluations_job_id', type_='unique')
        batch_op.drop_column('job_id')

    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_author'))
        batch_op.drop_column('artifact_sha256')
        batch_op.drop_column('artifact_path')
        batch_op.drop_column('provenance')
        batch_op.drop_column('tags')
        batch_op.drop_column('author')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_parent_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_parent_id'))
        batch_op.drop_column('tags')
        batch_op.drop_column('author')
        batch_op.drop_column('device')
        batch_op.drop_column('host')
        batch_op.drop_column('parent_id')
        batch_op.drop_column('max_attempts')

    with op.batch_alter_table('latency_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_latency_results_job_id'))

    op.drop_table('latency_results')
