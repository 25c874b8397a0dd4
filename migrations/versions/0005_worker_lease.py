"""worker lease: the items of the message a worker runs

A worker writes its claim (job, item indices, whether the message ends a slice of the job's
window) on its own row with the claim itself; when its heartbeat stops, a live worker on the same
queue marks it lost and queues the still-pending items again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("lease")
