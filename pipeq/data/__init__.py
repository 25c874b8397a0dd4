"""Sample data shipped with pipeq (the demo texts)."""
