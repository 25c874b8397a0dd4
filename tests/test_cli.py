"""CLI conventions: --version, --help with an example on every command, shell completion, exit codes, -v/-q."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pipeq import __version__
from pipeq.cli import app

COMMANDS = sorted(
    name
    for name, command in typer.main.get_command(app).commands.items()  # type: ignore[attr-defined]
    if not hasattr(command, "commands")  # the `db` group: its subcommands are listed below
)


def test_version() -> None:
    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"pipeq {__version__}"


@pytest.mark.parametrize("command", [*COMMANDS, "db upgrade", "db downgrade"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = CliRunner().invoke(app, [*command.split(), "--help"], terminal_width=200)
    assert out.exit_code == 0
    assert re.search(r"Example: .*pipeq ", out.stdout), out.stdout


def test_the_command_list_and_shell_completion() -> None:
    out = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert {"worker", "submit", "status", "results", "report", "jobs", "reconcile", "workers"} <= set(COMMANDS)
    assert "--install-completion" in out.stdout and "--show-completion" in out.stdout


def test_logs_go_to_stderr_and_data_to_stdout(tmp_path: object) -> None:
    # Exit code 2 for bad usage, the message on stderr; nothing on stdout for a script to misread.
    proc = subprocess.run(
        [sys.executable, "-m", "pipeq", "-q", "status", "no-such-job", "--database-url", "sqlite:///:memory:"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3 and proc.stdout == ""
    assert "has no pipeq schema" in proc.stderr


def test_exit_codes_are_documented() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.search(r"Exit codes: `0` success; `1` .*`2` bad", readme.replace("\n", " "))
