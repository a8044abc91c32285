"""model families: the family of each served base (clipseg, sam3), and the base a job runs on

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("served_bases", sa.Column("family", sa.Text(), nullable=False, server_default="clipseg"))
    op.add_column("jobs", sa.Column("base", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "base")
    op.drop_column("served_bases", "family")
