"""A text-classification pipeline that misbehaves on request, for the fault-injection tests.

Workers load it with ``--pipeline-class faultpipe:FaultyClassificationPipeline``. Markers in a
text make it fail where real inputs do: ``POISON-PRE`` raises in the tokenizer step,
``POISON-FWD`` makes the model's forward fail (token ids outside the vocabulary),
``POISON-POST`` raises in postprocess, and ``POISON-KILL`` kills the worker process outright.
``PIPEQ_TEST_FORWARD_DELAY`` (seconds) slows every forward pass so a test can act mid-job, and
``PIPEQ_TEST_LOAD_DELAY`` (seconds) the pipeline's construction, so a test can act while a worker starts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers import TextClassificationPipeline

#: Task name the fault tests serve this pipeline under.
TASK = "faulty-classification"


class FaultyClassificationPipeline(TextClassificationPipeline):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(float(os.environ.get("PIPEQ_TEST_LOAD_DELAY", "0")))
        super().__init__(*args, **kwargs)

    def preprocess(self, inputs: Any, **kwargs: Any) -> Any:
        text = inputs if isinstance(inputs, str) else str(inputs)
        if "POISON-PRE" in text:
            raise ValueError("the tokenizer cannot read this input")
        if "POISON-KILL" in text:
            os._exit(17)  # as a segfault or the OOM killer would
        out = super().preprocess(inputs, **kwargs)
        if "POISON-FWD" in text:
            out["input_ids"] = out["input_ids"] + 10**7  # out of the vocabulary: the embedding raises
        out["poison_post"] = torch.tensor([[1 if "POISON-POST" in text else 0]])
        return out

    def _forward(self, model_inputs: Any) -> Any:
        delay = float(os.environ.get("PIPEQ_TEST_FORWARD_DELAY", "0"))
        if delay:
            time.sleep(delay)
        poison = model_inputs.pop("poison_post")
        out = super()._forward(model_inputs)
        out["poison_post"] = poison
        return out

    def postprocess(self, model_outputs: Any, **kwargs: Any) -> Any:
        if int(model_outputs["poison_post"].flatten()[0]):
            raise RuntimeError("postprocess cannot handle this output")
        return super().postprocess(model_outputs, **kwargs)


def reference_outputs(model: str, texts: list[str]) -> list[dict[str, Any]]:
    """Top label and score from a plain transformers pipeline, for checking that no result changed."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model)
    return list(pipe(texts, batch_size=8))
