"""The pipeline workers serve feature-extraction with: transformers' own, plus ``pooling``, ``normalize``,
``dtype`` and ``dims``.

Without those parameters its output is exactly transformers' (a vector per token). See
``pipeq.embedding`` for what they mean. With ``dtype`` (pipeq's runtime always passes one with
``pooling``) a pooled vector comes back as a ``pipeq.vectors.Vector``, the bytes the store keeps;
without it, as a list of floats (the class used on its own, outside pipeq).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline

from pipeq.embedding import check_embedding_params, config_width
from pipeq.vectors import Vector


class EmbeddingPipeline(FeatureExtractionPipeline):
    """transformers' FeatureExtractionPipeline that can also pool token vectors into one per text."""

    #: What the worker checks before it passes a job's ``pooling``/``normalize`` on (subclasses keep it).
    accepts_pooling = True

    def _sanitize_parameters(  # type: ignore[override]
        self,
        pooling: str | None = None,
        normalize: bool | None = None,
        dtype: str | None = None,
        dims: int | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        params = {"pooling": pooling, "normalize": normalize, "dtype": dtype, "dims": dims}
        check_embedding_params(params, width=config_width(vars(self.model.config)))
        pre, fwd, post = super()._sanitize_parameters(**kwargs)
        if pooling is not None:
            post = {**post, "pooling": pooling, "normalize": bool(normalize), "dtype": dtype, "dims": dims}
        return pre, fwd, post

    def _forward(self, model_inputs: dict[str, Any]) -> Any:  # type: ignore[override]
        outputs = super()._forward(model_inputs)
        mask = model_inputs.get("attention_mask")
        if mask is not None:
            # Travels with the hidden states through batching, so pooling skips padded positions.
            outputs["attention_mask"] = mask
        return outputs

    def postprocess(  # type: ignore[override]
        self,
        model_outputs: Any,
        return_tensors: bool = False,
        pooling: str | None = None,
        normalize: bool = False,
        dtype: str | None = None,
        dims: int | None = None,
    ) -> Any:
        if pooling is None:
            return super().postprocess(model_outputs, return_tensors=return_tensors)
        vector = pool(model_outputs[0], model_outputs.get("attention_mask"), pooling)
        if dims is not None:
            if dims > vector.shape[-1]:
                raise ValueError(f"dims={dims} is more than the model's {vector.shape[-1]} dimensions")
            vector = vector[..., :dims]  # Matryoshka: the first dims values, normalized again below
        if normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        if return_tensors:
            return vector
        if dtype is not None:
            return Vector.encode(vector.cpu().numpy(), dtype)
        return vector.tolist()


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One fp32 vector from ``hidden`` ([1, tokens, width]) over the positions ``mask`` keeps."""
    hidden = hidden[0].float()
    keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    if mask is not None and mask.shape[-1] == hidden.shape[0]:
        keep = mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)
    tokens = hidden[keep]
    if pooling == "mean":
        return tokens.mean(dim=0)
    if pooling == "cls":
        return tokens[0]
    if pooling == "max":
        return tokens.max(dim=0).values
    raise ValueError(f"unknown pooling {pooling!r}")
