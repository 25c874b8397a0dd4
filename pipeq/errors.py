"""pipeq's exceptions: one base class, narrow subclasses."""

import json


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


class StoreFullError(StoreError):
    """Raised when the store's disk (or its database's size limit) is full: the write was rolled back."""


class BrokerError(PipeqError):
    """Raised when a message cannot be published to the broker."""


class BrokerUnreachableError(BrokerError):
    """Raised when nothing answers at the broker URL (checked in seconds, before anything is stored)."""


class DuplicateIdError(InputError):
    """Raised when two items of one job carry the same id and duplicates were not allowed."""

    def __init__(
        self, input_id: str, first: int, second: int, *, source: str | None = None, lines: tuple[int, int] | None = None
    ) -> None:
        quoted = json.dumps(input_id, ensure_ascii=False)
        what = (
            f"duplicate id {quoted} (first on line {lines[0]})"
            if lines
            else (f"duplicate id {quoted} at item {second + 1} (first at item {first + 1})")
        )
        super().__init__(
            f"{what}; ids must be unique within a job (--allow-duplicate-ids accepts them)",
            source=source,
            line=lines[1] if lines else None,
        )
        self.input_id = input_id
        #: Positions of the two items in the job (from 0), the first occurrence first.
        self.first = first
        self.second = second
