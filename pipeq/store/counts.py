"""A job's progress and last sign of life as SQL expressions over its row and its writers' ``job_counts``.

Workers add what they finish to their own ``job_counts`` row (see ``items``), never to the job's row,
so the fleet's writes do not queue on one lock; every read of a job's counts sums them here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, case, func, or_, select

from pipeq.store.base import JOB_COUNTS, JOBS


def _summed(column: Any) -> Any:
    return select(func.coalesce(func.sum(column), 0)).where(JOB_COUNTS.c.job_id == JOBS.c.id).scalar_subquery()


#: Items done, failed and cancelled: the job row's counts (cancel, and stores written before job_counts)
#: plus its writers'.
DONE = JOBS.c.n_done + _summed(JOB_COUNTS.c.n_done)
FAILED = JOBS.c.n_failed + _summed(JOB_COUNTS.c.n_failed)
CANCELLED = JOBS.c.n_cancelled + _summed(JOB_COUNTS.c.n_cancelled)
#: Items in a final state, in one subquery.
COUNTED = (
    JOBS.c.n_done
    + JOBS.c.n_failed
    + JOBS.c.n_cancelled
    + _summed(JOB_COUNTS.c.n_done + JOB_COUNTS.c.n_failed + JOB_COUNTS.c.n_cancelled)
)
#: A writer's last claim or write for the job.
_LAST_WRITE = select(func.max(JOB_COUNTS.c.updated_at)).where(JOB_COUNTS.c.job_id == JOBS.c.id).scalar_subquery()
#: The job's last sign of life for the reconciler: a worker's claim or write, a requeue, or the commit
#: that stored it (``published_at`` and ``created_at`` only for rows written before commits set
#: ``activity_at``).
_OWN = func.coalesce(JOBS.c.activity_at, JOBS.c.published_at, JOBS.c.created_at)
LAST_ACTIVITY = case(
    (and_(_LAST_WRITE.is_not(None), or_(_OWN.is_(None), _LAST_WRITE > _OWN)), _LAST_WRITE),
    else_=_OWN,
)
