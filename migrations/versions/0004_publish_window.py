"""publish window, result cache, shadow check, worker time accounting

How far a job's items have been published and its chunk size (the moving window); the opt-in
result cache and its hits; int8 shadow-check figures on the job; busy and SQL-write seconds per
worker.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 05:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("publish_cursor", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("chunk_size", sa.Integer(), server_default="256", nullable=False))
        batch_op.add_column(sa.Column("use_cache", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("cache_hits", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("shadow", sa.JSON(), nullable=True))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached", sa.Boolean(), nullable=True))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("busy_seconds", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("write_seconds", sa.Float(), server_default="0", nullable=False))
    op.create_table(
        "result_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=1024), nullable=False),
        sa.Column("revision", sa.String(length=255), nullable=True),
        sa.Column("precision", sa.String(length=16), nullable=False),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("hits", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_result_cache")),
    )


def downgrade() -> None:
    op.drop_table("result_cache")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("write_seconds")
        batch_op.drop_column("busy_seconds")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("cached")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("shadow")
        batch_op.drop_column("cache_hits")
        batch_op.drop_column("use_cache")
        batch_op.drop_column("chunk_size")
        batch_op.drop_column("publish_cursor")
