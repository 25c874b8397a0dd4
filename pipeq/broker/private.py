"""A private Redis for one run of ``pipeq demo`` on a machine where none answers.

``redis-server`` when one is on PATH (a free local port, nothing saved, its files in a temporary
directory), otherwise the embedded fakeredis server of ``pipeq.broker.embedded``. Either runs as a
child process in a session of its own (a Ctrl-C in the terminal reaches the demo, which stops it
in order) and is stopped by its pid when the run ends: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeq import constants as C
from pipeq.broker.probe import ping
from pipeq.errors import BrokerError

log = logging.getLogger(__name__)

#: The two kinds of private broker, as the demo names them.
REDIS_SERVER = "redis-server"
EMBEDDED = "embedded fakeredis"


@dataclass(frozen=True)
class PrivateBroker:
    """A running private broker: its URL, what it is and its process."""

    url: str
    kind: str
    pid: int
    port: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(kind: str, port: int, workdir: Path) -> list[str]:
    """The command line of a private broker of ``kind`` on ``port``."""
    if kind == REDIS_SERVER:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BrokerError("no redis-server on PATH")
        return [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no",
        ]  # fmt: skip
    return [sys.executable, "-m", "pipeq.broker.embedded", "--port", str(port)]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a private broker by its pid: SIGTERM, then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=C.PRIVATE_BROKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.debug("private broker (pid %d) stopped with %s", proc.pid, proc.returncode)


def _wait_until_it_answers(proc: subprocess.Popen[bytes], url: str) -> bool:
    """True once ``url`` answers PING; False when the process exits first (its port was taken)."""
    deadline = time.monotonic() + C.PRIVATE_BROKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ping(url, timeout=0.5) is None:
            return True
        time.sleep(0.05)
    waited = C.PRIVATE_BROKER_START_TIMEOUT
    raise BrokerError(f"the private broker (pid {proc.pid}) did not answer within {waited:.0f}s")


@contextmanager
def private_broker(kind: str | None = None) -> Iterator[PrivateBroker]:
    """Start a private Redis (``kind``: redis-server if on PATH, else embedded), yield it, stop it on exit."""
    if kind is None:
        kind = REDIS_SERVER if shutil.which("redis-server") else EMBEDDED
    with tempfile.TemporaryDirectory(prefix="pipeq-broker-") as tmp:
        workdir = Path(tmp)
        for _ in range(C.PRIVATE_BROKER_TRIES):
            port = free_port()
            url = f"redis://127.0.0.1:{port}/0"
            with open(workdir / "broker.log", "wb") as out:
                proc = subprocess.Popen(
                    server_command(kind, port, workdir),
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            try:
                if not _wait_until_it_answers(proc, url):
                    continue  # it exited: try another port
                yield PrivateBroker(url=url, kind=kind, pid=proc.pid, port=port)
                return
            finally:
                stop(proc)
        output = (workdir / "broker.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise BrokerError(f"could not start a private broker ({kind}): {' / '.join(output) or 'no output'}")
