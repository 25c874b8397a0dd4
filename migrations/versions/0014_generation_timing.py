"""generation timing: per generated item, the time to its first token, its decode time and its new tokens

``items.first_token_ms`` (milliseconds from the item entering the engine to its first new token),
``items.decode_ms`` (from that token to its last) and ``items.output_tokens`` (the tokens it generated;
``n_tokens`` counts its prompt). NULL for every item that generated nothing: encoder jobs' items, and those
stored before.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("first_token_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("decode_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("output_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("output_tokens")
        batch.drop_column("decode_ms")
        batch.drop_column("first_token_ms")
