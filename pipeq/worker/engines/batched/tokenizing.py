"""Tokenize a whole micro-batch in one fast-tokenizer call, and pad it without per-input tensors.

Why: for text-classification, feature-extraction and fill-mask, a pipeline's ``preprocess`` is one
tokenizer call per input that returns ``(1, n)`` tensors, which the worker then collates with
transformers' ``pad_collate_fn``. With small models the per-text calls and per-item tensors cost
more than the forward pass. The Rust tokenizer encodes a list of texts in one call
(``encode_batch``, which transformers uses even for a single text), so :class:`BatchTokenizer`
makes one call for all single texts and one for all text pairs, keeps the tokens as flat numpy
arrays per key (``encoding.TokenBlock``: made by the Rust tokenizer itself, without Python lists
per text, where ``encoding.RustEncoder`` can stand in for transformers' call), and builds each
padded batch as one numpy array per key, gathered from those arrays.

What is guaranteed, for the inputs and parameters it takes (``for_pipeline`` and ``accepts`` say
which; everything else stays on the per-input path):

* ``model_inputs(enc)`` equals ``pipe.preprocess(value, **pre)``: same keys, dtypes, ``(1, n)``
  shapes and values;
* an input whose ``preprocess`` raises gets that exception (same type and message) in place of its
  encoding, and never fails its batch-mates: a batched call that raises is split in halves until the
  failing input is alone, and that input is run through ``pipe.preprocess`` itself for its own error;
* ``collate(encs)`` equals ``pad_collate_fn(tokenizer, None)`` over those per-input outputs (same
  padding value per key, same padding side, int64).

Where batched and per-input tokenization could differ, and how that is handled:

* a text pair whose second text is empty (or None): a single call drops it (transformers tests
  ``if text_pair``) while a batched call would encode an empty second segment (an extra ``[SEP]``
  and different token type ids); such inputs are tokenized as single texts;
* one bad input in a batched call (a non-string, a lone surrogate, a pair too short for
  ``only_first``/``only_second`` truncation) makes the Rust tokenizer reject the whole call;
* tokenizer parameters that work across a batch (padding, overflowing tokens with a stride,
  offsets, lengths, pre-split words) or that are not known here: ``accepts`` says no;
* ``padding=None`` is not "no padding": transformers raises on it, so it is not accepted either;
* tokenizer classes that override ``__call__`` or ``_encode_plus`` (DPR, LUKE, MarkupLM, ...) and
  slow (Python) tokenizers are not used;
* input forms other than a string (and, for text-classification, ``{"text", "text_pair"}`` dicts
  and the ``[[text, pair]]`` list) are run through ``pipe.preprocess`` itself; their outputs, and
  rows with no tokens at all (which ``pad_collate_fn`` cannot left-pad), are collated by
  ``pad_collate_fn`` itself;
* ``pad_collate_fn`` pads ``token_type_ids`` with 0, not with the tokenizer's ``pad_token_type_id``;
  the same is done here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.pipelines.base import pad_collate_fn
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline
from transformers.pipelines.fill_mask import FillMaskPipeline
from transformers.pipelines.text_classification import TextClassificationPipeline
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from pipeq.worker.engines.batched.batching import token_length
from pipeq.worker.engines.batched.encoding import (
    CallSettings,
    RustEncoder,
    TokenBlock,
    block_from_lists,
    rust_unsupported,
)

log = logging.getLogger(__name__)

TEXT_CLASSIFICATION = "text-classification"
FEATURE_EXTRACTION = "feature-extraction"
FILL_MASK = "fill-mask"

#: The preprocess functions that are one plain tokenizer call, and the kind each one is.
_KINDS: dict[Callable[..., Any], str] = {
    TextClassificationPipeline.preprocess: TEXT_CLASSIFICATION,
    FeatureExtractionPipeline.preprocess: FEATURE_EXTRACTION,
    FillMaskPipeline.preprocess: FILL_MASK,
}
#: FillMaskPipeline.preprocess calls these for its mask check: they must be transformers' own too.
_MASK_CHECKS = ("ensure_exactly_one_mask_token", "_ensure_exactly_one_mask_token", "get_masked_index")
#: Tokenizer methods whose batched and single calls are known to agree (transformers' own).
_TOKENIZER_METHODS: dict[str, Any] = {
    "__call__": PreTrainedTokenizerBase.__call__,
    "_encode_plus": TokenizersBackend._encode_plus,
}

_TRUNCATIONS = (True, False, None, "longest_first", "only_first", "only_second", "do_not_truncate")
_NO_PADDING = (False, "do_not_pad")
_FLAGS = ("add_special_tokens", "return_special_tokens_mask", "verbose", "split_special_tokens")
_OPTIONAL_FLAGS = ("return_token_type_ids", "return_attention_mask")
#: Accepted only at their default: they change what a batched call returns, or need padding.
_DEFAULT_ONLY: dict[str, Any] = {
    "stride": 0,
    "return_overflowing_tokens": False,
    "return_offsets_mapping": False,
    "return_length": False,
    "is_split_into_words": False,
    "pad_to_multiple_of": None,
    "padding_side": None,
}
#: Keys pad_collate_fn pads with 1 (input_ids take the pad token id, everything else 0).
_PAD_WITH_ONE = frozenset({"p_mask", "special_tokens_mask"})


def _is_flag(value: Any, *, optional: bool = False) -> bool:
    return isinstance(value, bool) or (optional and value is None)


def _safe_tokenizer_kwarg(name: str, value: Any) -> bool:
    """Whether one tokenizer keyword gives per input what a call for that input alone gives."""
    if name == "truncation":
        return any(value is ok or (isinstance(ok, str) and value == ok) for ok in _TRUNCATIONS)
    if name == "padding":
        return any(value is ok or (isinstance(ok, str) and value == ok) for ok in _NO_PADDING)
    if name == "max_length":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if name in _FLAGS:
        return _is_flag(value)
    if name in _OPTIONAL_FLAGS:
        return _is_flag(value, optional=True)
    if name in _DEFAULT_ONLY:
        default = _DEFAULT_ONLY[name]
        return value is default or (type(value) is type(default) and value == default)
    return False


@dataclass(slots=True)
class Encoded:
    """One tokenized input: its row of a tokenizer call's ``TokenBlock``, or the pipeline's own output for it."""

    #: Tokens in the input (its ``input_ids`` width).
    n_tokens: int
    #: ``pipe.preprocess``'s own output, for an input form that was not tokenized in a batch.
    preprocessed: Mapping[str, Any] | None = None
    #: Whether truncation cut tokens off (the Rust encoding kept them as overflow); None when unknown.
    truncated: bool | None = None
    #: The tokens of the call that encoded this input, and this input's row in it.
    block: TokenBlock | None = None
    row: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        """Its model-input keys, sorted."""
        if self.preprocessed is not None:
            return tuple(sorted(self.preprocessed.keys()))
        assert self.block is not None
        return self.block.sorted_keys


class BatchTokenizer:
    """Batch tokenization for a pipeline whose ``preprocess`` is exactly one fast-tokenizer call."""

    def __init__(self, pipe: Any, kind: str) -> None:
        self.pipe = pipe
        self.kind = kind
        self.tokenizer: Any = pipe.tokenizer
        # Read once, as pad_collate_fn does when the runtime builds it.
        self.padding_side: str = self.tokenizer.padding_side
        self.pad_token_id: int | None = self.tokenizer.pad_token_id
        self._pad_collate: Callable[[list[Any]], dict[str, Any]] | None = None
        self._collate_error: ValueError | None = None
        try:
            self._pad_collate = pad_collate_fn(self.tokenizer, None)
        except ValueError as exc:  # no pad token: nothing can be collated, as in the runtime
            self._collate_error = exc
        #: The Rust tokenizer's own call, where it gives what transformers' call gives (else None: transformers').
        self.rust: RustEncoder | None = None
        reason = rust_unsupported(self.tokenizer)
        if reason is None:
            self.rust = RustEncoder(self.tokenizer)
        else:
            log.debug("transformers' tokenizer call for batches: %s", reason)

    # ------------------------------------------------------------ choosing

    @classmethod
    def for_pipeline(cls, pipe: Any, task: str) -> BatchTokenizer | None:
        """A BatchTokenizer for ``pipe``, or None where its inputs must be preprocessed one by one.

        What qualifies is the preprocess function itself (transformers' text-classification,
        feature-extraction or fill-mask one, inherited unchanged), not the task name: a subclass that
        overrides ``preprocess`` keeps the per-input path. ``task`` names the pipeline in the log.
        """
        bound = getattr(pipe, "preprocess", None)  # as the object resolves it: a method patched on it counts
        preprocess = getattr(bound, "__func__", bound)
        kind = _KINDS.get(preprocess) if preprocess is not None else None
        reason = cls._unsupported(pipe, kind)
        if kind is None or reason is not None:
            log.debug("per-input preprocessing for %s (%s): %s", task, type(pipe).__qualname__, reason)
            return None
        log.debug("batch tokenization for %s (%s)", task, type(pipe).__qualname__)
        return cls(pipe, kind)

    @staticmethod
    def _unsupported(pipe: Any, kind: str | None) -> str | None:
        if kind is None:
            return "its preprocess is not a plain tokenizer call"
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            return "no fast tokenizer"
        if not isinstance(tokenizer, TokenizersBackend) or any(
            getattr(type(tokenizer), name, None) is not method for name, method in _TOKENIZER_METHODS.items()
        ):
            return f"{type(tokenizer).__qualname__} has its own tokenizer call"
        if getattr(pipe, "feature_extractor", None) is not None or getattr(pipe, "image_processor", None) is not None:
            return "it has a feature extractor or image processor too"
        if kind == FILL_MASK:
            if tokenizer.mask_token_id is None:
                return "the tokenizer has no mask token"
            if any(getattr(type(pipe), name, None) is not getattr(FillMaskPipeline, name) for name in _MASK_CHECKS):
                return "it has its own mask-token check"
        return None

    def tokenizer_kwargs(self, pre: Mapping[str, Any]) -> dict[str, Any] | None:
        """What ``preprocess`` passes to the tokenizer for ``pre``; None when a batched call could differ."""
        if self.kind == FILL_MASK:
            # Fill-mask's preprocess ignores its other keywords (**preprocess_parameters).
            if pre.get("return_tensors") not in (None, "pt"):
                return None
            kwargs = pre.get("tokenizer_kwargs")
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, Mapping):
                return None
        else:
            kwargs = pre
        if all(isinstance(name, str) and _safe_tokenizer_kwarg(name, value) for name, value in kwargs.items()):
            return dict(kwargs)
        return None

    def accepts(self, pre: Mapping[str, Any]) -> bool:
        """Whether ``encode`` gives, under these preprocess parameters, what per-input preprocess gives."""
        return self.tokenizer_kwargs(pre) is not None

    # ------------------------------------------------------------ encoding

    def _text_and_pair(self, value: Any) -> tuple[str, str | None] | None:
        """The (text, pair) the tokenizer gets for ``value``; None for a form left to ``preprocess``."""
        if isinstance(value, str):
            return value, None
        if self.kind != TEXT_CLASSIFICATION:
            return None
        if isinstance(value, dict):
            if not value.keys() <= {"text", "text_pair"}:
                return None
            text, pair = value.get("text"), value.get("text_pair")
        elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) and len(value[0]) == 2:
            text, pair = value[0]
        else:
            return None
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            return None
        # A single call treats a falsy pair as no pair at all; a batched call would not.
        return text, pair or None

    def encode(self, values: Sequence[Any], pre: Mapping[str, Any]) -> list[Encoded | Exception]:
        """Tokenize ``values`` in as few calls as possible; per input its encoding or its preprocess error."""
        kwargs = self.tokenizer_kwargs(pre)
        if kwargs is None:
            raise ValueError(f"batch tokenization does not take these preprocess parameters: {sorted(pre)}")
        settings = CallSettings.of(self.tokenizer, kwargs) if self.rust is not None else None
        results: list[Encoded | Exception | None] = [None] * len(values)
        singles: list[tuple[int, str, None]] = []
        pairs: list[tuple[int, str, str]] = []
        for pos, value in enumerate(values):
            form = self._text_and_pair(value)
            if form is None:
                results[pos] = self._preprocess_alone(value, pre)
            elif form[1] is None:
                singles.append((pos, form[0], None))
            else:
                pairs.append((pos, form[0], form[1]))
        for group in (singles, pairs):
            if group:
                self._encode_group(group, values, pre, kwargs, settings, results)
        return [r if r is not None else RuntimeError("input was not encoded") for r in results]

    def _encode_group(
        self,
        group: Sequence[tuple[int, str, str | None]],
        values: Sequence[Any],
        pre: Mapping[str, Any],
        kwargs: dict[str, Any],
        settings: CallSettings | None,
        results: list[Encoded | Exception | None],
    ) -> None:
        try:
            block, truncated = self._call(group, kwargs, settings)
        except Exception as exc:
            if len(group) == 1:  # alone, the input gets the error its own preprocess raises
                pos = group[0][0]
                results[pos] = self._preprocess_alone(values[pos], pre)
                return
            # One input can make the whole call fail: split until it is alone.
            log.debug("tokenizer call on %d inputs failed (%s); splitting", len(group), type(exc).__name__)
            mid = len(group) // 2
            self._encode_group(group[:mid], values, pre, kwargs, settings, results)
            self._encode_group(group[mid:], values, pre, kwargs, settings, results)
            return
        masked = self._has_mask(block) if self.kind == FILL_MASK else None
        lengths = block.lengths.tolist()
        for row, ((pos, _text, _pair), n, cut) in enumerate(zip(group, lengths, truncated, strict=True)):
            if masked is not None and not masked[row]:
                results[pos] = self._preprocess_alone(values[pos], pre)  # raises the pipeline's own error
            else:
                results[pos] = Encoded(n, truncated=cut, block=block, row=row)

    def _has_mask(self, block: TokenBlock) -> list[bool]:
        """Per input of the block, whether its tokens hold the mask token (fill-mask's preprocess checks)."""
        hits = np.concatenate(([0], np.cumsum(block.values["input_ids"] == self.tokenizer.mask_token_id)))
        return (hits[block.starts + block.lengths] > hits[block.starts]).tolist()

    def _call(
        self, group: Sequence[tuple[int, str, str | None]], kwargs: dict[str, Any], settings: CallSettings | None
    ) -> tuple[TokenBlock, list[bool | None]]:
        """One tokenizer call over the group: its tokens, and per member whether truncation cut any."""
        texts = [text for _pos, text, _pair in group]
        pairs = None if group[0][2] is None else [pair or "" for _pos, _text, pair in group]  # a group is all pairs
        if self.rust is not None and not self.rust.ready():
            self.rust = None  # from now on transformers' call, which takes what the copy could not
        if self.rust is not None and settings is not None:
            block, truncated = self.rust.encode(texts, pairs, settings)
            return block, truncated.tolist()
        if pairs is None:
            out = self.tokenizer(texts, **kwargs)
        else:
            out = self.tokenizer(text=texts, text_pair=pairs, **kwargs)
        # The Rust tokenizer keeps what truncation cut off as overflowing encodings (transformers drops them).
        encodings = out.encodings or [None] * len(texts)
        return block_from_lists(out.data), [None if enc is None else bool(enc.overflowing) for enc in encodings]

    def _preprocess_alone(self, value: Any, pre: Mapping[str, Any]) -> Encoded | Exception:
        try:
            out = self.pipe.preprocess(value, **pre)
        except Exception as exc:
            return exc
        return Encoded(token_length(out), preprocessed=out)

    # ------------------------------------------------------------ tensors

    def model_inputs(self, enc: Encoded) -> dict[str, torch.Tensor]:
        """What ``pipe.preprocess`` returns for this input: ``(1, n)`` int64 tensors per key."""
        if enc.preprocessed is not None:
            return dict(enc.preprocessed)  # a copy: forward passes may add keys to it
        assert enc.block is not None
        return {key: torch.from_numpy(enc.block.row(key, enc.row)).reshape(1, -1) for key in enc.block.keys}

    def _pad_value(self, key: str) -> int:
        if key == "input_ids":
            assert self.pad_token_id is not None
            return int(self.pad_token_id)
        return 1 if key in _PAD_WITH_ONE else 0

    def collate(self, encs: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """What ``pad_collate_fn(tokenizer, None)`` returns for these inputs' preprocess outputs."""
        if self._pad_collate is None:
            assert self._collate_error is not None
            raise self._collate_error
        if not encs:
            raise ValueError("nothing to collate")
        block = encs[0].block
        if block is not None and all(e.block is block for e in encs):
            rows = np.fromiter((e.row for e in encs), dtype=np.intp, count=len(encs))
            lengths = block.lengths[rows]
            if lengths.min() > 0:
                return self._gather(block, rows, lengths)
        elif all(e.block is not None for e in encs) and len({e.block.keys for e in encs if e.block}) == 1:
            lengths = np.fromiter((e.n_tokens for e in encs), dtype=np.int64, count=len(encs))
            if lengths.min() > 0:
                return self._join(encs, lengths)
        # Rare forms, rows with no tokens (which it cannot left-pad) and mismatched keys: its own result or error.
        return self._pad_collate([self.model_inputs(e) for e in encs])

    def _kept(self, lengths: np.ndarray) -> np.ndarray:
        """Which positions of the padded (rows, longest) batch hold tokens."""
        width = int(lengths.max())
        columns = np.arange(width)
        if self.padding_side == "left":
            return columns >= (width - lengths)[:, None]
        return columns < lengths[:, None]

    def _gather(self, block: TokenBlock, rows: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
        """The padded batch of ``rows`` of one block: each key gathered from its flat array in one indexing."""
        keep = self._kept(lengths)
        # Row-major order: each row's tokens land in its kept positions, in order.
        before = np.cumsum(lengths) - lengths
        source = np.repeat(block.starts[rows] - before, lengths) + np.arange(int(lengths.sum()))
        out: dict[str, torch.Tensor] = {}
        for key in block.keys:
            pad = self._pad_value(key)
            if key in block.constant:
                array = np.where(keep, np.int64(block.constant[key]), np.int64(pad))
            else:
                array = np.full(keep.shape, pad, dtype=np.int64)
                array[keep] = block.values[key][source]
            out[key] = torch.from_numpy(array)
        return out

    def _join(self, encs: Sequence[Encoded], lengths: np.ndarray) -> dict[str, torch.Tensor]:
        """The padded batch of rows of several blocks (with the same keys), row by row."""
        keep = self._kept(lengths)
        keys = encs[0].block.keys  # type: ignore[union-attr]
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            array = np.full(keep.shape, self._pad_value(key), dtype=np.int64)
            array[keep] = np.concatenate([e.block.row(key, e.row) for e in encs])  # type: ignore[union-attr]
            out[key] = torch.from_numpy(array)
        return out
