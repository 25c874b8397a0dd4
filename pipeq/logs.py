"""Logging set-up for the CLI (library code only ever calls ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging
import os
import warnings

from pipeq.settings import mask_url

#: Loggers of libraries that a worker's imports wake, and that say at WARNING what is no news to a user of pipeq:
#: torchao's CUDA-only libraries it cannot load and the Triton it does not find (on a CPU host), torch's
#: notices to library authors (``register_constant`` on an Enum). Shown with ``-v``.
IMPORT_NOISE = ("torchao", "torch.utils._pytree")
#: Celery's multi-line SecurityWarning for a worker run as root: ``pipeq worker`` says it in one line instead.
ROOT_WARNING = "You're running the worker with superuser privileges"
#: Warnings categories that speak to library authors, not to a user of pipeq; shown with ``-v``.
AUTHOR_WARNINGS: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class MaskingFormatter(logging.Formatter):
    """Replace passwords in URLs with ``***`` anywhere in a formatted record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_url(super().format(record))


def configure(verbosity: int = 0) -> None:
    """Log to stderr: WARNING with -q, INFO by default, DEBUG with -v (and then every library's notices)."""
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
    for noisy in IMPORT_NOISE:
        logging.getLogger(noisy).setLevel(logging.NOTSET if verbosity > 0 else logging.ERROR)
    if verbosity <= 0:
        for category in AUTHOR_WARNINGS:  # from third-party code; pipeq's own still show
            warnings.filterwarnings("ignore", category=category, module=r"(?!pipeq\b)")
        warnings.filterwarnings("ignore", message=ROOT_WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
