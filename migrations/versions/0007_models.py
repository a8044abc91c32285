"""fine-tuned models: the bases workers serve, tenants' decoders, a job's requested model

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_bases",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("revision", sa.Text(), nullable=True),
        sa.Column("decoder", postgresql.JSONB(), nullable=False),
        sa.Column("projection_dim", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_served_bases"),
    )
    op.create_table(
        "tuned_models",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("revision", sa.String(80), nullable=False),
        sa.Column("base_id", sa.Text(), nullable=False),
        sa.Column("base_revision", sa.Text(), nullable=True),
        sa.Column("labels", postgresql.JSONB(), nullable=False),
        sa.Column("metrics", postgresql.JSONB(), nullable=False),
        sa.Column("prompt_tuning", sa.Boolean(), nullable=False),
        sa.Column("weights_key", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_tuned_models_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_tuned_models"),
    )
    op.add_column("jobs", sa.Column("model_ref", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "model_ref")
    op.drop_table("tuned_models")
    op.drop_table("served_bases")
