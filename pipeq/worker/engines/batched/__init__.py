"""The pipeline's own stages over padded micro-batches: the engine of encoder tasks."""
