"""The task traits registry: what pipeq does differently per task, and the defaults for any other task."""

from __future__ import annotations

import subprocess
import sys

from pipeq.tasks import TASK_TRAITS, TaskTraits, traits


def test_an_unknown_or_custom_task_gets_the_defaults() -> None:
    assert traits("my-custom-task") == TaskTraits()
    default = TaskTraits()
    assert default.batchable
    assert not (default.truncation_flag or default.per_token_output or default.synthetic_warmup or default.table_input)


def test_built_in_tasks_have_their_traits() -> None:
    def having(trait: str) -> set[str]:
        return {task for task, t in TASK_TRAITS.items() if getattr(t, trait)}

    assert having("truncation_flag") == {"text-classification", "feature-extraction", "fill-mask"}
    assert having("per_token_output") == {"feature-extraction"}
    assert having("synthetic_warmup") == having("truncation_flag") | {"token-classification"}
    assert having("table_input") == {"table-question-answering"}
    assert {task for task, t in TASK_TRAITS.items() if not t.batchable} == {"table-question-answering"}


def test_the_registries_import_no_torch() -> None:
    # The producer imports them: importing torch there would cost seconds on every submit.
    code = (
        "import sys, pipeq.tasks, pipeq.precisions, pipeq.routing, pipeq.producer.readers, pipeq.cli; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
