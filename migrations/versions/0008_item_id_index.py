"""item ids: an index on a job's items by their own id

Submit refuses two items of one job with the same id (unless --allow-duplicate-ids): after each
page of items it asks the database for an item whose id an earlier one has, through this index.
Partial (ids only), so jobs of plain texts pay nothing for it. Built CONCURRENTLY on PostgreSQL, so
upgrading a store with millions of items does not block its writers meanwhile.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_items_job_id_input_id"
HAS_ID = sa.text("input_id IS NOT NULL")


def upgrade() -> None:
    with op.get_context().autocommit_block():  # CREATE INDEX CONCURRENTLY cannot run in a transaction
        op.create_index(
            INDEX,
            "items",
            ["job_id", "input_id"],
            postgresql_where=HAS_ID,
            sqlite_where=HAS_ID,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="items", postgresql_concurrently=True)
