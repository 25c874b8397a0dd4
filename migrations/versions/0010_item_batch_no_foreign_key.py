"""items.batch_id without a foreign key

A result write updates a micro-batch's items and inserts its ``batches`` row in one statement; the
foreign key on ``items.batch_id`` then looked that row up once for every item updated (a trigger a
row), a fifth of the write's time on the server. The id is written only by that statement, and
readers join ``batches`` with an outer join, so the key guarded nothing a write could break. On
SQLite the table is rebuilt (batch mode), as SQLite cannot drop a constraint in place.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_items_batch_id_batches"


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")


def downgrade() -> None:
    # Items whose batch row is gone would fail the key: they lose the reference, as ON DELETE SET NULL did.
    op.execute(
        "UPDATE items SET batch_id = NULL WHERE batch_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM batches WHERE batches.id = items.batch_id)"
    )
    with op.batch_alter_table("items") as batch:
        batch.create_foreign_key(FOREIGN_KEY, "batches", ["batch_id"], ["id"], ondelete="SET NULL")
