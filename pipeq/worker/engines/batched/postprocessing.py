"""Postprocess a whole micro-batch at once, for pipelines whose ``postprocess`` is a per-row formula.

Why: a pipeline postprocesses one input at a time, after ``PipelineIterator`` has cut the batched
output into per-input ``ModelOutput`` objects. For text classification that is a softmax over a
few logits and a dict, but the per-input slicing, object building and numpy calls cost more than
a small model's forward pass, and they hold the GIL the model's thread needs.
:class:`BatchPostprocessor` computes the same numbers for all rows with transformers' own
``softmax``/``sigmoid`` over the batch's logits, and builds each row's result exactly as
``TextClassificationPipeline.postprocess`` does.

What is guaranteed: for a pipeline whose ``postprocess`` and ``_forward`` are transformers' own
``TextClassificationPipeline`` ones (``for_pipeline`` checks, so a subclass that changes either keeps
the per-input path), ``postprocess_batch(outputs, n, post)[i]`` equals
``pipe.postprocess(<row i of outputs>, **post)``: same labels, same float32 scores bit for bit
(``tests/test_runtime.py`` compares them over every scoring function and ``top_k`` form). Parameters
it does not know are refused (``ValueError``), and the caller falls back to the per-input path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.pipelines.text_classification import (
    ClassificationFunction,
    TextClassificationPipeline,
    sigmoid,
    softmax,
)

#: The postprocess parameters of TextClassificationPipeline.
_PARAMS = frozenset({"function_to_apply", "top_k", "_legacy"})


class BatchPostprocessor:
    """Text classification's ``postprocess`` over a batch's logits at once."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.id2label = pipe.model.config.id2label

    @classmethod
    def for_pipeline(cls, pipe: Any) -> BatchPostprocessor | None:
        """A batch postprocessor where the pipeline's own forward and postprocess are transformers' text
        classification ones; None otherwise."""
        own = TextClassificationPipeline
        if _method(pipe, "postprocess") is own.postprocess and _method(pipe, "_forward") is own._forward:
            return cls(pipe)
        return None

    def _function(self, function_to_apply: Any) -> Any:
        """The scoring function ``postprocess`` would use (its own rules when the job sets none)."""
        if function_to_apply is not None:
            return function_to_apply
        config = self.pipe.model.config
        if config.problem_type == "regression":
            return ClassificationFunction.NONE
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return ClassificationFunction.SIGMOID
        if config.problem_type == "single_label_classification" or config.num_labels > 1:
            return ClassificationFunction.SOFTMAX
        if hasattr(config, "function_to_apply"):
            return config.function_to_apply
        return ClassificationFunction.NONE

    def postprocess_batch(self, outputs: Mapping[str, Any], n: int, post: Mapping[str, Any]) -> list[Any]:
        """What ``pipe.postprocess`` returns for each of the ``n`` rows of one batched forward output."""
        unknown = set(post) - _PARAMS
        if unknown:
            raise ValueError(f"batch postprocessing does not take {sorted(unknown)}")
        function = self._function(post.get("function_to_apply"))
        top_k, legacy = post.get("top_k", 1), post.get("_legacy", True)
        logits = outputs["logits"].float().numpy()  # to enable fp16 and bf16, as postprocess does per row
        if logits.shape[0] != n:
            raise ValueError(f"{logits.shape[0]} rows of logits for {n} inputs")
        if function == ClassificationFunction.SIGMOID:
            scores = sigmoid(logits)
        elif function == ClassificationFunction.SOFTMAX:
            scores = softmax(logits)
        elif function == ClassificationFunction.NONE:
            scores = logits
        else:
            raise ValueError(f"Unrecognized `function_to_apply` argument: {function}")
        id2label = self.id2label
        if top_k == 1 and legacy:
            best, top = scores.argmax(axis=-1).tolist(), scores.max(axis=-1).tolist()
            return [{"label": id2label[b], "score": s} for b, s in zip(best, top, strict=True)]
        results = []
        for row in scores.tolist():
            dict_scores = [{"label": id2label[i], "score": score} for i, score in enumerate(row)]
            if not legacy:
                dict_scores.sort(key=lambda x: x["score"], reverse=True)
                if top_k is not None:
                    dict_scores = dict_scores[:top_k]
            results.append(dict_scores)
        return results


def _method(obj: Any, name: str) -> Any:
    """The function behind ``obj.<name>`` as the object resolves it (a method patched on the instance included)."""
    bound = getattr(obj, name, None)
    return getattr(bound, "__func__", bound)
