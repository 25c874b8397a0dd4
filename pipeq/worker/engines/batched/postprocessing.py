"""Postprocess a whole micro-batch at once, for pipelines whose ``postprocess`` is a per-row formula.

Why: a pipeline postprocesses one input at a time, after ``PipelineIterator`` has cut the batched
output into per-input ``ModelOutput`` objects. For text classification that is a softmax over a
few logits and a dict; for a pooled embedding a mean over a few hundred vectors, a norm and a copy to
bytes. The per-input slicing, object building and tensor calls cost more than a small model's
forward pass, and they hold the GIL the model's thread needs. A :class:`BatchPostprocessor` computes
the same numbers for all rows at once and builds each row's result as the pipeline's ``postprocess``
does, already in the form the store keeps (JSON values, or a pooled vector's bytes):

* text classification (``TextClassificationPipeline``): transformers' own ``softmax``/``sigmoid`` over
  the batch's logits, the top label by one ``argmax``, every label's score sorted by one ``argsort``;
* feature extraction (``FeatureExtractionPipeline``, and pipeq's ``EmbeddingPipeline``): a vector per
  token is each row's unpadded hidden states as nested lists; a pooled vector (``pooling``) is pooled
  over the rows of one length at a time (one reduction over a ``(rows, tokens, width)`` block: the same
  reduction, on the same values, as the per-input ``pool``), normalized and cut to ``dims`` for the batch,
  and stored as bytes copied once for the batch (``Vector.encode_rows``).

What is guaranteed: for a pipeline whose ``postprocess`` and ``_forward`` are transformers' (or
pipeq's) own (``for_pipeline`` checks, so a subclass that changes either keeps the per-input path),
``postprocess_batch(outputs, lengths, post)[i]`` equals what the worker stores for
``pipe.postprocess(<row i of outputs, unpadded>, **post)``: same labels, same float32 scores and vector
bytes bit for bit (``tests/test_runtime.py`` compares them). Parameters it does not know, non-finite
scores, a mask with holes and a vector that does not fit its type raise ``ValueError``, and the caller
falls back to the per-input path, which gives each input its own result or error.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline
from transformers.pipelines.text_classification import (
    ClassificationFunction,
    TextClassificationPipeline,
    sigmoid,
    softmax,
)

from pipeq.vectors import Vector
from pipeq.worker.embedding import EmbeddingPipeline


class BatchPostprocessor:
    """A pipeline's ``postprocess`` over one batched forward output at once, in the form the store keeps."""

    #: The (postprocess, _forward) functions of the pipelines this postprocessor stands in for.
    methods: ClassVar[tuple[tuple[Any, Any], ...]] = ()
    #: Whether it gives each row's per-token outputs unpadded (the runtime must unpad them per input too).
    unpads: ClassVar[bool] = False

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        #: Where padding sits in a batch (what the runtime's unpadding reads too).
        self.padding_side: str = getattr(pipe.tokenizer, "padding_side", "right") if pipe.tokenizer else "right"

    @classmethod
    def for_pipeline(cls, pipe: Any, *, unpadded: bool = True) -> BatchPostprocessor | None:
        """The batch postprocessor for ``pipe``'s own postprocess and forward; None where there is none.

        ``unpadded``: whether the runtime unpads a per-token output before its per-input postprocess
        (the task's ``per_token_output`` trait); where it does not, no postprocessor that unpads is used.
        """
        own = (_method(pipe, "postprocess"), _method(pipe, "_forward"))
        for kind in (TextClassificationBatch, FeatureExtractionBatch):
            if own in kind.methods and (unpadded or not kind.unpads):
                return kind(pipe)
        return None

    def postprocess_batch(self, outputs: Any, lengths: Sequence[int], post: Mapping[str, Any]) -> list[Any]:
        """Per row of ``outputs`` (rows of ``lengths`` tokens), what the worker stores for its postprocess."""
        raise NotImplementedError


class TextClassificationBatch(BatchPostprocessor):
    """Text classification's ``postprocess`` over a batch's logits at once."""

    methods = ((TextClassificationPipeline.postprocess, TextClassificationPipeline._forward),)
    #: The postprocess parameters of TextClassificationPipeline.
    params = frozenset({"function_to_apply", "top_k", "_legacy"})

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.id2label = pipe.model.config.id2label

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

    def postprocess_batch(self, outputs: Any, lengths: Sequence[int], post: Mapping[str, Any]) -> list[Any]:
        unknown = set(post) - self.params
        if unknown:
            raise ValueError(f"batch postprocessing does not take {sorted(unknown)}")
        function = self._function(post.get("function_to_apply"))
        top_k, legacy = post.get("top_k", 1), post.get("_legacy", True)
        logits = outputs["logits"].float().numpy()  # to enable fp16 and bf16, as postprocess does per row
        if logits.shape[0] != len(lengths):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(lengths)} inputs")
        if function == ClassificationFunction.SIGMOID:
            scores = sigmoid(logits)
        elif function == ClassificationFunction.SOFTMAX:
            scores = softmax(logits)
        elif function == ClassificationFunction.NONE:
            scores = logits
        else:
            raise ValueError(f"Unrecognized `function_to_apply` argument: {function}")
        if not np.isfinite(scores).all():
            raise ValueError("non-finite scores")  # stored as null, and sorted as Python sorts them: per input
        id2label = self.id2label
        if top_k == 1 and legacy:
            best, top = scores.argmax(axis=-1).tolist(), scores.max(axis=-1).tolist()
            return [{"label": id2label[b], "score": s} for b, s in zip(best, top, strict=True)]
        labels = [id2label[i] for i in range(scores.shape[-1])]
        if legacy:
            return [
                [{"label": label, "score": s} for label, s in zip(labels, row, strict=True)] for row in scores.tolist()
            ]
        # Python's sort (reverse=True) keeps equal scores in label order; so does a stable sort of the negated scores.
        order = np.argsort(-scores, axis=-1, kind="stable")
        if top_k is not None:
            order = order[:, :top_k]
        ranked = np.take_along_axis(scores, order, axis=-1).tolist()
        return [
            [{"label": labels[i], "score": s} for i, s in zip(row, values, strict=True)]
            for row, values in zip(order.tolist(), ranked, strict=True)
        ]


class FeatureExtractionBatch(BatchPostprocessor):
    """Feature extraction's ``postprocess`` over a batch's hidden states: vectors per token, or pooled ones."""

    methods = (
        (FeatureExtractionPipeline.postprocess, FeatureExtractionPipeline._forward),
        (EmbeddingPipeline.postprocess, EmbeddingPipeline._forward),
    )
    unpads = True

    def postprocess_batch(self, outputs: Any, lengths: Sequence[int], post: Mapping[str, Any]) -> list[Any]:
        if post.get("return_tensors"):
            raise ValueError("batch postprocessing does not return tensors")
        unknown = set(post) - {"return_tensors", "pooling", "normalize", "dtype", "dims"}
        if unknown:
            raise ValueError(f"batch postprocessing does not take {sorted(unknown)}")
        hidden = outputs[0]  # ``model_outputs[0]``, as postprocess takes it per row
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[0] != len(lengths):
            raise ValueError("batch postprocessing needs (rows, tokens, width) hidden states")
        n = np.asarray(lengths, dtype=np.int64)
        if post.get("pooling") is None:
            return self._per_token(hidden, n)
        if post.get("dtype") is None:
            raise ValueError("batch postprocessing stores pooled vectors as bytes (a dtype)")
        return self._pooled(hidden, outputs.get("attention_mask"), n, post)

    def _window(self, block: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` token positions of rows padded to ``block``'s width (what the runtime's unpadding keeps)."""
        return block[:, block.shape[1] - n :] if self.padding_side == "left" else block[:, :n]

    def _per_token(self, hidden: torch.Tensor, lengths: np.ndarray) -> list[Any]:
        """Each row's unpadded hidden states as nested lists (``postprocess``'s ``tolist`` of a (1, n, width))."""
        if not torch.isfinite(hidden).all():
            raise ValueError("non-finite hidden states")  # stored as null: per input
        return [self._window(hidden[i : i + 1], int(n)).tolist() for i, n in enumerate(lengths.tolist())]

    def _pooled(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, lengths: np.ndarray, post: Mapping[str, Any]
    ) -> list[Vector]:
        """One stored vector per row, equal bit for bit to ``EmbeddingPipeline.postprocess`` of that row alone."""
        pooling, dims = post["pooling"], post.get("dims")
        width = hidden.shape[1]
        if mask is not None:
            # Per input, pooling keeps the unpadded positions its mask marks; here every one of them must be.
            columns = np.arange(width)
            if self.padding_side == "left":
                window = columns >= (width - lengths)[:, None]
            else:
                window = columns < lengths[:, None]
            if mask.shape != (len(lengths), width) or not bool(mask.cpu().numpy()[window].all()):
                raise ValueError("a mask with holes: pooled per input")
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"unknown pooling {pooling!r}")
        vectors = torch.empty((len(lengths), hidden.shape[2]), dtype=torch.float32, device=hidden.device)
        # Runs of rows of one length (a batch is sorted by length, so a run per length): each run is a
        # (rows, n, width) view, reduced over its tokens, the reduction ``pool`` runs on one row's (n, width).
        bounds = [0, *(np.flatnonzero(np.diff(lengths)) + 1).tolist(), len(lengths)]
        for start, stop in itertools.pairwise(bounds):
            n = int(lengths[start])
            tokens = hidden[start:stop, width - n :] if self.padding_side == "left" else hidden[start:stop, :n]
            tokens = tokens.float()
            if pooling == "mean":
                vectors[start:stop] = tokens.mean(dim=1)
            elif pooling == "cls":
                vectors[start:stop] = tokens[:, 0]
            else:
                vectors[start:stop] = tokens.max(dim=1).values
        if dims is not None:
            if dims > vectors.shape[-1]:
                raise ValueError(f"dims={dims} is more than the model's {vectors.shape[-1]} dimensions")
            vectors = vectors[:, :dims].contiguous()
        if post.get("normalize"):
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return Vector.encode_rows(vectors.cpu().numpy(), post["dtype"])


def _method(obj: Any, name: str) -> Any:
    """The function behind ``obj.<name>`` as the object resolves it (a method patched on the instance included)."""
    bound = getattr(obj, name, None)
    return getattr(bound, "__func__", bound)
