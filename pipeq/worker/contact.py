"""A worker's contact with the store: when its view of the other workers' heartbeats can be trusted."""

from __future__ import annotations

import time
from collections.abc import Callable


class StoreContact:
    """How long this worker has reached the store without a break, and so whether it may judge others dead.

    When the store is unreachable (a server restart, a network cut) or busy past a heartbeat (SQLite's
    write lock held by a long submit), every worker's heartbeats wait or fail alike. The first to get
    through would find the others' heartbeats old and declare them lost, though they only waited too. So
    a worker judges others only after ``dead_after`` seconds of its own unbroken contact with the store:
    by then every live worker that waited as it did has written a heartbeat again.

    A store call that failed breaks the contact; one that took longer than ``slow_after`` (a heartbeat's
    interval) breaks it too, and the contact starts again when that call returns.
    """

    def __init__(self, dead_after: float, slow_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.dead_after = dead_after
        self.slow_after = slow_after
        self._clock = clock
        #: When the current unbroken contact began (monotonic seconds); None while cut off.
        self._since: float | None = None

    def reached(self, began: float) -> None:
        """A store call that began at ``began`` (monotonic) has just succeeded."""
        ended = self._clock()
        if ended - began > self.slow_after:
            self._since = ended  # it waited: everyone's calls waited as long
        elif self._since is None:
            self._since = began

    def lost(self) -> None:
        """A store call failed: the store was unreachable."""
        self._since = None

    def may_judge(self) -> bool:
        """Whether this worker has reached the store without a break for ``dead_after`` seconds."""
        return self._since is not None and self._clock() - self._since >= self.dead_after
