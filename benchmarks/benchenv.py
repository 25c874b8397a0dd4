"""What every benchmark sets before torch and transformers load: offline, quiet, and the tokenizer's
threads as a pipeq worker runs it (pipeq/logs.py), so the in-process loops tokenize under the same rule."""

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: A PostgreSQL server where the benchmarks may create and drop databases (the tests' form of URL).
PG_ADMIN = os.environ.get("PIPEQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database named ``prefix`` and a random suffix, dropped afterwards."""
    import secrets

    import psycopg
    from psycopg import sql

    admin = PG_ADMIN.replace("+psycopg", "", 1)
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def write_block(path: "os.PathLike[str] | str", report: str, begin: str, end: str) -> None:
    """Put ``report`` between the ``begin``/``end`` markers of a results file, keeping everything else around
    them; a file without those markers gets the block appended."""
    from pathlib import Path

    file = Path(path)
    block = f"{begin}\n{report}\n{end}"
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else block + "\n"
    file.write_text(text, encoding="utf-8")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """SIGTERM a process started in a group of its own (a warm shutdown that reaches its pool children too) and
    wait; SIGKILL the group only if it has not ended after ``timeout`` seconds."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
