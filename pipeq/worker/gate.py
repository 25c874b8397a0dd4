"""``--precision auto``'s accuracy gate: real texts through fp32 and each candidate, and how far they agree.

The texts are ``--calibration-texts FILE`` (one text a line) or the English and Chinese set shipped in
``pipeq/data``; what "agree" means for the task is its entry in ``pipeq.agreement.AGREEMENTS``. The
outputs are made in the measuring process (``measure``); the figures are judged in the worker's parent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pipeq import constants as C
from pipeq.agreement import Thresholds, compare, merge, task_agreement
from pipeq.errors import ConfigurationError
from pipeq.worker.engines.batched.runtime import PipelineRuntime

log = logging.getLogger(__name__)


def calibration_texts(path: str | None) -> list[str]:
    """The texts of ``path`` (one a line, blank lines skipped), or the shipped set when None."""
    if path is None:
        raw = resources.files("pipeq.data").joinpath(C.CALIBRATION_TEXTS_FILE).read_text(encoding="utf-8")
    else:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"--calibration-texts {path}: cannot read it ({exc})") from None
    texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise ConfigurationError(f"--calibration-texts {path}: no texts in it (one text a line)")
    return texts


def _masked(text: str, mask: str) -> str:
    """``text`` with its middle word (or, without spaces, its middle character) replaced by ``mask``."""
    words = text.split()
    if len(words) > 1:
        words[len(words) // 2] = mask
        return " ".join(words)
    middle = len(text) // 2
    return f"{text[:middle]}{mask}{text[middle + 1 :]}"


def calibration_inputs(pipe: Any, task: str, texts: Sequence[str]) -> list[str]:
    """The texts as the task's inputs: with a mask token for fill-mask."""
    if not task_agreement(task).masked:
        return list(texts)
    mask = getattr(pipe.tokenizer, "mask_token", None)
    if mask is None:
        raise ConfigurationError(f"the tokenizer of this {task} model has no mask token")
    return [_masked(text, mask) for text in texts]


def calibration_outputs(runtime: PipelineRuntime, task: str, texts: Sequence[str]) -> dict[int, Any]:
    """Each calibration text's output by index (failed items left out; all failing is an error)."""
    inputs = calibration_inputs(runtime.pipe, task, texts)
    params = dict(task_agreement(task).params)
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    for results, _timing in runtime.run(list(enumerate(inputs)), params):
        for r in results:
            if r.status == C.ITEM_DONE:
                outputs[r.idx] = r.output
            else:
                errors.append(str(r.error))
    if not outputs:
        raise ConfigurationError(f"no calibration text ran through this {task} model: {errors[0] if errors else '?'}")
    return outputs


def agreement(
    reference: dict[int, Any], outputs: dict[int, Any], precision: str, thresholds: Thresholds
) -> dict[str, Any]:
    """The figures of ``outputs`` against fp32's ``reference``, over the texts both ran."""
    found = [compare(outputs[i], want) for i, want in reference.items() if i in outputs]
    return merge(None, precision, found, thresholds)
