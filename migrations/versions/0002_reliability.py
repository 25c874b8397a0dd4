"""reliability: job activity for the reconciler, a worker's current job

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("activity_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("requeues", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("current_job", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("items_done", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("items_done")
        batch_op.drop_column("current_job")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("requeues")
        batch_op.drop_column("activity_at")
