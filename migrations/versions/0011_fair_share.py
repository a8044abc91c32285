"""fair share: batch items wait in Postgres until the dispatcher sends them (jobs.dispatched_at,
jobs.lane, jobs.priority), batches' priority, tenants' weight and max_running

Batch jobs queued before this migration already have their messages in Redis: they count as
dispatched when they were created.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("lane", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="1"))
    op.add_column("batches", sa.Column("priority", sa.String(8), nullable=False, server_default="normal"))
    op.add_column("tenants", sa.Column("weight", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("max_running", sa.Integer(), nullable=True))
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE batch_id IS NOT NULL")
    # what the dispatcher reads: a lane's undispatched items, per tenant, in the order they run
    op.create_index("ix_jobs_undispatched", "jobs",
                    ["lane", "tenant_id", sa.text("priority DESC"), "created_at", "id"],
                    postgresql_where=sa.text("dispatched_at IS NULL AND status = 'queued' AND batch_id IS NOT NULL"))
    # what counts against a tenant's max_running and its fair share: its items sent and not finished
    op.create_index("ix_jobs_in_flight", "jobs", ["lane", "tenant_id"],
                    postgresql_where=sa.text("dispatched_at IS NOT NULL AND status IN ('queued', 'running') "
                                             "AND batch_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_jobs_in_flight", table_name="jobs")
    op.drop_index("ix_jobs_undispatched", table_name="jobs")
    op.drop_column("tenants", "max_running")
    op.drop_column("tenants", "weight")
    op.drop_column("batches", "priority")
    op.drop_column("jobs", "priority")
    op.drop_column("jobs", "lane")
    op.drop_column("jobs", "dispatched_at")
