"""checkpoint_imports: checkpoints imported by reference (s3://, https://, models:/, runs:/)

Revision ID: 0007_imports
Revises: 0006_identity
Create Date: 2026-12-07 16:40:00
"""
import sqlalchemy as sa
from alembic import op



revision = '0007_imports'
down_revision = '0006_identity'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'checkpoint_imports',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant', sa.String(length=100), nullable=False),
        sa.Column('source', sa.String(length=2048), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('checkpoint_id', sa.String(length=40), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('claimed_by', sa.String(length=255), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('checkpoint_imports', schema=None) as batch_op:
        batch_op.create_index('ix_checkpoint_imports_tenant', ['tenant'], unique=False)
        batch_op.create_index('ix_checkpoint_imports_status', ['status'], unique=False)
        batch_op.create_index('ix_checkpoint_imports_created_at', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_table('checkpoint_imports')
