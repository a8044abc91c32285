"""presets, job labels and outputs, the model revision, tenants' input buckets

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "presets",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("labels", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_presets_tenant_id_tenants", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_presets"),
    )
    op.add_column("jobs", sa.Column("labels", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("preset", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("outputs_requested", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("output_keys", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("model_revision", sa.Text(), nullable=True))
    op.add_column("tenants", sa.Column("input_buckets", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "input_buckets")
    op.drop_column("jobs", "model_revision")
    op.drop_column("jobs", "output_keys")
    op.drop_column("jobs", "outputs_requested")
    op.drop_column("jobs", "preset")
    op.drop_column("jobs", "labels")
    op.drop_table("presets")
