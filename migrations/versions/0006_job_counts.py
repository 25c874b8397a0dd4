"""job counts: a counter row per job and writer

Result writes add to their writer's own row instead of the job's, so a fleet of workers on one job
never queues on the job row's lock; a job's progress is its row's counts plus the sum of these.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("slot", sa.String(length=32), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("n_cancelled", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_counts_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "slot", name=op.f("pk_job_counts")),
    )


def downgrade() -> None:
    # Fold the writers' counts back into the job rows, which alone held them before.
    summed = ", ".join(
        f"{c} = {c} + (SELECT coalesce(sum(k.{c}), 0) FROM job_counts k WHERE k.job_id = jobs.id)"
        for c in ("n_done", "n_failed", "n_cancelled")
    )
    op.execute(f"UPDATE jobs SET {summed}")
    op.drop_table("job_counts")
