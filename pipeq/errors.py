"""pipeq's exceptions: one base class, narrow subclasses."""


class PipeqError(Exception):
    """Raised for every error pipeq reports to its user."""


class ConfigurationError(PipeqError):
    """Raised when settings, flags or a worker configuration are invalid."""


class UnsupportedTaskError(ConfigurationError):
    """Raised when a task is neither a text task of the installed transformers nor a served custom one."""


class ModelNotFoundError(ConfigurationError):
    """Raised when a model path or hub id cannot be resolved (offline mode included)."""


class InputError(PipeqError):
    """Raised when submitted input is malformed; names the source and line."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        where = ""
        if source is not None:
            where = source
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.line = line


class JobNotFoundError(PipeqError):
    """Raised when a job id is not in the store."""


class StoreError(PipeqError):
    """Raised when the SQL store is missing its schema or cannot be reached."""


class BrokerError(PipeqError):
    """Raised when a message cannot be published to the broker."""
