"""A scheduler of sequences for causal language models: the engine of generation tasks."""
