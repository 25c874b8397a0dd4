"""Logging set-up for the CLI (library code only ever calls ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging
import os

from pipeq.settings import mask_url


class MaskingFormatter(logging.Formatter):
    """Replace passwords in URLs with ``***`` anywhere in a formatted record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_url(super().format(record))


def configure(verbosity: int = 0) -> None:
    """Log to stderr: WARNING with -q, INFO by default, DEBUG with -v."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # transformers and huggingface_hub are chatty at INFO (progress bars, notices).
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Alembic logs a line per plugin and per migration: pipeq's own lines only, unless -v.
    logging.getLogger("alembic").setLevel(logging.NOTSET if verbosity > 0 else logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
