"""An in-memory Redis over TCP (fakeredis), for a private broker where no ``redis-server`` is installed.

Run as ``python -m pipeq.broker.embedded --port N``; it serves until it is terminated. It speaks
enough of Redis for Celery's Redis transport (lists, BRPOP, MULTI/EXEC, sorted sets, and the Lua
scripts of kombu's locks and bindings, through lupa), keeps everything in this one process's
memory, and runs every command in Python.
"""

from __future__ import annotations

import argparse


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve an empty in-memory Redis on ``host:port`` until the process is terminated."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, port))
    server.daemon_threads = True  # a terminated server does not wait for its clients to hang up
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeq.broker.embedded", description=serve.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    serve(args.port, args.host)


if __name__ == "__main__":
    main()
