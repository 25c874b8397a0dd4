"""A tokenizer call's inputs as numpy arrays, straight from the Rust tokenizer.

Why: transformers' fast-tokenizer call turns every encoding into Python lists (``_convert_encoding``
builds a list per model input per text, then a dict and a ``BatchEncoding``), which was the largest
frame of a worker's host time. :class:`RustEncoder` makes the same call on a private copy of the
tokenizer's Rust ``Tokenizer``, configured exactly as transformers configures its own for that call
(``set_truncation_and_padding``: truncation strategy, length, side; no padding; split special tokens),
and reads the encodings into one flat int64 array per model input (:class:`TokenBlock`): the token ids
through C iterators, the attention mask (all ones without padding) and, where the tokenizer's
post-processor gives every single text the type id 0, the token type ids without reading them at all.

A private copy, because the pipeline's own tokenizer is shared (the pipeline calls it too) and every
transformers call re-configures the Rust tokenizer's truncation and padding for itself. Where a
tokenizer class changes how transformers calls or reads the Rust tokenizer (``rust_unsupported`` says
which), the caller keeps transformers' own call and turns its lists into a block (``block_from_lists``).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
from transformers.tokenization_utils_base import PreTrainedTokenizerBase, TruncationStrategy
from transformers.tokenization_utils_tokenizers import TokenizersBackend

log = logging.getLogger(__name__)

INPUT_IDS, TOKEN_TYPE_IDS, ATTENTION_MASK, SPECIAL_TOKENS_MASK = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "special_tokens_mask",
)
#: The Encoding attribute behind each model-input key.
_ATTRIBUTES = {
    INPUT_IDS: "ids",
    TOKEN_TYPE_IDS: "type_ids",
    ATTENTION_MASK: "attention_mask",
    SPECIAL_TOKENS_MASK: "special_tokens_mask",
}
#: transformers methods that decide how a call configures and reads the Rust tokenizer: a class that
#: overrides any of them keeps transformers' own call.
_CALL_METHODS: dict[str, Any] = {
    "_encode_plus": TokenizersBackend._encode_plus,
    "_convert_encoding": TokenizersBackend._convert_encoding,
    "set_truncation_and_padding": TokenizersBackend.set_truncation_and_padding,
    "_get_padding_truncation_strategies": PreTrainedTokenizerBase._get_padding_truncation_strategies,
}
#: Post-processors that give every token of a single text the type id 0 (besides a template that says so).
_ZERO_TYPE_PROCESSORS = frozenset({"BertProcessing", "RobertaProcessing", "ByteLevel"})


@dataclass(frozen=True, slots=True, eq=False)
class TokenBlock:
    """The tokens of one tokenizer call's inputs: per model-input key, every input's values back to back."""

    #: Model-input keys in the order transformers returns them.
    keys: tuple[str, ...]
    #: Flat int64 values per key, for keys not in ``constant``.
    values: dict[str, np.ndarray]
    #: Keys whose every value is one number (the attention mask without padding: 1).
    constant: dict[str, int]
    #: Where each input's values start in ``values``, and how many it has (its tokens).
    starts: np.ndarray
    lengths: np.ndarray
    #: ``keys`` sorted (what tells the runtime which inputs may share a batch).
    sorted_keys: tuple[str, ...]

    def row(self, key: str, row: int) -> np.ndarray:
        """Input ``row``'s values of ``key`` (a copy)."""
        n = int(self.lengths[row])
        if key in self.constant:
            return np.full(n, self.constant[key], dtype=np.int64)
        start = int(self.starts[row])
        return self.values[key][start : start + n].copy()


def _block(
    keys: tuple[str, ...], lengths: np.ndarray, values: dict[str, np.ndarray], constant: dict[str, int]
) -> TokenBlock:
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return TokenBlock(keys, values, constant, starts, lengths, tuple(sorted(keys)))


def block_from_lists(data: Mapping[str, Sequence[Sequence[int]]]) -> TokenBlock:
    """A block of a transformers call's output (lists of token lists per key)."""
    keys = tuple(data)
    ids = data[INPUT_IDS]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    values = {key: np.fromiter(itertools.chain.from_iterable(data[key]), dtype=np.int64, count=total) for key in keys}
    return _block(keys, lengths, values, {})


def rust_unsupported(tokenizer: Any) -> str | None:
    """Why ``RustEncoder`` cannot stand in for this tokenizer's call (None: it can)."""
    if not isinstance(tokenizer, TokenizersBackend) or not isinstance(
        getattr(tokenizer, "_tokenizer", None), _rust_type()
    ):
        return "no Rust tokenizer"
    for name, method in _CALL_METHODS.items():
        if getattr(type(tokenizer), name, None) is not method:
            return f"{type(tokenizer).__qualname__} has its own {name}"
    if hasattr(tokenizer, "_switch_to_input_mode") or hasattr(tokenizer, "_switch_to_target_mode"):
        return f"{type(tokenizer).__qualname__} switches modes around its calls"
    return None


def _rust_type() -> type:
    from tokenizers import Tokenizer

    return Tokenizer


def single_type_ids_are_zero(post_processor: Mapping[str, Any] | None) -> bool:
    """Whether a post-processor (its tokenizer.json entry) gives every token of a single text the type id 0."""
    if post_processor is None:
        return True
    kind = post_processor.get("type")
    if kind in _ZERO_TYPE_PROCESSORS:
        return True
    if kind == "TemplateProcessing":
        pieces = post_processor.get("single") or []
        return all(
            isinstance(piece, Mapping) and all(part.get("type_id") == 0 for part in piece.values()) for piece in pieces
        )
    if kind == "Sequence":
        return all(single_type_ids_are_zero(p) for p in post_processor.get("processors") or [])
    return False


def _zero_single_types(processor: Any) -> bool:
    """``single_type_ids_are_zero`` of a Rust post-processor (its JSON as pickling writes it); False where unread."""
    if processor is None:
        return True
    try:
        return single_type_ids_are_zero(json.loads(processor.__getstate__()))
    except Exception:  # a post-processor that does not say what it is: type ids are read
        log.debug("post-processor %r not read; token type ids are read from each encoding", processor)
        return False


@dataclass(frozen=True, slots=True)
class CallSettings:
    """What one transformers tokenizer call with given keywords asks of the Rust tokenizer, and what it returns."""

    #: ``enable_truncation``'s arguments, or None for no truncation.
    truncation: dict[str, Any] | None
    add_special_tokens: bool
    split_special_tokens: bool
    #: The model-input keys the call returns, in transformers' order.
    keys: tuple[str, ...]
    verbose: bool

    @property
    def max_length(self) -> int | None:
        return None if self.truncation is None else int(self.truncation["max_length"])

    @classmethod
    def of(cls, tokenizer: Any, kwargs: Mapping[str, Any]) -> CallSettings:
        """The settings of ``tokenizer(texts, **kwargs)`` (keywords ``BatchTokenizer.tokenizer_kwargs`` accepts)."""
        kw = dict(kwargs)
        verbose = bool(kw.get("verbose", True))
        _padding, strategy, max_length, _ = tokenizer._get_padding_truncation_strategies(
            padding=kw.pop("padding", False),
            truncation=kw.pop("truncation", None),
            max_length=kw.pop("max_length", None),
            pad_to_multiple_of=None,
            verbose=verbose,
        )
        truncation = None
        if strategy != TruncationStrategy.DO_NOT_TRUNCATE:
            truncation = {
                "max_length": max_length,
                "stride": 0,
                "strategy": strategy.value,
                "direction": tokenizer.truncation_side,
            }
        names = tokenizer.model_input_names
        types, mask = kw.get("return_token_type_ids"), kw.get("return_attention_mask")
        wanted = {
            INPUT_IDS: True,
            TOKEN_TYPE_IDS: TOKEN_TYPE_IDS in names if types is None else types,
            ATTENTION_MASK: ATTENTION_MASK in names if mask is None else mask,
            SPECIAL_TOKENS_MASK: bool(kw.get("return_special_tokens_mask", False)),
        }
        split = kw.get("split_special_tokens")
        return cls(
            truncation=truncation,
            add_special_tokens=bool(kw.get("add_special_tokens", True)),
            split_special_tokens=bool(tokenizer.split_special_tokens if split is None else split),
            keys=tuple(key for key, on in wanted.items() if on),
            verbose=verbose,
        )


class RustEncoder:
    """A private copy of a fast tokenizer's Rust tokenizer, which encodes a call's inputs into a ``TokenBlock``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._rust: Any = None  # copied at the first call: a large vocabulary takes a moment
        self._zero_single_types = False
        self._truncation: dict[str, Any] | None = None
        #: Configuring and encoding go together: one thread at a time.
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Copy the Rust tokenizer if not done yet; False where it cannot be copied (a custom Python component)."""
        if self._rust is not None:
            return True
        try:
            with self._lock:
                self._copy()
        except Exception as exc:
            log.info(
                "the Rust tokenizer cannot be copied (%s: %s); transformers' call tokenizes", type(exc).__name__, exc
            )
            return False
        return True

    def _copy(self) -> Any:
        if self._rust is None:
            from tokenizers import Tokenizer

            rust = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            rust.no_padding()
            rust.no_truncation()
            self._zero_single_types = _zero_single_types(rust.post_processor)
            self._rust = rust
        return self._rust

    def encode(
        self, texts: list[str], pairs: list[str] | None, settings: CallSettings
    ) -> tuple[TokenBlock, np.ndarray]:
        """One call over ``texts`` (with ``pairs``): their block, and whether truncation cut tokens off each.

        Raises what the Rust tokenizer raises (one bad input fails the call, as transformers' call does).
        """
        with self._lock:
            rust = self._copy()
            if settings.truncation != self._truncation:
                if settings.truncation is None:
                    rust.no_truncation()
                else:
                    rust.enable_truncation(**settings.truncation)
                self._truncation = settings.truncation
            if rust.encode_special_tokens != settings.split_special_tokens:
                rust.encode_special_tokens = settings.split_special_tokens
            batch: list[Any] = texts if pairs is None else list(zip(texts, pairs, strict=True))
            encode = getattr(rust, "encode_batch_fast", rust.encode_batch)  # _fast: without character offsets
            encodings = encode(batch, add_special_tokens=settings.add_special_tokens)
        n = len(encodings)
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=n)
        total = int(lengths.sum())
        values: dict[str, np.ndarray] = {}
        constant: dict[str, int] = {}
        for key in settings.keys:
            if key == ATTENTION_MASK:
                constant[key] = 1  # no padding: every position is a token
            elif key == TOKEN_TYPE_IDS and pairs is None and self._zero_single_types:
                constant[key] = 0
            else:
                lists = map(attrgetter(_ATTRIBUTES[key]), encodings)
                values[key] = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)
        truncated = np.zeros(n, dtype=bool)
        limit = settings.max_length
        if limit is not None:
            # Truncation cuts an input to exactly ``limit`` tokens, and the Rust encoding keeps what it cut.
            for row in np.flatnonzero(lengths >= limit).tolist():
                truncated[row] = bool(encodings[row].overflowing)
        elif settings.verbose and n and int(lengths.max()) > self.tokenizer.model_max_length:
            # transformers' own warning (once per tokenizer) about an input longer than the model takes
            self.tokenizer._eventual_warn_about_too_long_sequence(range(int(lengths.max())), None, True)
        return _block(settings.keys, lengths, values, constant), truncated
