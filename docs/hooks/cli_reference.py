"""MkDocs hook: render the CLI reference (docs/cli.md) from pipeq's typer app, so it never drifts from the code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: The line of docs/cli.md that the commands' reference replaces.
MARKER = "<!-- pipeq commands -->"
ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    """Every command of `pipeq`, in the order `pipeq --help` lists them: what it does, its arguments and options."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # document this checkout's CLI, not an installed copy's
    import typer

    from pipeq.cli import app

    out: list[str] = []
    _group(typer.main.get_command(app), "pipeq", out)
    return "\n".join(out)


def _group(group: Any, prefix: str, out: list[str]) -> None:
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        if hasattr(command, "commands"):
            _group(command, f"{prefix} {name}", out)
        else:
            _command(command, f"{prefix} {name}", out)


def _command(command: Any, path: str, out: list[str]) -> None:
    out += [f"### `{path}`", ""]
    paragraphs = (command.help or "").strip().split("\n\n")
    examples: list[str] = []
    for paragraph in paragraphs:
        lines = [line for line in paragraph.splitlines() if not line.startswith("Example: ")]
        examples += [line.removeprefix("Example: ") for line in paragraph.splitlines() if line.startswith("Example: ")]
        if lines:
            out += [" ".join(lines), ""]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    usage = " ".join([path, *(["[OPTIONS]"] if options else []), *(p.name.upper() for p in arguments)])
    out += ["```", usage, "```", ""]
    for example in examples:
        out += ["Example:", "", "```bash", example, "```", ""]
    rows = [(f"`{p.name.upper()}`", _text(p.help), "required" if p.required else "") for p in arguments]
    rows += [(_names(p), _text(p.help), _default(p)) for p in options]
    if rows:
        out += ["| argument or option | meaning | default |", "| --- | --- | --- |"]
        out += [f"| {name} | {meaning} | {default} |" for name, meaning, default in rows]
        out.append("")


def _names(option: Any) -> str:
    names = ", ".join(f"`{name}`" for name in option.opts)
    if option.secondary_opts:
        names += " / " + ", ".join(f"`{name}`" for name in option.secondary_opts)
    if not option.is_flag:
        names += " `VALUE`"
    return names


def _default(option: Any) -> str:
    if option.required:
        return "required"
    if option.is_flag:
        return "on" if option.default else ""
    if option.default is None or option.default == "":
        return ""
    return f"`{option.default}`"


def _text(help_text: str | None) -> str:
    return " ".join((help_text or "").split()).replace("|", "\\|")
