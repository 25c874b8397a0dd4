"""CLI conventions: --version, --help with an example on every command, shell completion, exit codes, -v/-q."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    assert "has no pipeq schema or an older one" in proc.stderr


def test_exit_codes_are_documented() -> None:
    from pathlib import Path

    cli_page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert re.search(r"Exit codes: `0` success; `1` .*`2` bad", cli_page.replace("\n", " "))


@pytest.mark.parametrize(
    ("flags", "info", "debug"),
    [([], True, False), (["-q"], False, False), (["-v"], True, True), (["--verbose"], True, True)],
)
def test_quiet_and_verbose_set_what_reaches_stderr(
    flags: list[str], info: bool, debug: bool, sqlite_url: str, model_dir: Callable[[str], str]
) -> None:
    # `submit` logs the stored job at INFO and each published range of items at DEBUG.
    proc = subprocess.run(
        [sys.executable, "-m", "pipeq", *flags, "submit", "-", "--task", "text-classification",
         "--model", model_dir("text-classification"), "--precision", "fp32"],
        input="good\nbad\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIPEQ_BROKER_URL": "memory://", "PIPEQ_DATABASE_URL": sqlite_url},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)  # the data on stdout is the same at every verbosity
    assert bool(re.search(rf"INFO pipeq\.producer\.client: stored job {job_id}: 2 items", proc.stderr)) is info
    assert bool(re.search(rf"DEBUG pipeq\.broker\.window: job {job_id[:8]}: published 2 pending", proc.stderr)) is debug
    if flags == ["-q"]:
        assert " INFO " not in proc.stderr and " DEBUG " not in proc.stderr
    if not debug:
        assert " DEBUG " not in proc.stderr


def test_cli_conventions_are_documented() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    cli_page = (root / "docs" / "cli.md").read_text()
    section = cli_page.split("\n### CLI conventions\n", 1)[1].split("\n## ", 1)[0]
    for flag in ("pipeq --version", "pipeq --install-completion", "-q`/`--quiet", "-v`/`--verbose", "--watch"):
        assert flag in section, flag
    # The ports the CLI reference sends people to are the ones docker-compose.yml publishes.
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    flower_port = services["flower"]["ports"][0].split(":")[0]
    assert f"Flower on port {flower_port}" in section and f"http://localhost:{flower_port}" in section
    command = services["worker"]["command"]
    metrics_port = command[command.index("--metrics-port") + 1]
    assert f"http://localhost:{metrics_port}/metrics" in section


@pytest.mark.parametrize("verbose", [False, True])
def test_db_upgrade_shows_alembic_lines_only_with_v(tmp_path: Path, verbose: bool) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    args = [sys.executable, "-m", "pipeq", *(["-v"] if verbose else []), "db", "upgrade", "--database-url", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"store {url} is at revision head" in proc.stderr
    alembic = [line for line in proc.stderr.splitlines() if " alembic." in line]  # its loggers
    if verbose:
        assert any("Running upgrade" in line for line in alembic)
    else:
        assert alembic == [], "at the default verbosity, pipeq's own lines only"
