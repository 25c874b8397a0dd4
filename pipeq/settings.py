"""Typed settings, read once at an entry point (the CLI or ``Client()``) and passed down."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeq import constants


@dataclass(frozen=True)
class Settings:
    """Where pipeq's broker and store live, and the limits applied at submit."""

    broker_url: str = constants.DEFAULT_BROKER_URL
    database_url: str = constants.DEFAULT_DATABASE_URL
    chunk_size: int = constants.DEFAULT_CHUNK_SIZE
    max_text_chars: int = constants.DEFAULT_MAX_TEXT_CHARS
    max_job_items: int = constants.DEFAULT_MAX_JOB_ITEMS
    visibility_timeout: int = constants.DEFAULT_VISIBILITY_TIMEOUT
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
        for name in ("chunk_size", "max_text_chars", "max_job_items", "visibility_timeout"):
            raw = env.get(f"PIPEQ_{name.upper()}")
            if raw:
                values[name] = int(raw)
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
