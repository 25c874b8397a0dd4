"""precision choice: how --precision auto chose, on the worker row

The measured speeds, each lower precision's agreement with fp32 on the calibration texts, the
precisions refused and why, the thresholds and a one-line summary, shown by ``pipeq workers`` and
the report (before, the speeds alone lived in the row's settings).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("precision_choice", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("precision_choice")
