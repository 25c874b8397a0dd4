"""job resolved revision: the model revision a job runs on, set by the first worker that claims from it

A local model folder has no commit hash; a worker names its weights by a hash of their files' names,
sizes and modification times. A job takes the revision of the first worker that claims from it, and a
worker with another revision (weights replaced under the same path) does not run its items.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resolved_revision", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resolved_revision")
