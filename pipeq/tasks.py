"""Which transformers tasks pipeq serves, and their canonical names."""

from __future__ import annotations

from functools import cache

from pipeq.errors import UnsupportedTaskError

#: Text tasks older transformers had and 5.x removed; named so the error can say so.
REMOVED_IN_TRANSFORMERS_5 = frozenset(
    {"question-answering", "summarization", "translation", "text2text-generation", "conversational"}
)
#: Tasks whose input is text but whose output is not JSON (audio arrays).
_NOT_JSON_OUTPUT = frozenset({"text-to-audio"})


@cache
def _registry() -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    from transformers.pipelines import PIPELINE_REGISTRY

    return dict(PIPELINE_REGISTRY.task_aliases), PIPELINE_REGISTRY.supported_tasks


def text_tasks() -> list[str]:
    """Built-in text tasks of the installed transformers that pipeq serves."""
    _, supported = _registry()
    return sorted(
        name for name, impl in supported.items() if impl.get("type") == "text" and name not in _NOT_JSON_OUTPUT
    )


def normalize_task(task: str) -> str:
    """Resolve aliases (``sentiment-analysis`` is ``text-classification``, ``ner`` is ``token-classification``)."""
    aliases, _ = _registry()
    if task.startswith("translation_"):
        return task
    return aliases.get(task, task)


def check_task(task: str, *, custom_tasks: frozenset[str] = frozenset()) -> str:
    """Return the canonical task name, or raise UnsupportedTaskError with the choices."""
    import transformers

    name = normalize_task(task.strip())
    if name in custom_tasks or name in text_tasks():
        return name
    choices = ", ".join(text_tasks())
    if name in REMOVED_IN_TRANSFORMERS_5 or name.startswith("translation"):
        raise UnsupportedTaskError(
            f"task {task!r} is not offered by the installed transformers {transformers.__version__} "
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
