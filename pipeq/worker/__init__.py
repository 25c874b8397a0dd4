"""The worker side: Celery app and task, batching, the loaded pipeline runtime, quantization."""
