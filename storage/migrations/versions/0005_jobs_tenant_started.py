"""jobs: index on (tenant, started_at) for fair dispatch (the last start of each waiting tenant)

Revision ID: 0005_jobs_tenant_started
Revises: 0004_worker_devices
Create Date: 2026-12-01 09:10:00
"""
from alembic import op


revision = '0005_jobs_tenant_started'
down_revision = '0004_worker_devices'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_tenant_started_at', ['tenant', 'started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_started_at')
