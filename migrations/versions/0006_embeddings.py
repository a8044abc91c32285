"""visual prompts, embeddings and similarity search on pgvector

Revision ID: 0006
Revises: 0005

The `vector` column has no fixed length, so that checkpoints of any projection size fit; HNSW
indexes need one, so the index is a partial expression index for the production checkpoint's 512
(`CIDAS/clipseg-rd64-refined`), which queries of that length use (shared/search.py). Vectors of
another length (a dev model) are searched exactly.
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXED_DIMS = 512


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.add_column("jobs", sa.Column("image_prompts", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("embed", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("embedding", postgresql.JSONB(), nullable=True))
    op.add_column("jobs", sa.Column("embedding_model", sa.Text(), nullable=True))
    op.create_table(
        "embeddings",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("result_index", sa.Integer(), nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("dims", sa.Integer(), nullable=False),
        sa.Column("embedding", Vector(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_embeddings_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_embeddings_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_embeddings"),
    )
    op.create_index("ix_embeddings_job", "embeddings", ["job_id", "result_index"])
    op.create_index("ix_embeddings_tenant_scope", "embeddings",
                    ["tenant_id", "model", "dims", sa.text("(result_index IS NULL)"), "batch_id"])
    op.create_index("ix_embeddings_metadata", "embeddings", ["metadata"], postgresql_using="gin",
                    postgresql_ops={"metadata": "jsonb_path_ops"})
    op.execute(f"CREATE INDEX ix_embeddings_hnsw_{INDEXED_DIMS} ON embeddings USING hnsw "
               f"((embedding::vector({INDEXED_DIMS})) vector_cosine_ops) WHERE dims = {INDEXED_DIMS}")


def downgrade() -> None:
    op.drop_table("embeddings")
    op.drop_column("jobs", "embedding_model")
    op.drop_column("jobs", "embedding")
    op.drop_column("jobs", "embed")
    op.drop_column("jobs", "image_prompts")
