"""items in run order: an order key per item, the window's key cursor

``items.order_key`` puts a job's longest items first across the whole job (``pipeq.ordering``);
``ix_items_job_id_order_key`` lets the publish window walk a job in that order a slice at a time;
``jobs.publish_key`` is the window's cursor on that key (items with a smaller key are published).
Items stored before keep their input order: their key is their index, and a job's key cursor starts
where its index cursor was.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("order_key", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("publish_key", sa.BigInteger(), server_default="0", nullable=False))
    op.execute("UPDATE items SET order_key = idx")
    op.execute("UPDATE jobs SET publish_key = publish_cursor")
    op.create_index("ix_items_job_id_order_key", "items", ["job_id", "order_key"])


def downgrade() -> None:
    op.drop_index("ix_items_job_id_order_key", table_name="items")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("publish_key")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("order_key")
