"""The ``pipeq`` command line: logs go to stderr, data (job ids, results) to stdout.

Exit codes: 0 success; 1 a waited-for job finished with failed or cancelled items;
2 bad usage, bad input or configuration (nothing was queued); 3 the store or broker is unreachable,
or the store is full (its disk, or its size limit: the write was rolled back, free space and retry).
Errors are one line on stderr, never a traceback with the statement's values (the users' texts).
Commands live by concept (``jobs``, ``worker``, ``admin``) on the one app of ``base``.
"""

from __future__ import annotations

from pipeq.cli import admin, jobs, worker
from pipeq.cli.base import app

__all__ = ["app", "main"]
_COMMANDS = (admin, jobs, worker)  # imported for the commands they register on the app


def main() -> None:
    """Console-script entry point."""
    app()
