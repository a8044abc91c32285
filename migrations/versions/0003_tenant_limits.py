"""per-tenant rate limit and queued-jobs cap overrides

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("rate_limit_per_s", sa.Float(), nullable=True))
    op.add_column("tenants", sa.Column("rate_limit_burst", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("max_queued_jobs", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "max_queued_jobs")
    op.drop_column("tenants", "rate_limit_burst")
    op.drop_column("tenants", "rate_limit_per_s")
