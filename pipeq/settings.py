"""Typed settings, read once at an entry point (the CLI or ``Client()``) and passed down."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeq import constants
from pipeq.errors import ConfigurationError

_NUMBERS: dict[str, type[int] | type[float]] = {
    "chunk_size": int,
    "max_text_chars": int,
    "max_job_items": int,
    "visibility_timeout": int,
    "stalled_after": float,
    "reconcile_interval": float,
    "dead_after": float,
    "lost_after": float,
    "store_retry_budget": float,
}


@dataclass(frozen=True)
class Settings:
    """Where pipeq's broker and store live, and the limits applied at submit."""

    broker_url: str = constants.DEFAULT_BROKER_URL
    database_url: str = constants.DEFAULT_DATABASE_URL
    #: Items per broker message; None sizes messages from the live workers' measured speed.
    chunk_size: int | None = None
    max_text_chars: int = constants.DEFAULT_MAX_TEXT_CHARS
    max_job_items: int = constants.DEFAULT_MAX_JOB_ITEMS
    visibility_timeout: int = constants.DEFAULT_VISIBILITY_TIMEOUT
    #: Seconds without progress after which the reconciler queues a job's pending items again.
    stalled_after: float = constants.DEFAULT_STALLED_AFTER
    #: Seconds between a worker's reconciler passes over its queue (0 turns them off).
    reconcile_interval: float = constants.DEFAULT_RECONCILE_INTERVAL
    #: Seconds without a heartbeat after which a worker counts as dead and a live one on its queue
    #: queues its claimed items again (0 turns takeovers off).
    dead_after: float = constants.DEFAULT_DEAD_AFTER
    #: Seconds without progress after which a job whose queue is empty on the broker, and none of whose
    #: pending items a live worker holds, has its window published again (0 turns the check off).
    lost_after: float = constants.DEFAULT_LOST_AFTER
    #: Seconds a worker keeps retrying an unreachable store before it hands its message back.
    store_retry_budget: float = constants.DEFAULT_STORE_RETRY_BUDGET
    #: Extra kombu transport options (``PIPEQ_BROKER_OPTIONS``, a JSON object).
    broker_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``PIPEQ_*`` variables, then apply non-None overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("PIPEQ_BROKER_URL"):
            values["broker_url"] = env["PIPEQ_BROKER_URL"]
        if env.get("PIPEQ_DATABASE_URL"):
            values["database_url"] = env["PIPEQ_DATABASE_URL"]
        for name, kind in _NUMBERS.items():
            raw = env.get(f"PIPEQ_{name.upper()}")
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ConfigurationError(f"PIPEQ_{name.upper()}={raw!r} is not a number") from None
        if env.get("PIPEQ_BROKER_OPTIONS"):
            try:
                options = json.loads(env["PIPEQ_BROKER_OPTIONS"])
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"PIPEQ_BROKER_OPTIONS is not valid JSON: {exc}") from None
            if not isinstance(options, dict):
                raise ConfigurationError("PIPEQ_BROKER_OPTIONS must be a JSON object")
            values["broker_options"] = options
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)

    def masked(self) -> dict[str, str]:
        """Settings safe to log: credentials in URLs replaced by ``***``."""
        return {"broker_url": mask_url(self.broker_url), "database_url": mask_url(self.database_url)}


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@]*)(:(?P<pw>[^@/]*))?@")


def mask_url(url: str) -> str:
    """Hide the password (and keep the user) in every URL found in ``url``."""

    def _sub(m: re.Match[str]) -> str:
        if m.group("pw") is None:
            return m.group(0)
        return f"{m.group('scheme')}{m.group('user')}:***@"

    return _CREDENTIALS.sub(_sub, url)
