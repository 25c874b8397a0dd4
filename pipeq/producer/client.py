"""The Python API: submit jobs, follow them, read their results."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import IO, Any

from pipeq import constants as C
from pipeq import embedding, generation, recipe
from pipeq.broker.app import make_celery
from pipeq.broker.probe import check_broker
from pipeq.broker.window import chunk_size_for, open_job, requeue
from pipeq.errors import BrokerError, ConfigurationError, DuplicateIdError, InputError, JobNotFoundError
from pipeq.generation import TASK as GENERATION_TASK
from pipeq.primitives import JobProgress
from pipeq.producer import openai_batch, prompts
from pipeq.producer.frames import (
    frame_source,
    is_frame,
    read_frame,
    results_dataset,
    results_frame,
    results_reader,
    results_table,
)
from pipeq.producer.lines import Lines
from pipeq.producer.readers import (
    INPUT_FORMATS,
    OBJECTS_SOURCE,
    Record,
    RecordSpec,
    Source,
    detect_format,
    read_objects,
    read_path,
)
from pipeq.producer.writers import BATCH_ROWS, GENERATION_COLUMNS, parquet_path, write_parquet, write_results
from pipeq.routing import PRECISIONS, ServeKey, check_model, check_params, check_precision
from pipeq.settings import Settings
from pipeq.store import NewItem, Store, new_job_row
from pipeq.tasks import check_task
from pipeq.vectors import Vector, as_array, stack

log = logging.getLogger(__name__)


class Job:
    """A handle on a submitted job; everything it reports is read from the SQL store."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store = store
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobProgress:
        return self.store.job(self.id)

    def wait(
        self,
        *,
        timeout: float | None = None,
        progress: bool = False,
        poll: float = C.WAIT_POLL_INTERVAL,
        on_update: Callable[[JobProgress], None] | None = None,
    ) -> JobProgress:
        """Block until the job is done or cancelled; raises TimeoutError after ``timeout`` seconds."""
        from pipeq.progress import follow, watch

        if progress:
            return watch(self.store, self.id, timeout=timeout, poll=poll)
        return follow(self.store, self.id, timeout=timeout, poll=poll, on_update=on_update)

    def results(self, *, inputs: bool = False) -> Iterator[dict[str, Any]]:
        """One row per input item, in input order: index, id, status, output, error, truncated, timing.

        A pooled embedding's output is its list of floats (stored as binary; ``to_numpy`` reads them as an array).
        A generation job's ``timing`` holds its items' ``output_tokens``, ``first_token_ms`` and ``decode_ms`` too.
        ``inputs=True`` adds each item's ``input`` as the store keeps it.
        """
        for row in self._rows(inputs=inputs):
            if isinstance(row["output"], Vector):
                row["output"] = row["output"].tolist()
            yield row

    def _pages(self) -> Iterator[dict[str, list[Any]]]:
        """The job's results as the store reads them: a page of columns at a time (``Store.iter_result_pages``)."""
        return self.store.iter_result_pages(self.id, page=BATCH_ROWS)

    def _rows(self, *, inputs: bool = False) -> Iterator[dict[str, Any]]:
        """``results()`` rows with pooled embeddings left as the ``Vector``s the store holds."""
        generation = self._generates()
        for row in self.store.iter_results(self.id, inputs=inputs):
            timing = {
                "batch_id": row["batch_id"],
                "batch_size": row["batch_size"],
                "n_tokens": row["n_tokens"],
                "queue_wait_ms": row["queue_wait_ms"],
                "preprocess_ms": row["preprocess_ms"],
                "forward_ms": row["forward_ms"],
                "postprocess_ms": row["postprocess_ms"],
                "batch_total_ms": row["total_ms"],
                "attempts": row["attempts"],
                "model_revision": row["model_revision"],
                "worker_id": row["worker_id"],
            }
            if generation:
                timing.update({name: row[name] for name in GENERATION_COLUMNS})
            result = {
                "index": row["idx"],
                "id": row["input_id"],
                "status": row["status"],
                "output": row["output"],
                "error": row["error"],
                "truncated": row["truncated"],
                "cached": bool(row["cached"]),
                "timing": timing,
            }
            if inputs:
                result["input"] = row["input"]
            yield result

    def _row(self) -> dict[str, Any]:
        row = self.store.job_row(self.id)
        if row is None:
            raise JobNotFoundError(f"no job {self.id!r} in the store")
        return row

    def _generates(self) -> bool:
        """Whether the job generates text (its results then have ``GENERATION_COLUMNS``)."""
        return bool(self._row()["task"] == GENERATION_TASK)

    def _layout(self) -> dict[str, Any]:
        """The shape of the job's flat results, as the writers take it: ``embedding_dim`` and ``generation``."""
        row = self._row()
        return {"embedding_dim": self._embedding_dim(row), "generation": row["task"] == GENERATION_TASK}

    def embedding_dim(self) -> int | None:
        """Values per vector of a pooled-embedding job; None for any other job.

        Its ``dims`` parameter, else the size of its first stored vector, else its model's width
        (config.json), else 0 (nothing stored yet and a model whose config does not say).
        """
        return self._embedding_dim(self._row())

    def _embedding_dim(self, row: dict[str, Any]) -> int | None:
        params = row["params"] or {}
        if not embedding.is_pooled(row["task"], params):
            return None
        if params.get("dims") is not None:
            return int(params["dims"])
        first = as_array(self.store.first_output(self.id))
        if first is not None:
            return int(first.shape[0])
        return embedding.model_width(row["model"]) or 0

    def to_arrow(self) -> Any:
        """The results as a pyarrow Table in input order, a record batch a page.

        ``output`` is JSON text; a pooled-embedding job has an ``embedding`` column of
        ``fixed_size_list<float32>[dim]`` in its place (null where an item has no vector); a generation job
        has ``output_tokens``, ``first_token_ms`` and ``decode_ms`` after ``n_tokens``.
        """
        return results_table(self._pages(), **self._layout())

    def to_arrow_reader(self) -> Any:
        """The results as ``to_arrow`` has them, as a pyarrow RecordBatchReader: one page is read at a time."""
        return results_reader(self._pages(), **self._layout())

    def to_pandas(self) -> Any:
        """The results as a pandas DataFrame in input order, ``output`` decoded; needs pandas.

        A pooled-embedding job has an ``embedding`` column instead (a float32 array per row, None where none).
        """
        return results_frame(self._pages(), **self._layout())

    def to_dataset(self) -> Any:
        """The results as a Hugging Face ``datasets.Dataset`` with ``to_arrow``'s columns; needs datasets."""
        return results_dataset(self._pages(), **self._layout())

    def to_numpy(self) -> Any:
        """A pooled-embedding job's vectors as an (n, dim) float32 array, n the job's item count.

        Row i is the item of index i, so it joins back to the inputs by position; an item without a
        vector (failed, cancelled or still pending) is a row of NaN: ``~np.isnan(a[:, 0])`` marks
        the rows that hold one. Float16 vectors are widened exactly.
        """
        import numpy as np

        dim = self.embedding_dim()
        if dim is None:
            raise ConfigurationError(
                "to_numpy() reads pooled embeddings: a feature-extraction job with pooling (one vector per text)"
            )
        row = self.store.job_row(self.id)
        assert row is not None
        out = np.full((int(row["total"]), dim), np.nan, dtype=np.float32)
        for page in self.store.iter_outputs(self.id):
            idxs = np.fromiter((idx for idx, _ in page), dtype=np.int64, count=len(page))
            values, present = stack([output for _, output in page], dim)
            out[idxs[present]] = values[present]
        return out

    def export(self, fmt: str, *, out: IO[str] | None = None, path: str | None = None) -> int:
        """Write the results in ``fmt`` (``pipeq results --format``) to ``path`` or ``out``; returns the row count.

        Parquet gets the columns of ``to_arrow`` (a pooled-embedding job's vectors as its ``embedding``
        column, from the stored bytes), written a page at a time.
        """
        if fmt == "parquet":
            return write_parquet(self.to_arrow_reader(), parquet_path(path))
        job = self.status() if fmt == "openai-batch" else None
        generation = self._generates()
        # A generated item's OpenAI response is a chat completion or a text completion, as its stored input says.
        rows = self.results(inputs=generation and job is not None)
        return write_results(rows, fmt, out=out, path=path, job=job, generation=generation)

    def cancel(self) -> int:
        """Cancel the job's remaining items; returns how many were cancelled."""
        return self.store.cancel_job(self.id)

    def delete(self) -> int:
        """Delete the job with its items and results (done, cancelled, or left storing); returns its item count.

        A queued or running job raises ConfigurationError: cancel it first.
        """
        return self.store.delete_finished_job(self.id)


def _read(
    inputs: Any, spec: RecordSpec, input_format: str | None, stdin: IO[bytes] | None
) -> tuple[Iterator[Record], str | None, str]:
    """The records of ``inputs``, the source stored on the job (a path, or None) and the name errors give it."""
    if isinstance(inputs, str):
        return read_path(inputs, spec, input_format=input_format, stdin=stdin), inputs, Source(inputs).name
    if is_frame(inputs):
        return read_frame(inputs, spec), None, frame_source(inputs)
    return read_objects(inputs, spec), None, OBJECTS_SOURCE


def _format_checks_ids(inputs: Any, input_format: str | None) -> bool:
    """Whether the input file's format has its own rule on ids (then the store does not check them again)."""
    if not isinstance(inputs, str):
        return False
    fmt = INPUT_FORMATS.get(detect_format(inputs, input_format))  # None: standard input, sniffed
    return fmt is not None and fmt.checks_ids


def _file_task(inputs: Any, input_format: str | None) -> str:
    """The task an OpenAI Batch request file's job runs, from its first request's url; ConfigurationError for
    any other input (a job names its task)."""
    if not isinstance(inputs, str) or input_format != "openai-batch":
        raise ConfigurationError("name the job's task (only an openai-batch request file says its own, by its url)")
    if inputs == "-":
        raise ConfigurationError(
            "name the job's task: an openai-batch file read from standard input is read once, after the job is made"
        )
    if not os.path.isfile(inputs):
        raise InputError(f"no such file: {inputs}")
    lines = INPUT_FORMATS[input_format].read(Source(inputs))
    try:
        for line, request in lines:
            return openai_batch.request_task(request, inputs, line)
    finally:
        lines.close()  # type: ignore[attr-defined]  # the reader's generator: closes the file
    raise InputError("the input holds no items", source=inputs)


def _alias(name: str, value: Any, default: Any, alias: str, alias_value: Any) -> Any:
    """``value`` of argument ``name``, or that of its alias ``alias`` when given; both given must agree."""
    if alias_value is None:
        return value
    if value not in (default, alias_value):
        raise TypeError(f"pass {name} or {alias}, not both")
    return alias_value


class Client:
    """Submit jobs to pipeq and follow them. Settings come from the environment unless given."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else Settings.from_env()
        self.settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        self.store = Store(self.settings.database_url)
        self.store.check_schema()
        self._celery = make_celery(self.settings)

    def close(self) -> None:
        self.store.close()
        self._celery.close()  # release the broker connection pool now, not at garbage collection

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def job(self, job_id: str) -> Job:
        self.store.job(job_id)  # raises JobNotFoundError
        return Job(self.store, job_id)

    def submit(
        self,
        inputs: Iterable[Any] | str,
        *,
        task: str | None = None,
        model: str,
        precision: str | None = None,
        revision: str | None = None,
        params: dict[str, Any] | None = None,
        text_field: str = "text",
        id_field: str | None = "id",
        pair_field: str | None = None,
        skip_empty: bool = False,
        priority: int = 0,
        input_format: str | None = None,
        stdin: IO[bytes] | None = None,
        text_column: str | None = None,
        id_column: str | None = None,
        pair_column: str | None = None,
        cache: bool = False,
        allow_duplicate_ids: bool = False,
        fail_long_prompts: bool = False,
    ) -> Job:
        """Store a job and all its items, then queue it in chunks.

        ``inputs`` is an iterable of texts or dicts, a path (``-`` for stdin) to a .jsonl, .csv,
        .parquet or .txt file, a pandas DataFrame, a pandas Series of texts (its index gives the
        ids unless ``id_field=None``), Arrow data (Table, RecordBatch, RecordBatchReader, Dataset), or a Hugging
        Face ``datasets.Dataset`` or ``IterableDataset`` (streamed).
        ``text_field``, ``id_field`` and ``pair_field`` name a record's fields or a frame's columns;
        ``text_column``, ``id_column`` and ``pair_column`` are aliases. Bad input raises InputError
        naming the line (or row) before anything is stored; nothing is queued until every item is committed.

        ``precision`` left out means the one live workers serve for this task and model (fp32 when
        several do, or none): a worker started with ``--precision auto`` is found without naming it.

        ``cache=True`` reuses outputs stored for the same input, task, model revision, precision and
        parameters instead of running the model, and stores this job's outputs for later jobs.

        Two items with the same id are refused (an InputError naming both lines, nothing stored), as
        results are joined back by id; ``allow_duplicate_ids=True`` stores them. Items without an id
        are never duplicates. A Redis broker that does not answer raises BrokerUnreachableError first.

        ``task`` may be left out for an OpenAI Batch request file (``input_format="openai-batch"``): its
        url says it (``/v1/embeddings``: feature-extraction; ``/v1/chat/completions`` and
        ``/v1/completions``: text-generation).

        A text-generation job's ``params`` are its items' default sampling parameters (``max_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``). When the model's tokenizer loads without a
        download, each prompt is checked at submit: chat messages need a chat template, and a prompt's
        tokens plus its ``max_tokens`` must fit the model's context, else InputError naming the line;
        ``fail_long_prompts=True`` stores such items instead, and each fails alone with the reason.
        """
        text_field = _alias("text_field", text_field, "text", "text_column", text_column)
        id_field = _alias("id_field", id_field, "id", "id_column", id_column)
        pair_field = _alias("pair_field", pair_field, None, "pair_column", pair_column)
        if task is None:
            task = _file_task(inputs, input_format)
        name = check_task(task, custom_tasks=self.store.served_custom_tasks())
        if name != generation.TASK and fail_long_prompts:
            raise ConfigurationError(f"fail_long_prompts (--fail-long-prompts) is for {generation.TASK} jobs")
        if name == generation.TASK and pair_field:
            raise ConfigurationError(f"{generation.TASK} takes one prompt a record: pair_field does not apply")
        given_model, model = model.strip(), check_model(model)
        if precision is None:
            precision = self._served_precision(name, model, revision)
        key = ServeKey(task=name, model=model, precision=check_precision(precision), revision=revision)
        self._warn_if_served_elsewhere(key)
        params = check_params(params, name)
        if name == embedding.TASK:
            params = recipe.resolve(model, params)  # a sentence-transformers model's pooling, prompt, length
            width = embedding.model_width(model) if params.get("dims") is not None else None
            embedding.check_embedding_params(params, width=width)
        spec = RecordSpec(
            task=name,
            text_field=text_field,
            id_field=id_field,
            pair_field=pair_field,
            max_text_chars=self.settings.max_text_chars,
            skip_empty=skip_empty,
            models=(given_model, model),
            params=params,
        )
        records, source, where = _read(inputs, spec, input_format, stdin)
        if not C.MIN_PRIORITY <= priority <= C.MAX_PRIORITY:
            raise ConfigurationError(
                f"priority must be {C.MIN_PRIORITY} to {C.MAX_PRIORITY} (higher first), not {priority}"
            )
        check_broker(self.settings)  # in seconds, before anything is stored
        if name == generation.TASK:
            checker = prompts.load_checker(model, revision)
            if checker is not None:
                records = prompts.checked(records, checker, params, source=where, fail_long=fail_long_prompts)
        job_id = uuid.uuid4().hex
        lines = Lines()
        # Inputs stream from the reader into the store in batches; nothing holds the whole job in memory.
        try:
            total = self.store.create_job(
                new_job_row(
                    job_id,
                    key,
                    params=params,
                    priority=priority,
                    source=source,
                    use_cache=cache,
                    chunk_size=self.settings.chunk_size or C.DEFAULT_CHUNK_SIZE,
                ),
                self._rows(records, lines),
                unique_ids=not allow_duplicate_ids and not _format_checks_ids(inputs, input_format),
            )
        except DuplicateIdError as dup:
            both = (lines.line(dup.first), lines.line(dup.second))
            raise DuplicateIdError(dup.input_id, dup.first, dup.second, source=where, lines=both) from None
        log.info("stored job %s: %d items for %s", job_id, total, key.queue)
        row = self.store.job_row(job_id)
        assert row is not None
        size = chunk_size_for(self.store, key.queue, total, self.settings.chunk_size)
        with self._broker_errors(job_id):
            open_job(self.store, self._celery, row, chunk_size=size)
        self.store.mark_published(job_id)
        return Job(self.store, job_id)

    def _served_precision(self, task: str, model: str, revision: str | None) -> str:
        """The precision live workers serve for (task, model, revision): fp32 if it is among them or none is live."""
        served = {
            w["precision"]
            for w in self.store.live_workers()
            if (w["task"], w["model"], w["revision"]) == (task, model, revision)
        }
        for precision in PRECISIONS:
            if precision in served:
                return precision
        return "fp32"

    def _warn_if_served_elsewhere(self, key: ServeKey) -> None:
        """Warn when no live worker serves ``key`` but some serve its model at another precision (``auto`` chose it)."""
        live = self.store.live_workers()
        if any(w["queue"] == key.queue for w in live):
            return
        same_model = (key.task, key.model, key.revision)
        others = sorted({w["precision"] for w in live if (w["task"], w["model"], w["revision"]) == same_model})
        if others:
            log.warning(
                "no live worker serves %s at %s, only at %s: submit with that precision, or start a worker with "
                "--precision %s",
                key.model,
                key.precision,
                ", ".join(others),
                key.precision,
            )

    def _rows(self, records: Iterator[Record], lines: Lines) -> Iterator[list[NewItem]]:
        """New items in pages of ``INSERT_BATCH_ROWS`` (fewer where texts are long), noting each item's source
        line in ``lines``."""
        rows: list[NewItem] = []
        chars = 0
        idx = -1
        limit = self.settings.max_job_items
        for idx, rec in enumerate(records):
            if idx >= limit:
                raise InputError(f"job has more than {limit:,} items (PIPEQ_MAX_JOB_ITEMS)", line=rec.line)
            lines.note(idx, rec.line)
            rows.append(NewItem(idx, rec.input_id, rec.input, rec.size))
            chars += rec.size
            if len(rows) >= C.INSERT_BATCH_ROWS or chars >= C.INSERT_BATCH_CHARS:
                yield rows
                rows, chars = [], 0
        if idx < 0:
            raise InputError("the input holds no items")
        yield rows

    @contextmanager
    def _broker_errors(self, job_id: str) -> Iterator[None]:
        """A publish that fails leaves the job stored: record why on the job and say how to queue it later."""
        try:
            yield
        except BrokerError as exc:
            message = f"job {job_id} is stored but not queued: {exc}; `pipeq resume {job_id}` queues it later"
            self.store.set_job_error(job_id, message)
            raise BrokerError(message) from None

    def resume(self, job_id: str) -> int:
        """Queue a job's pending items again (after a broker loss); returns how many were published."""
        row = self.store.job_row(job_id)
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        if row["status"] in C.JOB_FINAL_STATES:
            return 0
        check_broker(self.settings)
        with self._broker_errors(job_id):
            return requeue(self.store, self._celery, row)
