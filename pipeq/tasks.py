"""Which transformers tasks pipeq serves, and their canonical names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

from pipeq.errors import UnsupportedTaskError

#: Text tasks older transformers had and 5.x removed; named so the error can say so.
REMOVED_IN_TRANSFORMERS_5 = frozenset(
    {"question-answering", "summarization", "translation", "text2text-generation", "conversational"}
)
#: Tasks whose input is text but whose output is not JSON (audio arrays).
_NOT_JSON_OUTPUT = frozenset({"text-to-audio"})


@dataclass(frozen=True)
class TaskTraits:
    """What pipeq does differently for one task; the defaults fit an unknown or custom task."""

    #: Input is text (or a text pair) fed straight to the tokenizer: pipeq can tell if it was truncated.
    truncation_flag: bool = False
    #: Inputs can share a padded forward pass (not so for objects the collator cannot stack: pandas tables).
    batchable: bool = True
    #: Output is per token: padded positions must be cut off after a batched forward.
    per_token_output: bool = False
    #: Synthetic text is a valid input: warm-up and measurement runs can use it.
    synthetic_warmup: bool = False
    #: A record carries a table and a query instead of text.
    table_input: bool = False


#: Traits of the built-in tasks that differ from the defaults; a new task trait is one field above.
TASK_TRAITS: dict[str, TaskTraits] = {
    "text-classification": TaskTraits(truncation_flag=True, synthetic_warmup=True),
    "feature-extraction": TaskTraits(truncation_flag=True, per_token_output=True, synthetic_warmup=True),
    "fill-mask": TaskTraits(truncation_flag=True, synthetic_warmup=True),
    "token-classification": TaskTraits(synthetic_warmup=True),
    "table-question-answering": TaskTraits(batchable=False, table_input=True),
}
_DEFAULT_TRAITS = TaskTraits()


def traits(task: str) -> TaskTraits:
    """The traits of a canonical task name; the defaults for an unknown or custom task."""
    return TASK_TRAITS.get(task, _DEFAULT_TRAITS)


def _cache_file() -> Path:
    version = metadata.version("transformers")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeq" / f"transformers-{version}-tasks.json"


@cache
def _registry() -> tuple[dict[str, str], dict[str, str | None]]:
    """Task aliases and {task: input type} of the installed transformers.

    Importing ``transformers.pipelines`` takes seconds (it imports torch); the answer only
    changes with the transformers version, so it is cached per version on disk.
    """
    path = _cache_file()
    try:
        data = json.loads(path.read_text())
        return data["aliases"], data["types"]
    except (OSError, ValueError, KeyError):
        pass
    from transformers.pipelines import PIPELINE_REGISTRY

    aliases = dict(PIPELINE_REGISTRY.task_aliases)
    types = {name: impl.get("type") for name, impl in PIPELINE_REGISTRY.supported_tasks.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"aliases": aliases, "types": types}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs the import next time
    return aliases, types


def text_tasks() -> list[str]:
    """Built-in text tasks of the installed transformers that pipeq serves."""
    _, types = _registry()
    return sorted(name for name, kind in types.items() if kind == "text" and name not in _NOT_JSON_OUTPUT)


def normalize_task(task: str) -> str:
    """Resolve aliases (``sentiment-analysis`` is ``text-classification``, ``ner`` is ``token-classification``)."""
    aliases, _ = _registry()
    if task.startswith("translation_"):
        return task
    return aliases.get(task, task)


def check_task(task: str, *, custom_tasks: frozenset[str] = frozenset()) -> str:
    """Return the canonical task name, or raise UnsupportedTaskError with the choices."""
    name = normalize_task(task.strip())
    if name in custom_tasks or name in text_tasks():
        return name
    choices = ", ".join(text_tasks())
    if name in REMOVED_IN_TRANSFORMERS_5 or name.startswith("translation"):
        raise UnsupportedTaskError(
            f"task {task!r} is not offered by the installed transformers {metadata.version('transformers')} "
            f"(5.x removed question-answering, summarization, translation and text2text-generation). "
            f"Text tasks served: {choices}"
        )
    _, supported = _registry()
    if name in supported:
        raise UnsupportedTaskError(f"task {task!r} is not a text task; pipeq serves text tasks only: {choices}")
    raise UnsupportedTaskError(
        f"unknown task {task!r}. Text tasks served: {choices}; a custom pipeline task needs a worker "
        f"started with --pipeline-class"
    )
