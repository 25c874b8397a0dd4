"""Sentence embeddings from the feature-extraction task: the job parameters ``pooling`` and ``normalize``.

transformers' feature-extraction returns a vector per token, so a job embedding documents
stored hundreds of vectors per text (about 425 KB of JSON per text for all-MiniLM-L6-v2) and
every consumer pooled them itself. With ``pooling`` a worker returns one vector per text:

- ``"mean"``: the average over the text's tokens (what sentence-transformers models such as
  all-MiniLM-L6-v2 were trained with);
- ``"cls"``: the first token's vector (BERT-style [CLS] embeddings);
- ``"max"``: the element-wise maximum over tokens.

``normalize=True`` scales that vector to unit length, so a dot product is a cosine similarity.
This module only checks the parameters (the producer imports it); the pipeline that applies them
is ``pipeq.worker.embedding.EmbeddingPipeline``.
"""

from __future__ import annotations

from typing import Any

from pipeq.errors import ConfigurationError

TASK = "feature-extraction"
POOLINGS = ("mean", "cls", "max")


def check_embedding_params(params: dict[str, Any]) -> None:
    """Raise ConfigurationError for a ``pooling`` or ``normalize`` a feature-extraction job cannot use."""
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
