"""Batch tokenization gives exactly what the pipeline's own per-input preprocess and pad_collate_fn give."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from transformers import pipeline
from transformers.models.bert.tokenization_bert import BertTokenizer
from transformers.pipelines.base import pad_collate_fn
from transformers.pipelines.pt_utils import PipelineIterator
from transformers.pipelines.text_classification import TextClassificationPipeline

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.embedding import EmbeddingPipeline
from pipeq.worker.engines.batched.encoding import single_type_ids_are_zero
from pipeq.worker.engines.batched.tokenizing import BatchTokenizer, Encoded
from pipeq.worker.loading import set_tokenizer_threads

LONG = "The weather in Paris is lovely in spring, and John Smith went there with Mary. " * 12  # > 128 tokens
TEXTS: list[Any] = [
    "",
    "hello world",
    "x",
    "I've been waiting for a HuggingFace course my whole life.",
    "我非常讨厌这个！",
    "我一直都在等待 HuggingFace 课程。",
    "café naïve 🤗 Ünïcödé",
    "  spaces   around  ",
    "a " * 300 + "end",
    LONG,
    "[SEP] [CLS] special tokens written in the text",
    "\ud800 a lone surrogate",  # the Rust tokenizer rejects it: so does a batched call with it in
    "日本語のテキストと한국어 텍스트, mixed with English",
    "😀😃🤗 emoji only 👩‍👩‍👧 with a joiner sequence",
    "🤗" * 200,  # one token each: truncated at the cap
    "x " * 126,  # exactly at the cap of 128 with [CLS] and [SEP]
    "x " * 127,  # one over
]
BAD: list[Any] = [None, 42, 3.5, b"bytes"]
PAIRS: list[Any] = [
    {"text": "what is the capital of France?", "text_pair": "Paris is the capital of France."},
    {"text": "only a text"},
    {"text": "an empty pair", "text_pair": ""},  # a single call drops it; a batched one would not
    {"text": "a None pair", "text_pair": None},
    {"text": LONG, "text_pair": LONG},
    {"text": "", "text_pair": "empty first"},
    {"text": "我非常讨厌这个！", "text_pair": "我一直都在等待"},
    [["the list form", "of a text pair"]],
    [["list form, empty pair", ""]],
    [["list form, None pair", None]],
    {"text_pair": "no text"},
    {"text": 5, "text_pair": "a number"},
    {"text": "a number pair", "text_pair": 7},
    ["two", "texts"],
    [["one"]],
    {"text": "an extra key", "text_pair": "b", "return_length": True},
]
MASKED: list[Any] = [
    "hello [MASK] world",
    "[MASK]",
    "two masks: [MASK] and [MASK].",
    "no mask at all",
    "",
    "我[MASK]讨厌这个",
    LONG + " [MASK]",  # the mask is cut off by truncation
    "[MASK] " + LONG,
    "\ud800 [MASK]",
]

#: Per task: the inputs and several job parameter sets that batch tokenization accepts.
CASES: dict[str, tuple[list[Any], list[dict[str, Any]]]] = {
    "text-classification": (
        TEXTS + PAIRS + BAD,
        [
            {"truncation": True},
            {},
            {"max_length": 12},
            {"truncation": "only_first", "max_length": 9},
            {"truncation": "only_second", "max_length": 9},
            {"truncation": True, "add_special_tokens": False},
            {"truncation": True, "return_special_tokens_mask": True, "return_token_type_ids": False},
            {"truncation": True, "split_special_tokens": True, "return_attention_mask": False},
            {"truncation": False},
        ],
    ),
    "feature-extraction": (
        TEXTS + BAD + [["hello", "world"], ["uneven", "list of texts"]],
        [
            {"truncation": True},
            {"tokenize_kwargs": {"truncation": True, "max_length": 16, "return_attention_mask": False}},
            {"truncation": True, "tokenize_kwargs": {"padding": "do_not_pad", "verbose": False}},
        ],
    ),
    "fill-mask": (
        MASKED + BAD,
        [
            {"tokenizer_kwargs": {"truncation": True}},
            {},
            {"tokenizer_kwargs": {"truncation": True, "max_length": 12, "return_special_tokens_mask": True}},
        ],
    ),
}
CASE_IDS = [(task, i) for task, (_inputs, params) in CASES.items() for i in range(len(params))]


@pytest.fixture(scope="module")
def pipes(model_dir: Callable[[str], str]) -> Callable[[str], Any]:
    built: dict[str, Any] = {}

    def _get(task: str) -> Any:
        if task not in built:
            built[task] = pipeline(task, model=model_dir(task))
        return built[task]

    return _get


def pre_params(pipe: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The preprocess parameters of a call with ``params``, as the pipeline (and the worker) splits them."""
    # A deep copy: feature-extraction's _sanitize_parameters writes truncation into the caller's tokenize_kwargs.
    pre, _fwd, _post = pipe._sanitize_parameters(**copy.deepcopy(params))
    return {**pipe._preprocess_params, **pre}


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", what ``fn`` returned) or ("error", what it raised)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:
        return "error", exc


def assert_same_tensors(got: Any, want: Any) -> None:
    assert set(got.keys()) == set(want.keys())
    for key in want.keys():
        g, w = got[key], want[key]
        assert isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor), key
        assert g.dtype == w.dtype, key
        assert g.shape == w.shape, key
        assert torch.equal(g, w), key


def assert_same_error(got: Any, want: BaseException) -> None:
    assert isinstance(got, Exception), f"expected {type(want).__name__}: {want}, got {got!r}"
    assert type(got) is type(want)
    assert str(got) == str(want)


def check_encode(bt: BatchTokenizer, pipe: Any, values: Sequence[Any], pre: dict[str, Any]) -> list[Any]:
    """``encode`` + ``model_inputs`` against ``pipe.preprocess``, input by input; returns the encodings."""
    encs = bt.encode(values, pre)
    assert len(encs) == len(values)
    for value, enc in zip(values, encs, strict=True):
        status, want = outcome(pipe.preprocess, value, **pre)
        if status == "error":
            assert_same_error(enc, want)
            continue
        assert isinstance(enc, Encoded), f"{value!r}: {enc!r}"
        assert_same_tensors(bt.model_inputs(enc), want)
        assert enc.n_tokens == want["input_ids"].shape[-1]
        if isinstance(value, str) or (isinstance(value, dict) and value.keys() <= {"text", "text_pair"}):
            assert enc.preprocessed is None, "a text or text pair must be tokenized in a batched call"
    return encs


def check_collate(
    bt: BatchTokenizer, pipe: Any, encs: Sequence[Any], values: Sequence[Any], pre: dict[str, Any]
) -> None:
    """``collate`` against pad_collate_fn over the per-input preprocess outputs, on several batches."""
    ok = [(v, e) for v, e in zip(values, encs, strict=True) if isinstance(e, Encoded)]
    assert len(ok) >= 2
    by_length = sorted(ok, key=lambda ve: ve[1].n_tokens)
    batches = [ok, by_length[:2], by_length[-3:], ok[:1], [ok[1], ok[1], ok[1]]]
    collate = pad_collate_fn(pipe.tokenizer, None)
    for batch in batches:
        status, want = outcome(collate, [pipe.preprocess(v, **pre) for v, _ in batch])
        got_status, got = outcome(bt.collate, [e for _, e in batch])
        assert got_status == status, (got, want)
        if status == "error":
            assert_same_error(got, want)
        else:
            assert_same_tensors(got, want)


def batch_tokenizer(pipe: Any, task: str, call: str) -> BatchTokenizer:
    """The pipeline's BatchTokenizer, making its calls through the Rust tokenizer or through transformers'."""
    bt = BatchTokenizer.for_pipeline(pipe, task)
    assert bt is not None
    assert bt.rust is not None, "a plain fast tokenizer takes the Rust tokenizer's own call"
    if call == "transformers":
        bt.rust = None
    return bt


@pytest.mark.parametrize("call", ["rust", "transformers"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("task", "case"), CASE_IDS)
def test_encode_and_collate_equal_per_input_preprocess(
    pipes: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch, task: str, case: int, padding_side: str, call: str
) -> None:
    pipe = pipes(task)
    monkeypatch.setattr(pipe.tokenizer, "padding_side", padding_side)
    inputs, param_sets = CASES[task]
    pre = pre_params(pipe, param_sets[case])
    bt = batch_tokenizer(pipe, task, call)
    assert bt.accepts(pre), pre
    assert bt.padding_side == padding_side
    encs = check_encode(bt, pipe, inputs, pre)
    assert sum(isinstance(e, Encoded) for e in encs) >= 3
    assert sum(isinstance(e, Exception) for e in encs) >= len(BAD)
    check_collate(bt, pipe, encs, inputs, pre)


def test_truncation_happens_at_the_model_maximum(pipes: Callable[[str], Any]) -> None:
    pipe = pipes("text-classification")
    bt = BatchTokenizer.for_pipeline(pipe, "text-classification")
    assert bt is not None
    encs = bt.encode([LONG, {"text": LONG, "text_pair": LONG}, "short"], {"truncation": True})
    assert [e.n_tokens for e in encs if isinstance(e, Encoded)][:2] == [128, 128]


def test_fill_mask_errors_are_the_pipelines_own(pipes: Callable[[str], Any]) -> None:
    pipe = pipes("fill-mask")
    bt = BatchTokenizer.for_pipeline(pipe, "fill-mask")
    assert bt is not None
    encs = bt.encode(["no mask", "one [MASK]", "[MASK] and [MASK]"], {})
    assert isinstance(encs[0], Exception) and "No mask_token ([MASK]) found on the input" in str(encs[0])
    assert isinstance(encs[1], Encoded) and isinstance(encs[2], Encoded)


@pytest.fixture
def tokenizer_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every tokenizer call of a BatchTokenizer: (texts, pairs) as passed."""
    calls: list[Any] = []
    original = BatchTokenizer._call

    def counting(self: Any, group: Any, *args: Any) -> Any:
        pairs = None if group[0][2] is None else [pair for _pos, _text, pair in group]
        calls.append(([text for _pos, text, _pair in group], pairs))
        return original(self, group, *args)

    monkeypatch.setattr(BatchTokenizer, "_call", counting)
    yield calls


@pytest.mark.parametrize("call", ["rust", "transformers"])
def test_one_call_for_texts_and_one_for_pairs(
    pipes: Callable[[str], Any], tokenizer_calls: list[Any], call: str
) -> None:
    pipe = pipes("text-classification")
    bt = batch_tokenizer(pipe, "text-classification", call)
    values = ["a", "b c", {"text": "d", "text_pair": "e"}, [["f", "g"]], {"text": "h"}, "i"]
    encs = bt.encode(values, {"truncation": True})
    assert all(isinstance(e, Encoded) for e in encs)
    assert tokenizer_calls == [(["a", "b c", "h", "i"], None), (["d", "f"], ["e", "g"])]


@pytest.mark.parametrize("call", ["rust", "transformers"])
def test_a_failing_input_is_isolated_by_splitting(
    pipes: Callable[[str], Any], tokenizer_calls: list[Any], call: str
) -> None:
    pipe = pipes("feature-extraction")
    bt = batch_tokenizer(pipe, "feature-extraction", call)
    values = [f"text number {i}" for i in range(16)]
    values[11] = "\ud800"
    encs = bt.encode(values, {"truncation": True})
    assert [i for i, e in enumerate(encs) if isinstance(e, Exception)] == [11]
    assert len(tokenizer_calls) < 16, "split in halves, not retried input by input"


def test_the_rust_call_leaves_the_pipelines_tokenizer_as_it_was(
    pipes: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Rust call runs on a copy: the pipeline's own tokenizer is neither called nor re-configured."""
    pipe = pipes("text-classification")
    bt = batch_tokenizer(pipe, "text-classification", "rust")
    rust = pipe.tokenizer.backend_tokenizer
    before = (rust.truncation, rust.padding, rust.encode_special_tokens)
    calls: list[Any] = []
    monkeypatch.setattr(BertTokenizer, "__call__", lambda *a, **k: calls.append(a))
    for params in (
        {"truncation": True, "max_length": 9},
        {"truncation": "only_second"},
        {"split_special_tokens": True},
    ):
        encs = bt.encode(["a text [SEP] here", {"text": "one", "text_pair": "two words"}], params)
        assert all(isinstance(e, Encoded) for e in encs)
    assert calls == []
    assert (rust.truncation, rust.padding, rust.encode_special_tokens) == before


def test_truncation_flags_say_whether_tokens_were_cut(pipes: Callable[[str], Any]) -> None:
    """Around the cap, single texts and pairs: flagged exactly when the untruncated text has more tokens."""
    pipe = pipes("text-classification")
    bt = batch_tokenizer(pipe, "text-classification", "rust")
    values: list[Any] = ["x " * k for k in range(120, 132)]
    values += [{"text": "x " * k, "text_pair": "y " * 60} for k in range(60, 70)]
    for params in ({"truncation": True}, {"truncation": True, "max_length": 20}, {"truncation": "only_first"}):
        encs = bt.encode(values, params)
        for value, enc in zip(values, encs, strict=True):
            assert isinstance(enc, Encoded)
            text, pair = (value, None) if isinstance(value, str) else (value["text"], value["text_pair"])
            full = len(pipe.tokenizer(text, text_pair=pair)["input_ids"])
            assert enc.truncated == (full > enc.n_tokens), (value, params)


def test_type_ids_are_read_where_the_template_gives_single_texts_another(
    model_dir: Callable[[str], str],
) -> None:
    """A post-processor that gives single texts type id 1: the Rust call reads type ids, not assumes zeros."""
    from tokenizers.processors import TemplateProcessing

    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    tok = pipe.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS]:1 $A:1 [SEP]:1",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)],
    )
    bt = batch_tokenizer(pipe, "text-classification", "rust")
    pre = pre_params(pipe, {"truncation": True})
    encs = check_encode(bt, pipe, TEXTS + PAIRS, pre)
    assert int(bt.model_inputs(encs[1])["token_type_ids"].sum()) > 0
    check_collate(bt, pipe, encs, TEXTS + PAIRS, pre)


class _Words:
    """A pre-tokenizer written in Python: the Rust tokenizer cannot be serialized (nor copied) with it."""

    def pre_tokenize(self, pretok: Any) -> None:
        pretok.split(lambda _i, s: s.split(" ", "removed"))


def test_a_tokenizer_that_cannot_be_copied_is_called_through_transformers(model_dir: Callable[[str], str]) -> None:
    from tokenizers.pre_tokenizers import PreTokenizer

    pipe = pipeline("text-classification", model=model_dir("text-classification"))
    pipe.tokenizer.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(_Words())
    bt = batch_tokenizer(pipe, "text-classification", "rust")
    values = ["hello world", "two words here", {"text": "a pair", "text_pair": "of texts"}]
    encs = check_encode(bt, pipe, values, pre_params(pipe, {"truncation": True}))
    assert all(e.preprocessed is None for e in encs), "still one batched call"
    assert bt.rust is None


@pytest.mark.parametrize(
    ("post_processor", "zero"),
    [
        (None, True),
        ({"type": "BertProcessing"}, True),
        ({"type": "ByteLevel"}, True),
        ({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}]}, True),
        ({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 2}}]}, False),
        ({"type": "Sequence", "processors": [{"type": "ByteLevel"}, {"type": "BertProcessing"}]}, True),
        ({"type": "Sequence", "processors": [{"type": "ByteLevel"}, {"type": "SomethingNew"}]}, False),
        ({"type": "SomethingNew"}, False),
    ],
)
def test_type_ids_of_single_texts_are_assumed_zero_only_for_known_post_processors(
    post_processor: Any, zero: bool
) -> None:
    assert single_type_ids_are_zero(post_processor) is zero


def test_truncation_from_the_left_and_left_padding(
    pipes: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = pipes("feature-extraction")
    monkeypatch.setattr(pipe.tokenizer, "truncation_side", "left")
    monkeypatch.setattr(pipe.tokenizer, "padding_side", "left")
    bt = batch_tokenizer(pipe, "feature-extraction", "rust")
    pre = pre_params(pipe, {"truncation": True, "tokenize_kwargs": {"max_length": 16}})
    values = [t for t in TEXTS if t and "\ud800" not in t]
    encs = check_encode(bt, pipe, values, pre)
    check_collate(bt, pipe, encs, values, pre)


def test_model_inputs_are_fresh_dicts(pipes: Callable[[str], Any]) -> None:
    pipe = pipes("feature-extraction")
    bt = BatchTokenizer.for_pipeline(pipe, "feature-extraction")
    assert bt is not None
    enc, odd = bt.encode(["hello", ["same", "size"]], {"truncation": True})
    assert isinstance(enc, Encoded) and isinstance(odd, Encoded) and odd.preprocessed is not None
    for e in (enc, odd):
        bt.model_inputs(e)["use_cache"] = False
        assert "use_cache" not in bt.model_inputs(e)


# ---------------------------------------------------------------- which pipelines and parameters


class OwnPreprocess(TextClassificationPipeline):
    def preprocess(self, inputs: Any, **tokenizer_kwargs: Any) -> Any:
        return super().preprocess(inputs.lower(), **tokenizer_kwargs)


class OwnCallTokenizer(BertTokenizer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs)


def test_for_pipeline_takes_only_plain_tokenizer_preprocess(
    pipes: Callable[[str], Any], model_dir: Callable[[str], str], minilm_dir: str
) -> None:
    for task in ("text-classification", "feature-extraction", "fill-mask"):
        assert BatchTokenizer.for_pipeline(pipes(task), task) is not None
    embedding = pipeline("feature-extraction", model=model_dir("feature-extraction"), pipeline_class=EmbeddingPipeline)
    assert BatchTokenizer.for_pipeline(embedding, "feature-extraction") is not None
    for task in ("token-classification", "zero-shot-classification", "text-generation"):
        assert BatchTokenizer.for_pipeline(pipes(task), task) is None, task

    model = model_dir("text-classification")
    own = pipeline("text-classification", model=model, pipeline_class=OwnPreprocess)
    assert BatchTokenizer.for_pipeline(own, "text-classification") is None

    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=os.path.join(minilm_dir, "vocab.txt"))
    assert not slow.is_fast
    assert BatchTokenizer.for_pipeline(pipeline("text-classification", model=model, tokenizer=slow), "x") is None
    own_call = OwnCallTokenizer.from_pretrained(model)
    assert own_call.is_fast
    assert BatchTokenizer.for_pipeline(pipeline("text-classification", model=model, tokenizer=own_call), "x") is None


@pytest.mark.parametrize(
    ("task", "params"),
    [
        ("text-classification", {"padding": True}),
        ("text-classification", {"padding": "longest"}),
        ("text-classification", {"padding": "max_length"}),
        ("text-classification", {"padding": None}),  # transformers raises on it, per input
        ("text-classification", {"truncation": True, "return_overflowing_tokens": True, "stride": 2}),
        ("text-classification", {"stride": 2}),
        ("text-classification", {"return_offsets_mapping": True}),
        ("text-classification", {"return_length": True}),
        ("text-classification", {"is_split_into_words": True}),
        ("text-classification", {"pad_to_multiple_of": 8}),
        ("text-classification", {"padding_side": "left"}),
        ("text-classification", {"return_tensors": "pt"}),  # twice a keyword: preprocess raises
        ("text-classification", {"truncation": "bogus"}),
        ("text-classification", {"truncation": 1}),
        ("text-classification", {"max_length": "12"}),
        ("text-classification", {"add_special_tokens": "yes"}),
        ("text-classification", {"tokenizer_kwargs": {"truncation": True}}),
        ("text-classification", {"text_target": "label"}),
        ("text-classification", {"some_unknown_option": 1}),
        ("feature-extraction", {"tokenize_kwargs": {"padding": True}}),
        ("feature-extraction", {"tokenize_kwargs": {"return_tensors": "np"}}),
        ("fill-mask", {"tokenizer_kwargs": {"padding": True}}),
        ("fill-mask", {"tokenizer_kwargs": {"return_tensors": "pt"}}),
        ("fill-mask", {"tokenizer_kwargs": {"return_overflowing_tokens": True}}),
    ],
)
def test_accepts_refuses_what_a_batched_call_could_change(
    pipes: Callable[[str], Any], task: str, params: dict[str, Any]
) -> None:
    pipe = pipes(task)
    bt = BatchTokenizer.for_pipeline(pipe, task)
    assert bt is not None
    pre = pre_params(pipe, params)
    assert not bt.accepts(pre)
    with pytest.raises(ValueError, match="does not take these preprocess parameters"):
        bt.encode(["hello"], pre)


def test_accepts_raw_preprocess_parameters(pipes: Callable[[str], Any]) -> None:
    bt = BatchTokenizer.for_pipeline(pipes("fill-mask"), "fill-mask")
    assert bt is not None
    assert bt.accepts({}) and bt.accepts({"return_tensors": "pt"}) and bt.accepts({"tokenizer_kwargs": None})
    assert not bt.accepts({"return_tensors": "np"})
    assert not bt.accepts({"tokenizer_kwargs": [("truncation", True)]})
    bt = BatchTokenizer.for_pipeline(pipes("text-classification"), "text-classification")
    assert bt is not None
    assert bt.accepts({"truncation": "longest_first", "padding": "do_not_pad", "max_length": None})
    assert bt.accepts({"padding": False, "return_token_type_ids": None, "split_special_tokens": True})


# ---------------------------------------------------------------- end to end


def run_collated(bt: BatchTokenizer, pipe: Any, values: list[Any], params: dict[str, Any]) -> list[Any]:
    """encode + collate, one forward, transformers' unbatching (as the worker does), then postprocess."""
    pre, fwd, post = pipe._sanitize_parameters(**copy.deepcopy(params))
    pre = {**pipe._preprocess_params, **pre}
    encs = bt.encode(values, pre)
    assert all(isinstance(e, Encoded) for e in encs)
    collated = bt.collate(encs)
    unbatch = iter(PipelineIterator([collated], pipe.forward, {**pipe._forward_params, **fwd}, len(values)))
    results = []
    for enc in encs:
        out = next(unbatch)
        n = enc.n_tokens
        for name in ("last_hidden_state", "attention_mask"):  # cut padded positions off per-token outputs
            tensor = out.get(name) if hasattr(out, "get") else None
            if tensor is not None and tensor.ndim >= 2 and tensor.shape[1] > n:
                out[name] = tensor[:, -n:] if bt.padding_side == "left" else tensor[:, :n]
        results.append(pipe.postprocess(out, **{**pipe._postprocess_params, **post}))
    return results


def assert_close(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key])
    elif isinstance(want, list) and want and isinstance(want[0], list) and want[0] and isinstance(want[0][0], float):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)  # vectors: shapes must match too
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5)
    else:
        assert got == want


E2E_TEXTS = [t for t in TEXTS if t and "\ud800" not in t] + ["one more text of middling length here"]


@pytest.mark.parametrize(
    ("task", "values", "params"),
    [
        # (The [[text, pair]] form is preprocess's, not __call__'s: a list there is a list of inputs.)
        ("text-classification", E2E_TEXTS + PAIRS[:7], {"truncation": True, "top_k": None}),
        ("feature-extraction", E2E_TEXTS, {"truncation": True}),
        (
            "fill-mask",
            [m for m in MASKED if "[MASK]" in m and "\ud800" not in m and not m.endswith(" [MASK]")],
            {"tokenizer_kwargs": {"truncation": True}},
        ),
    ],
)
def test_forward_on_collated_batch_gives_the_pipelines_result(
    pipes: Callable[[str], Any], task: str, values: list[Any], params: dict[str, Any]
) -> None:
    """Right padding only: BERT's absolute positions make left-padded rows compute something else."""
    pipe = pipes(task)
    bt = BatchTokenizer.for_pipeline(pipe, task)
    assert bt is not None
    want = [pipe(v, **params) for v in values]
    got = run_collated(bt, pipe, values, params)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if task == "text-classification" and isinstance(w, list) and len(w) == 1 and isinstance(w[0], list):
            w = w[0]
        assert_close(g, w)


def test_worker_tokenizer_threads_one_on_the_cpu_a_share_of_the_cores_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    key = ServeKey("text-classification", "m", "fp32")
    monkeypatch.setattr("pipeq.worker.devices.available_cores", lambda: 16)
    assert WorkerConfig(key=key).resolved_tokenizer_threads == 1
    assert WorkerConfig(key=key, device="cuda:0").resolved_tokenizer_threads == C.MAX_TOKENIZER_THREADS
    assert WorkerConfig(key=key, device="cuda:0", concurrency=4).resolved_tokenizer_threads == 3
    assert WorkerConfig(key=key, device="cuda:0", concurrency=16).resolved_tokenizer_threads == 1
    assert WorkerConfig(key=key, tokenizer_threads=3).resolved_tokenizer_threads == 3
    with pytest.raises(ConfigurationError, match="--tokenizer-threads"):
        WorkerConfig(key=key, tokenizer_threads=0)


def test_parallel_tokenizer_gives_the_same_encodings(
    pipes: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA worker lets the tokenizer split a batch over threads: every input's encoding stays its preprocess's."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    assert set_tokenizer_threads(2) == 2
    assert (os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"]) == ("true", "2")
    pipe = pipes("text-classification")
    inputs, param_sets = CASES["text-classification"]
    pre = pre_params(pipe, param_sets[0])
    bt = BatchTokenizer.for_pipeline(pipe, "text-classification")
    assert bt is not None
    encs = check_encode(bt, pipe, inputs * 8, pre)
    check_collate(bt, pipe, encs, inputs * 8, pre)
    assert set_tokenizer_threads(1) == 1
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
