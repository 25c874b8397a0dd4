"""pipeq: a queue-based batch worker for Hugging Face Transformers pipelines."""

from importlib.metadata import PackageNotFoundError, version

from pipeq.errors import PipeqError
from pipeq.producer.client import Client, Job
from pipeq.settings import Settings

try:
    __version__ = version("pipeq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["Client", "Job", "PipeqError", "Settings", "__version__"]
