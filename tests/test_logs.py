"""A worker's log starts with pipeq's own lines: libraries' import notices and Celery's root warning only with -v."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

#: A line of pipeq's log format from one of pipeq's own loggers.
PIPEQ_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) pipeq[.:]")
#: What the libraries a worker imports print at start: torchao's libraries and Triton, torch's notices, Celery's
#: superuser warning.
NOISE = re.compile(r"torchao|[Tt]riton|_pytree|SecurityWarning|superuser privileges")


def worker_log(tmp_path: Path, model: str, sqlite_url: str, redis_url: str, *flags: str) -> list[str]:
    """stderr of ``pipeq [flags] worker`` up to its first pool child's ready line; the worker is then stopped."""
    env = {**os.environ, "PIPEQ_BROKER_URL": redis_url, "PIPEQ_DATABASE_URL": sqlite_url}
    path = tmp_path / f"worker{'-'.join(flags)}.log"
    task = ["--task", "feature-extraction", "--model", model, "--precision", "fp32", "--no-warmup"]
    with open(path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeq", *flags, "worker", *task],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while " ready on " not in path.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, path.read_text(errors="replace")[-4000:]
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return path.read_text(errors="replace").splitlines()


@pytest.mark.integration
def test_a_workers_log_starts_with_pipeqs_own_lines(
    tmp_path: Path, model_dir: Callable[[str], str], sqlite_url: str, redis_url: str
) -> None:
    # Given the libraries that make noise at start: torchao (the dev extra installs it) and, as root, Celery
    assert importlib.util.find_spec("torchao") is not None, "torchao makes the import noise this test is about"
    root = os.geteuid() == 0
    model = model_dir("feature-extraction")
    # When a worker starts at the default verbosity
    lines = worker_log(tmp_path, model, sqlite_url, redis_url)
    # Then everything up to its "serving" line is pipeq's, and no library's notice shows anywhere
    serving = next(i for i, line in enumerate(lines) if "serving " in line)
    assert all(PIPEQ_LINE.match(line) for line in lines[: serving + 1]), "\n".join(lines[: serving + 1])
    assert not [line for line in lines if NOISE.search(line)], "\n".join(lines)
    # And as root, one pipeq line says what Celery's warning said
    assert any(PIPEQ_LINE.match(line) and "running as root" in line for line in lines) == root
    # When it starts with -v, every library's notice shows
    verbose = "\n".join(worker_log(tmp_path, model, sqlite_url, redis_url, "-v"))
    assert "torchao" in verbose
    assert ("SecurityWarning" in verbose) == root
