"""calibrations: the token budget `pipeq worker --calibrate` measured fastest per model and device

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=1024), nullable=False),
        sa.Column("revision", sa.String(length=255), nullable=True),
        sa.Column("precision", sa.String(length=16), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("device_name", sa.String(length=255), nullable=False),
        sa.Column("max_batch_tokens", sa.Integer(), nullable=False),
        sa.Column("items_per_s", sa.Float(), nullable=False),
        sa.Column("sweep", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    with op.batch_alter_table("calibrations", schema=None) as batch_op:
        batch_op.create_index("ix_calibrations_task_precision_device", ["task", "precision", "device"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("calibrations", schema=None) as batch_op:
        batch_op.drop_index("ix_calibrations_task_precision_device")
    op.drop_table("calibrations")
