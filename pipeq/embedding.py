"""Sentence embeddings from the feature-extraction task: the job parameters ``pooling`` and ``normalize``.

transformers' feature-extraction returns a vector per token, so a job embedding documents
stored hundreds of vectors per text (about 425 KB of JSON per text for all-MiniLM-L6-v2) and
every consumer pooled them itself. With ``pooling`` a worker returns one vector per text:

- ``"mean"``: the average over the text's tokens (what sentence-transformers models such as
  all-MiniLM-L6-v2 were trained with);
- ``"cls"``: the first token's vector (BERT-style [CLS] embeddings);
- ``"max"``: the element-wise maximum over tokens.

``normalize=True`` scales that vector to unit length, so a dot product is a cosine similarity.
``prompt`` is a text put before every input (an instruction such as ``"query: "``, for models trained
with one); ``prompt_name`` names one of a sentence-transformers model's prompts, and the producer
resolves it to ``prompt`` at submit (``pipeq.recipe``), as it fills in the model's own pooling,
normalization and input length where a job leaves them out.

A pooled vector is stored as binary (``pipeq.vectors``), in the type ``dtype`` names: ``"float32"``
(the default: exactly the values the model computed) or ``"float16"`` (half the bytes, about three
significant digits). ``dims=N`` keeps the first N values (Matryoshka truncation, for models trained
for it); with ``normalize`` the truncated vector is scaled to unit length again, without it the
values are kept as they are. Token-level outputs (no ``pooling``) stay JSON.

This module only checks the parameters (the producer imports it); the pipeline that applies them
is ``pipeq.worker.embedding.EmbeddingPipeline``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeq.errors import ConfigurationError
from pipeq.vectors import DTYPES

TASK = "feature-extraction"
POOLINGS = ("mean", "cls", "max")
#: A text put before each input, and the name of a sentence-transformers model's prompt that gives it.
PROMPT, PROMPT_NAME = "prompt", "prompt_name"
#: Keys of a model's config.json that give the width of its hidden states (BERT-like, T5-like, DistilBERT, GPT-2).
_WIDTH_KEYS = ("hidden_size", "d_model", "dim", "n_embd")


def is_pooled(task: str, params: dict[str, Any] | None) -> bool:
    """Whether a job's outputs are one vector per text (stored as binary), not JSON."""
    return task == TASK and (params or {}).get("pooling") is not None


def check_embedding_params(params: dict[str, Any], *, width: int | None = None) -> None:
    """Raise ConfigurationError for a ``pooling``, ``normalize``, ``dtype`` or ``dims`` a feature-extraction
    job cannot use; ``dims`` is checked against ``width`` (the model's hidden size) when it is known."""
    pooling = params.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigurationError(
            f"pooling must be one of {', '.join(POOLINGS)} (or left out for a vector per token), not {pooling!r}"
        )
    normalize = params.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise ConfigurationError(f"normalize must be true or false, not {normalize!r}")
    if normalize and pooling is None:
        raise ConfigurationError("normalize needs pooling: set pooling to mean, cls or max")
    dtype = params.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigurationError(f"dtype must be one of {', '.join(DTYPES)} (how vectors are stored), not {dtype!r}")
    dims = params.get("dims")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise ConfigurationError(f"dims must be a whole number of dimensions, 1 or more, not {dims!r}")
    if dims is not None and width is not None and dims > width:
        raise ConfigurationError(f"dims={dims} is more than the model's {width} dimensions")
    for name in (PROMPT, PROMPT_NAME):
        if params.get(name) is not None and not isinstance(params[name], str):
            raise ConfigurationError(f"{name} must be a string, not {params[name]!r}")
    for name in ("dtype", "dims"):
        if params.get(name) is not None and pooling is None:
            raise ConfigurationError(
                f"{name} needs pooling: set pooling to mean, cls or max (vectors per token stay JSON)"
            )


def prompted(params: dict[str, Any] | None) -> str:
    """The text a job puts before each input ('' for none)."""
    return str((params or {}).get(PROMPT) or "")


def model_width(model: str) -> int | None:
    """The width of a model's hidden states from its config.json (a local directory, or the Hugging Face
    cache); None when it cannot be read without loading the model."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a hub id at all: the worker checks dims when it loads the model
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    return config_width(config)


def config_width(config: dict[str, Any]) -> int | None:
    """The hidden-state width a model config (as a dict) names, None when it names none."""
    for key in _WIDTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
