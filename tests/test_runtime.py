"""The runtime runs the real pipeline stages in micro-batches and gives what ``pipeline(...)`` gives."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from transformers import pipeline

from pipeq.worker.engines.batched.runtime import STREAM_BACKLOG, PipelineRuntime, offline_defaults
from pipeq.worker.serialize import to_jsonable

MIXED = [
    "hello world",
    "I've been waiting for a HuggingFace course my whole life.",
    "我非常讨厌这个！",
    "我一直都在等待 HuggingFace 课程。",
    "short",
    "The weather in Paris is lovely in spring, and John Smith went there with Mary. " * 3,
    "a " * 300 + "end",  # longer than the model's 128 tokens
]

CASES: dict[str, tuple[list[Any], dict[str, Any]]] = {
    "text-classification": (MIXED, {}),
    "token-classification": (MIXED, {"aggregation_strategy": "simple"}),
    "fill-mask": (
        ["hello [MASK] world", "the [MASK] is blue today and also tomorrow", "我[MASK]讨厌这个"],
        {"top_k": 3},
    ),
    "feature-extraction": (MIXED[:6], {}),
    "zero-shot-classification": (MIXED[:6], {"candidate_labels": ["sports", "politics", "food"]}),
    "text-generation": (
        ["hello there", "once upon a time in a land far away", "我非常"],
        {"max_new_tokens": 4, "do_sample": False},
    ),
    "table-question-answering": (
        [
            {"table": {"name": ["ann", "bob"], "age": ["31", "42"]}, "query": "how old is ann?"},
            {"table": {"city": ["paris", "rome", "oslo"]}, "query": "which city is in italy?"},
        ],
        {},
    ),
}


def assert_close(got: Any, want: Any, path: str = "$", *, tol: float = 1e-4) -> None:
    """Labels, tokens and structure identical; floats within ``tol`` (1e-4: fp32 on the same device)."""
    if isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, abs=tol), path
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]", tol=tol)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}", tol=tol)
    else:
        assert got == want, path


def run_all(rt: PipelineRuntime, inputs: list[Any], params: dict[str, Any]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for results, _timing in rt.run(list(enumerate(inputs)), params):
        for r in results:
            assert r.idx not in out, "an item was reported twice"
            out[r.idx] = r
    assert sorted(out) == list(range(len(inputs))), "every item gets exactly one result"
    return out


def reference(task: str, model: str, inputs: list[Any], params: dict[str, Any]) -> list[Any]:
    """What plain transformers returns for each input (offline defaults applied, one call)."""
    pipe = pipeline(task, model=model)
    params = offline_defaults(task, params)
    if task in ("text-classification", "token-classification", "zero-shot-classification"):
        return to_jsonable(pipe(list(inputs), **params))
    # These return a bare result for a one-element list, so call them per input.
    return [to_jsonable(pipe(x, **params)) for x in inputs]


#: How the runtime lays its stages out: (prepare_ahead, streams).
LAYOUTS = {"serial": (0, 1), "overlapped": (2, 1), "streams": (2, 3)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("task", sorted(CASES))
def test_outputs_equal_plain_pipeline(task: str, layout: str, model_dir: Callable[[str], str]) -> None:
    # Given a tiny model and mixed-length inputs (English, Chinese, one over the model's maximum)
    inputs, params = CASES[task]
    model = model_dir(task)
    # When pipeq runs them in small token-budget micro-batches, its stages serial, overlapped, or with
    # several forward passes at once
    prepare_ahead, streams = LAYOUTS[layout]
    rt = PipelineRuntime(
        pipeline(task, model=model),
        task,
        max_batch_tokens=256,
        max_batch_size=2 if streams > 1 else 4,  # more batches than streams
        prepare_ahead=prepare_ahead,
        streams=streams,
        stream_threads=1 if streams > 1 else None,
    )
    out = run_all(rt, inputs, params)
    # Then every output equals what transformers returns for that input
    errors = {i: r.error for i, r in out.items() if r.error}
    assert not errors
    assert_close([out[i].output for i in range(len(inputs))], reference(task, model, inputs, params))


def test_token_budget_cuts_batches_and_records_padding(model_dir: Callable[[str], str]) -> None:
    rt = PipelineRuntime(
        pipeline("text-classification", model=model_dir("text-classification")),
        "text-classification",
        max_batch_tokens=64,
        max_batch_size=8,
    )
    timings = [t for _, t in rt.run(list(enumerate(MIXED)), {}) if t is not None]
    assert len(timings) > 1
    for t in timings:
        assert t.padded_tokens <= 64 or t.rows == 1
        assert t.real_tokens <= t.padded_tokens
        assert t.forward_ms > 0 and t.total_ms >= t.forward_ms
    assert sum(t.size for t in timings) == len(MIXED)


def test_long_text_is_truncated_and_flagged(model_dir: Callable[[str], str]) -> None:
    rt = PipelineRuntime(pipeline("text-classification", model=model_dir("text-classification")), "text-classification")
    out = run_all(rt, MIXED, {})
    assert out[6].status == "done" and out[6].truncated is True
    assert [out[i].truncated for i in range(6)] == [False] * 6
    assert out[6].n_tokens == 128


def test_truncation_off_fails_only_the_long_item(model_dir: Callable[[str], str]) -> None:
    rt = PipelineRuntime(
        pipeline("text-classification", model=model_dir("text-classification")),
        "text-classification",
        max_batch_size=64,
    )
    out = run_all(rt, MIXED, {"truncation": False})
    assert out[6].status == "failed" and "forward" in out[6].error
    assert all(out[i].status == "done" for i in range(6))


def test_text_pairs(model_dir: Callable[[str], str]) -> None:
    model = model_dir("text-classification")
    pairs = [{"text": "a cat sat", "text_pair": "a cat was sitting"}, {"text": "hi", "text_pair": "我非常讨厌这个"}]
    rt = PipelineRuntime(pipeline("text-classification", model=model), "text-classification")
    out = run_all(rt, pairs, {})
    assert_close([out[0].output, out[1].output], reference("text-classification", model, pairs, {}))


class _Poisoned:
    """Wraps a pipeline so chosen inputs fail in one stage, as bad data would."""

    def __init__(self, pipe: Any, stage: str, marker: str) -> None:
        self._pipe, self._stage, self._marker = pipe, stage, marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def preprocess(self, text: Any, **kw: Any) -> Any:
        if self._stage == "preprocess" and self._marker in text:
            raise ValueError("cannot tokenize this")
        out = self._pipe.preprocess(text, **kw)
        if self._stage == "forward" and self._marker in text:
            out["input_ids"] = out["input_ids"] + 10**7  # out of the vocabulary: the embedding raises
        return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("stage", ["preprocess", "forward"])
def test_poison_item_fails_alone(stage: str, layout: str, model_dir: Callable[[str], str]) -> None:
    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    prepare_ahead, streams = LAYOUTS[layout]
    rt = PipelineRuntime(
        _Poisoned(pipe, stage, "POISON"),
        "text-classification",
        max_batch_size=4 if streams > 1 else 8,
        prepare_ahead=prepare_ahead,
        streams=streams,
    )
    texts = [f"text number {i}" for i in range(10)]
    texts[4] = "this is POISON here"
    out = run_all(rt, texts, {})
    assert out[4].status == "failed" and out[4].error.startswith(stage)
    assert all(out[i].status == "done" for i in range(10) if i != 4)


class _Meeting:
    """Wraps a pipeline so each forward pass waits until ``parties`` passes are running at once."""

    def __init__(self, pipe: Any, parties: int) -> None:
        self._pipe = pipe
        self.barrier = threading.Barrier(parties, timeout=30)
        self.threads: set[str] = set()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def forward(self, inputs: Any, **kw: Any) -> Any:
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.barrier.wait()  # raises BrokenBarrierError if the passes do not run at once
            return self._pipe.forward(inputs, **kw)
        finally:
            with self._lock:
                self.running -= 1


def test_streams_run_forward_passes_at_once_and_hand_results_on_in_order(model_dir: Callable[[str], str]) -> None:
    # Given a pipeline whose forward passes wait for each other two by two, and four batches of two
    pipe = _Meeting(pipeline("text-classification", model=model_dir("text-classification")), parties=2)
    rt = PipelineRuntime(pipe, "text-classification", max_batch_size=2, streams=2, stream_threads=1)
    texts = [f"text number {i}" for i in range(8)]
    # When the runtime runs them with two streams
    batches = [[r.idx for r in results] for results, _ in rt.run(list(enumerate(texts)), {})]
    rt.close()
    # Then two passes ran at once (else the barrier breaks and the items fail), on the streams' own threads
    assert pipe.most == 2 and len(pipe.threads) == 2
    assert all(name.startswith("pipeq-forward") for name in pipe.threads)
    # And each batch's results come once, in the order the batches were cut, all of them done
    assert sorted(i for batch in batches for i in batch) == list(range(8)) and len(batches) == 4
    out = run_all(PipelineRuntime(pipe._pipe, "text-classification", max_batch_size=2), texts, {})
    assert all(r.status == "done" for r in out.values())


class _SlowFirst:
    """Wraps a pipeline so its first forward pass runs until ``others`` later passes have finished (or
    ``patience`` seconds went by), counting how many did meanwhile."""

    def __init__(self, pipe: Any, others: int, patience: float) -> None:
        self._pipe = pipe
        self.others, self.patience = others, patience
        self.calls = 0
        self.finished_meanwhile = 0
        self.first_running = True
        self.enough = threading.Event()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def forward(self, inputs: Any, **kw: Any) -> Any:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        out = self._pipe.forward(inputs, **kw)
        if first:
            self.enough.wait(self.patience)
            self.first_running = False
            return out
        with self._lock:
            if self.first_running:
                self.finished_meanwhile += 1
                if self.finished_meanwhile >= self.others:
                    self.enough.set()
        return out


def test_a_stream_that_finishes_takes_the_next_batch_while_an_older_one_still_runs(
    model_dir: Callable[[str], str],
) -> None:
    # Given two streams, and a first batch whose forward pass runs until two later batches have finished
    pipe = _SlowFirst(pipeline("text-classification", model=model_dir("text-classification")), 2, patience=20)
    rt = PipelineRuntime(pipe, "text-classification", max_batch_size=1, streams=2, stream_threads=1)
    texts = [f"text number {i}" for i in range(6)]
    # When the runtime runs six batches of one
    order = [[r.idx for r in results] for results, _ in rt.run(list(enumerate(texts)), {})]
    rt.close()
    # Then the free stream ran the second and third batches while the first still ran (waiting for the
    # oldest batch would have kept it idle, and the first pass would have waited out its patience)
    assert pipe.enough.is_set() and pipe.finished_meanwhile >= 2
    # And the results still come in the order the batches were cut, each once
    serial = PipelineRuntime(pipe._pipe, "text-classification", max_batch_size=1)
    assert order == [[r.idx for r in results] for results, _ in serial.run(list(enumerate(texts)), {})]


def test_finished_batches_wait_behind_a_running_one_only_up_to_a_bound(model_dir: Callable[[str], str]) -> None:
    # Given two streams, and a first batch whose forward pass runs until 100 later ones have finished
    # (more than may wait for it) or a second went by
    pipe = _SlowFirst(pipeline("text-classification", model=model_dir("text-classification")), 100, patience=1.0)
    rt = PipelineRuntime(pipe, "text-classification", max_batch_size=1, streams=2, stream_threads=1)
    texts = [f"text number {i}" for i in range(40)]
    # When the runtime runs forty batches of one
    out = {r.idx: r for results, _ in rt.run(list(enumerate(texts)), {}) for r in results}
    rt.close()
    # Then no more than the bound finished while the slow one ran (the rest waited for it), and all are done.
    # The slow pass is the first forward call, which the other stream may start first: the batch cut before
    # it then finishes meanwhile too, besides the 2 x STREAM_BACKLOG - 1 that may wait behind it.
    assert 0 < pipe.finished_meanwhile <= 2 * STREAM_BACKLOG
    assert not pipe.enough.is_set()
    assert sorted(out) == list(range(40)) and all(r.status == "done" for r in out.values())


def test_closing_a_stream_early_leaves_no_forward_pass_running(model_dir: Callable[[str], str]) -> None:
    # Given two streams on a pipeline that counts its running forward passes
    pipe = _Meeting(pipeline("text-classification", model=model_dir("text-classification")), parties=1)
    rt = PipelineRuntime(pipe, "text-classification", max_batch_size=1, streams=2, stream_threads=1)
    steps = rt.stream(list(enumerate(f"text {i}" for i in range(10))), {})
    # When the consumer takes one step and stops (a worker told to stop)
    first = next(steps)
    steps.close()
    # Then no forward pass is left running, and what was taken is a whole batch's result
    assert pipe.running == 0
    results, _ = first.finish()
    assert [r.status for r in results] == ["done"]
    rt.close()


def test_a_runtime_used_in_a_with_block_stops_its_stream_threads_even_when_the_block_raises(
    model_dir: Callable[[str], str],
) -> None:
    def stream_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("pipeq-forward")}

    # Given a runtime with two streams, used as precision measurements use it
    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    before = stream_threads()
    # When its block runs batches on the streams' threads, then raises
    with pytest.raises(RuntimeError, match="measurement failed"):
        with PipelineRuntime(pipe, "text-classification", max_batch_size=1, streams=2, stream_threads=1) as rt:
            out = run_all(rt, ["a text", "another text", "a third"], {})
            started = stream_threads() - before
            raise RuntimeError("measurement failed")
    # Then the streams had run the batches, and none of their threads is left
    assert [r.status for r in out.values()] == ["done"] * 3 and len(started) == 2
    assert not stream_threads() - before and not any(t.is_alive() for t in started)


def test_postprocess_failure_fails_alone(model_dir: Callable[[str], str]) -> None:
    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    calls = {"n": 0}
    real = pipe.postprocess

    def flaky(outputs: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("postprocess blew up")
        return real(outputs, **kw)

    pipe.postprocess = flaky
    rt = PipelineRuntime(pipe, "text-classification")
    out = run_all(rt, [f"text {i}" for i in range(6)], {})
    failed = [i for i, r in out.items() if r.status == "failed"]
    assert len(failed) == 1 and "postprocess: RuntimeError" in out[failed[0]].error


class _SmallMemory:
    """Wraps a pipeline whose forward runs out of memory above a number of rows, as a small GPU would."""

    def __init__(self, pipe: Any, max_rows: int) -> None:
        self._pipe, self._max_rows, self.calls = pipe, max_rows, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def forward(self, inputs: Any, **kw: Any) -> Any:
        self.calls += 1
        if inputs["input_ids"].shape[0] > self._max_rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._pipe.forward(inputs, **kw)


def test_out_of_memory_splits_the_batch_and_lowers_the_budget(model_dir: Callable[[str], str]) -> None:
    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    small = _SmallMemory(pipe, max_rows=3)
    rt = PipelineRuntime(small, "text-classification", max_batch_tokens=100_000, max_batch_size=16)
    texts = [f"text number {i} " * 3 for i in range(16)]
    out = run_all(rt, texts, {})
    assert all(r.status == "done" for r in out.values()), "no item fails for the worker's lack of memory"
    assert rt.max_batch_tokens < 100_000
    lowered = rt.max_batch_tokens
    # The next chunk is cut to the lowered budget, so it needs fewer retries than the first.
    calls_before = small.calls
    run_all(rt, texts, {})
    assert small.calls - calls_before < calls_before
    assert rt.max_batch_tokens <= lowered


PAIRS: list[Any] = [
    {"text": "a " * 200 + "end", "text_pair": "short pair"},  # the first text alone overflows
    {"text": "short", "text_pair": "b " * 200},  # the pair alone overflows
    {"text": "x " * 61, "text_pair": "y " * 62},  # exactly at the cap of 128 with [CLS] and two [SEP]
    {"text": "x " * 62, "text_pair": "y " * 62},  # one token over
    {"text": "hello", "text_pair": ""},  # an empty pair is a single text
    "x " * 126,  # a single text exactly at the cap
    "x " * 127,  # one over
]


@pytest.mark.parametrize(
    ("task", "inputs", "params"),
    [
        ("text-classification", MIXED + PAIRS, {}),
        ("text-classification", PAIRS, {"truncation": "only_second"}),
        ("text-classification", PAIRS[:4], {"truncation": "longest_first", "max_length": 40}),
        ("text-classification", MIXED, {"top_k": None, "function_to_apply": "sigmoid"}),
        ("feature-extraction", MIXED, {"pooling": "mean", "normalize": True}),
        ("feature-extraction", MIXED, {"tokenize_kwargs": {"max_length": 16, "truncation": True}}),
        ("fill-mask", ["hello [MASK] world", "[MASK] " + "word " * 200, "no mask here", 7], {"top_k": 2}),
    ],
)
def test_batch_tokenization_gives_what_per_input_preprocess_gives(
    model_dir: Callable[[str], str], task: str, inputs: list[Any], params: dict[str, Any]
) -> None:
    """Outputs, errors, token counts and truncation flags are the same with one tokenizer call per slice."""
    from pipeq.worker.embedding import EmbeddingPipeline

    kind = "text-classification" if task == "text-classification" else task
    extra = {"pipeline_class": EmbeddingPipeline} if task == "feature-extraction" else {}
    pipe = pipeline(task, model=model_dir(kind), **extra)
    batched = PipelineRuntime(pipe, task, max_batch_size=4)
    assert batched._batch_tokenizer is not None, "this task and tokenizer take the batch path"
    alone = PipelineRuntime(pipe, task, max_batch_size=4)
    alone._batch_tokenizer = None  # the per-input path: pipe.preprocess for each input
    got, want = run_all(batched, inputs, params), run_all(alone, inputs, params)
    for i in range(len(inputs)):
        g, w = got[i], want[i]
        assert (g.status, g.error, g.n_tokens, g.truncated) == (w.status, w.error, w.n_tokens, w.truncated), i
        assert_close(g.output, w.output, f"input {i}", tol=1e-5)
    assert any(r.truncated for r in want.values()) or task == "fill-mask"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"top_k": None},
        {"top_k": 2},
        {"function_to_apply": "sigmoid"},
        {"function_to_apply": "none", "top_k": None},
        {"function_to_apply": "softmax", "top_k": 1},
    ],
)
@pytest.mark.parametrize("problem", [None, "multi_label_classification", "regression"])
def test_batch_postprocess_gives_what_per_input_postprocess_gives(
    model_dir: Callable[[str], str], params: dict[str, Any], problem: str | None
) -> None:
    """Labels and float32 scores bit for bit, for every scoring function and top_k form."""
    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    pipe.model.config.problem_type = problem
    batched = PipelineRuntime(pipe, "text-classification", max_batch_size=8)
    assert batched._batch_postprocessor is not None
    alone = PipelineRuntime(pipe, "text-classification", max_batch_size=8)
    alone._batch_postprocessor = None  # per input: PipelineIterator's unbatching, then pipe.postprocess
    inputs = MIXED * 3
    batches = postprocessed_batches(batched)
    got, want = run_all(batched, inputs, params), run_all(alone, inputs, params)
    assert batches and all(b is not None for b in batches), "every batch was postprocessed at once"
    assert [got[i].output for i in range(len(inputs))] == [want[i].output for i in range(len(inputs))]
    reference = pipe(inputs, truncation=True, **params)  # and plain pipeline(...) agrees (one text at a time)
    for i, ref in enumerate(reference):
        assert_close(got[i].output, to_jsonable(ref), f"input {i}")


def test_batch_postprocess_is_used_only_for_transformers_own_classes(model_dir: Callable[[str], str]) -> None:
    from transformers.pipelines.text_classification import TextClassificationPipeline

    class Custom(TextClassificationPipeline):
        def postprocess(self, model_outputs: Any, **kwargs: Any) -> Any:
            return {"custom": True}

    pipe = pipeline("text-classification", model=model_dir("text-classification"), pipeline_class=Custom)
    rt = PipelineRuntime(pipe, "text-classification")
    assert rt._batch_postprocessor is None
    assert {r.output["custom"] for r in run_all(rt, MIXED, {}).values()} == {True}


def postprocessed_batches(rt: PipelineRuntime) -> list[Any]:
    """What ``rt.postprocess_batch`` returns for each batched forward output from now on (None: the batch went
    input by input; a batch of one row runs unbatched, and is left out)."""
    seen: list[Any] = []
    real = rt.postprocess_batch

    def spy(segment: Any, post: dict[str, Any]) -> Any:
        out = real(segment, post)
        if segment.batched:
            seen.append(out)
        return out

    rt.postprocess_batch = spy  # type: ignore[method-assign]
    return seen


def _feature_runtimes(pipe: Any, padding_side: str) -> tuple[PipelineRuntime, PipelineRuntime]:
    """A runtime that postprocesses whole batches, and one that postprocesses input by input (same batches)."""
    pipe.tokenizer.padding_side = padding_side
    batched = PipelineRuntime(pipe, "feature-extraction", max_batch_size=8)
    assert batched._batch_postprocessor is not None, "feature extraction is postprocessed a batch at a time"
    alone = PipelineRuntime(pipe, "feature-extraction", max_batch_size=8)
    alone._batch_postprocessor = None  # per input: PipelineIterator's unbatching, unpadding, then pipe.postprocess
    return batched, alone


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"pooling": "mean"},
        {"pooling": "mean", "normalize": True},
        {"pooling": "cls", "normalize": True, "dims": 8},
        {"pooling": "max", "dims": 5},
        {"pooling": "mean", "normalize": True, "dtype": "float16"},
        {"pooling": "max", "dtype": "float16"},
    ],
)
def test_batch_postprocess_of_embeddings_gives_what_per_input_postprocess_gives(
    model_dir: Callable[[str], str], params: dict[str, Any], padding_side: str
) -> None:
    """Vectors per token and pooled vectors (bytes) bit for bit, for every pooling, normalize, dims and dtype."""
    from pipeq.vectors import Vector
    from pipeq.worker.embedding import EmbeddingPipeline

    pipe = pipeline("feature-extraction", model=model_dir("feature-extraction"), pipeline_class=EmbeddingPipeline)
    batched, alone = _feature_runtimes(pipe, padding_side)
    inputs = MIXED * 3 + ["x " * n for n in range(1, 12)]  # every length more than once, and many lengths
    batches = postprocessed_batches(batched)
    got, want = run_all(batched, inputs, params), run_all(alone, inputs, params)
    assert len(batches) > 1 and all(b is not None for b in batches), "every batch was postprocessed at once"
    for i in range(len(inputs)):
        assert got[i].status == want[i].status == "done"
        assert got[i].output == want[i].output, i
        if params.get("pooling"):
            assert isinstance(got[i].output, Vector) and got[i].output.blob == want[i].output.blob
    if not params and padding_side == "right":  # and a vector per token is transformers' own (right-padded: BERT)
        reference = pipeline("feature-extraction", model=model_dir("feature-extraction"))
        assert_close(got[0].output, to_jsonable(reference(inputs[0], truncation=True)))


def test_plain_feature_extraction_is_postprocessed_a_batch_at_a_time_too(model_dir: Callable[[str], str]) -> None:
    pipe = pipeline("feature-extraction", model=model_dir("feature-extraction"))
    batched, alone = _feature_runtimes(pipe, "right")
    batches = postprocessed_batches(batched)
    got, want = run_all(batched, MIXED, {}), run_all(alone, MIXED, {})
    assert batches and all(b is not None for b in batches)
    assert [got[i].output for i in range(len(MIXED))] == [want[i].output for i in range(len(MIXED))]


def test_feature_extraction_served_under_a_task_that_keeps_padding_is_postprocessed_input_by_input(
    model_dir: Callable[[str], str],
) -> None:
    """A custom task name has no per-token trait: the runtime does not unpad, so neither may its postprocess."""
    pipe = pipeline("feature-extraction", model=model_dir("feature-extraction"))
    assert PipelineRuntime(pipe, "feature-extraction")._batch_postprocessor is not None
    assert PipelineRuntime(pipe, "my-own-features")._batch_postprocessor is None


class _Spoiled:
    """Wraps a pipeline so the forward output of its rows with ``marker`` holds NaN (logits) or a hole in the mask."""

    def __init__(self, pipe: Any, what: str) -> None:
        self._pipe, self._what = pipe, what

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def forward(self, inputs: Any, **kw: Any) -> Any:
        out = self._pipe.forward(inputs, **kw)
        if self._what == "nan":
            out["logits"][0, 0] = float("nan")
        else:
            out["attention_mask"][0, 0] = 0  # the first row's first token is not pooled over, per input
        return out


@pytest.mark.parametrize("what", ["nan", "hole"])
def test_batches_that_batch_postprocessing_cannot_reproduce_go_input_by_input(
    model_dir: Callable[[str], str], what: str
) -> None:
    """A NaN score (stored as null) or a mask with a hole: the batch goes through the per-input path."""
    from pipeq.worker.embedding import EmbeddingPipeline

    if what == "nan":
        task, params = "text-classification", {"top_k": None}
        pipe = pipeline(task, model=model_dir(task))
    else:
        task, params = "feature-extraction", {"pooling": "mean"}
        pipe = pipeline(task, model=model_dir(task), pipeline_class=EmbeddingPipeline)
    spoiled = _Spoiled(pipe, what)
    batched = PipelineRuntime(spoiled, task, max_batch_size=8)
    assert batched._batch_postprocessor is not None
    segments = postprocessed_batches(batched)
    alone = PipelineRuntime(spoiled, task, max_batch_size=8)
    alone._batch_postprocessor = None
    got, want = run_all(batched, MIXED, params), run_all(alone, MIXED, params)
    assert segments and segments[0] is None, "the first batch is refused by batch postprocessing"
    assert [got[i].output for i in range(len(MIXED))] == [want[i].output for i in range(len(MIXED))]
    if what == "nan":
        assert any(s["score"] is None for r in got.values() for s in r.output)
