"""The arrows between pipeq's packages (docs/architecture.md) hold: read from every module's own imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeq"

#: What each part of pipeq may import (besides itself). Keep in step with docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "constants": set(),
    "errors": set(),
    "primitives": {"constants"},
    "settings": {"constants", "errors"},
    "logs": {"settings"},
    "precisions": {"constants", "errors"},
    "agreement": {"constants", "errors", "vectors"},
    "routing": {"constants", "errors", "precisions", "generation"},
    "tasks": {"errors"},
    "embedding": {"errors", "vectors"},
    "recipe": {"embedding", "errors"},
    "vectors": set(),
    "ordering": set(),
    "generation": {"errors"},
    "cache": set(),
    "models": {"primitives"},
    "store": {"models", "primitives", "cache", "routing", "settings", "errors", "constants", "vectors", "ordering"},
    "broker": {"store", "primitives", "settings", "errors", "constants"},
    "report": {"store", "primitives", "errors", "constants", "agreement", "generation"},
    "progress": {"store", "primitives", "constants"},
    "producer": {
        "broker", "store", "primitives", "routing", "precisions", "tasks", "embedding", "recipe", "settings",
        "errors", "constants", "progress", "vectors", "generation",
    },
    "worker": {
        "broker", "store", "primitives", "routing", "precisions", "tasks", "embedding", "settings", "errors",
        "constants", "cache", "vectors", "agreement", "generation",
    },
    "demo": {"producer", "broker", "routing", "settings", "errors", "constants", "store"},
    "cli": {
        "broker", "store", "primitives", "routing", "precisions", "tasks", "settings", "errors", "constants",
        "producer", "worker", "report", "progress", "demo", "logs", "__init__", "agreement",
    },
    "__init__": {"producer", "settings", "errors"},
    "__main__": {"cli"},
    "data": set(),
    "_migrations": set(),
}  # fmt: skip


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"] if rel.parts != ("__init__",) else []
        yield ".".join(["pipeq", *parts]), path


def _part(module: str) -> str:
    """The part of pipeq a module belongs to: its first name under ``pipeq``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The pipeq modules ``path`` imports (``from pipeq import x`` counts as ``pipeq.x``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], nested: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pipeq"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "pipeq":  # a submodule, or a name of pipeq/__init__.py
                    found.update(f"pipeq.{a.name}" if _is_module(a.name) else "pipeq" for a in node.names)
                elif node.module.startswith("pipeq."):
                    found.add(node.module)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue  # annotations only: no import at run time
            if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if isinstance(node, ast.ClassDef):
                    visit(node.body, nested)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([c for c in children if isinstance(c, ast.stmt | ast.ExceptHandler)], nested)  # type: ignore[misc]

    visit(tree.body, False)
    return found


def test_every_part_of_pipeq_is_named_in_the_map() -> None:
    parts = {_part(module) for module, _ in _modules()}
    assert parts <= set(ALLOWED), f"parts with no rule in ALLOWED: {sorted(parts - set(ALLOWED))}"


@pytest.mark.parametrize(("module", "path"), list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_follow_the_arrows(module: str, path: Path) -> None:
    part = _part(module)
    allowed = ALLOWED[part] | {part}
    wrong = sorted(m for m in _imports(path, top_level_only=False) if _part(m) not in allowed)
    assert not wrong, f"{module} ({part}) may import {sorted(ALLOWED[part])} but imports {wrong}"


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "with-function-level"])
def test_no_import_cycles(top_level_only: bool) -> None:
    """Imports form no cycle: at module level (a cycle there fails at import time), nor counting the imports
    inside functions (a cycle there is two modules that each need the other: one concept split in two)."""
    graph = {module: _imports(path, top_level_only=top_level_only) for module, path in _modules()}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_store_and_the_tables_import_sqlalchemy() -> None:
    users = sorted(
        module
        for module, path in _modules()
        if _part(module) not in {"store", "models"} and "sqlalchemy" in path.read_text()
    )
    assert not users, f"SQL outside pipeq.store: {users}"


def test_the_map_can_fail() -> None:
    # Given a module of the store that imported the worker, the arrow check would name it.
    assert "worker" not in ALLOWED["store"] and "producer" not in ALLOWED["worker"]
    assert all("cli" not in deps for part, deps in ALLOWED.items() if part != "__main__")


#: What the worker's engines may import inside pipeq: no store, no broker, nor the worker parts that use them.
ENGINE_ALLOWED = {"pipeq.worker.engines", "pipeq.worker.serialize", "pipeq.worker.config", "pipeq.worker.embedding"}


@pytest.mark.parametrize(
    ("module", "path"),
    [(m, p) for m, p in _modules() if m.startswith("pipeq.worker.engines")],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
def test_the_engines_know_no_store_and_no_broker(module: str, path: Path) -> None:
    """An engine takes (idx, input) pairs and yields steps: it is tested without a database or a broker."""
    wrong = sorted(
        m
        for m in _imports(path, top_level_only=False)
        if _part(m) in {"store", "broker", "producer", "models"}
        or (_part(m) == "worker" and not any(m == a or m.startswith(a + ".") for a in ENGINE_ALLOWED))
    )
    assert not wrong, f"{module} imports {wrong}"
