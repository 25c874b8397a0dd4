"""item vectors: pooled embeddings stored as binary instead of JSON text

``items.vector`` and ``result_cache.vector`` hold a pooled embedding as a 4-byte type header (``<f4``
or ``<f2``) and its values little-endian (``pipeq.vectors``); ``output`` is then NULL. Outputs written
before stay JSON and read the same. The downgrade writes every vector back as the JSON list of
floats it was before, so nothing is lost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Rows converted back to JSON per statement on downgrade.
_PAGE = 2000


def upgrade() -> None:
    for table in ("items", "result_cache"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("vector", sa.LargeBinary(), nullable=True))


def _values(blob: bytes) -> list[float | None]:
    """A stored vector's values as JSON numbers (the format of ``pipeq.vectors``, read here on its own)."""
    code = bytes(blob[:4]).rstrip(b"\0").decode()
    if code not in ("<f4", "<f2"):
        raise ValueError(f"items.vector holds an unknown type {code!r}")
    array = np.frombuffer(blob, dtype=code, offset=4).astype(np.float32)
    return [v if np.isfinite(v) else None for v in array.tolist()]


def _to_json(table: sa.Table, keys: Sequence[str]) -> None:
    """Move every vector of ``table`` back into its JSON ``output``, a page at a time, in key order."""
    bind = op.get_bind()
    cols = [table.c[k] for k in keys]
    update = (
        sa.update(table)
        .where(*(c == sa.bindparam(f"k_{c.name}") for c in cols))
        .values(output=sa.bindparam("k_output"), vector=None)
    )
    while True:
        rows = bind.execute(
            sa.select(*cols, table.c.vector).where(table.c.vector.is_not(None)).order_by(*cols).limit(_PAGE)
        ).all()
        if not rows:
            return
        bind.execute(
            update,
            [{**{f"k_{k}": row[i] for i, k in enumerate(keys)}, "k_output": _values(row[-1])} for row in rows],
        )


def downgrade() -> None:
    items = sa.table(
        "items", sa.column("job_id", sa.String), sa.column("idx", sa.Integer),
        sa.column("output", sa.JSON), sa.column("vector", sa.LargeBinary),
    )  # fmt: skip
    cache = sa.table("result_cache", sa.column("key", sa.String), sa.column("output", sa.JSON),
                     sa.column("vector", sa.LargeBinary))  # fmt: skip
    _to_json(items, ("job_id", "idx"))
    _to_json(cache, ("key",))
    for table in ("result_cache", "items"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("vector")
