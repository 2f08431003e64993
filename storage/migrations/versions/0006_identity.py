"""identity: managed API keys, server-side web sessions, the audit log

Revision ID: 0006_identity
Revises: 0005_jobs_tenant_started
Create Date: 2026-12-07 16:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006_identity'
down_revision = '0005_jobs_tenant_started'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant', sa.String(length=100), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('rotated_to', sa.String(length=40), nullable=True),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('secret_hash'),
    )
    op.create_index('ix_api_keys_tenant', 'api_keys', ['tenant'])
    op.create_index('ix_api_keys_created_at', 'api_keys', ['created_at'])
    op.create_table(
        'web_sessions',
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('tenant', sa.String(length=100), nullable=False),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('principal', sa.String(length=255), nullable=False),
        sa.Column('key_digest', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('token_hash'),
    )
    op.create_index('ix_web_sessions_tenant', 'web_sessions', ['tenant'])
    op.create_index('ix_web_sessions_principal', 'web_sessions', ['principal'])
    op.create_index('ix_web_sessions_expires_at', 'web_sessions', ['expires_at'])
    op.create_table(
        'audit_events',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('tenant', sa.String(length=100), nullable=True),
        sa.Column('principal', sa.String(length=255), nullable=True),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('method', sa.String(length=8), nullable=False),
        sa.Column('path', sa.String(length=1024), nullable=False),
        sa.Column('object_id', sa.String(length=255), nullable=True),
        sa.Column('status_code', sa.Integer(), nullable=False),
        sa.Column('client', sa.String(length=255), nullable=True),
        sa.Column('request_id', sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_audit_events_created_at', 'audit_events', ['created_at'])
    op.create_index('ix_audit_events_action', 'audit_events', ['action'])
    op.create_index('ix_audit_events_tenant_created_at', 'audit_events', ['tenant', 'created_at'])


def downgrade() -> None:
    op.drop_table('audit_events')
    op.drop_table('web_sessions')
    op.drop_table('api_keys')
