"""items.job_id without a foreign key

Storing a job inserts its items page by page after the job's own row; the foreign key on
``items.job_id`` then looked that row up once for every item inserted (a trigger a row on PostgreSQL),
about 30% of the server's time to store a job. pipeq writes the job's row before its items and deletes
a job's items with it (``Store.delete_job``), so the key guarded nothing pipeq could break. On SQLite
the table is rebuilt (batch mode), as SQLite cannot drop a constraint in place.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 21:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_items_job_id_jobs"


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")


def downgrade() -> None:
    op.execute("DELETE FROM items WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = items.job_id)")
    with op.batch_alter_table("items") as batch:
        batch.create_foreign_key(FOREIGN_KEY, "jobs", ["job_id"], ["id"], ondelete="CASCADE")
