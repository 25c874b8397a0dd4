"""The sequence engine: greedy outputs equal ``model.generate`` on each prompt alone, token for token; each
item ends on its own (stop strings, end of sequence, its own max_tokens); bad items fail alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from pipeq import constants as C
from pipeq.errors import ConfigurationError
from pipeq.primitives import ItemResult
from pipeq.routing import ServeKey
from pipeq.worker.config import WorkerConfig
from pipeq.worker.engines import build_engine, engine_name
from pipeq.worker.engines.sequence.engine import SequenceEngine
from pipeq.worker.loading import load_pipeline
from pipeq.worker.placement import parse_device_map

TASK = "text-generation"
PROMPTS = [
    "hello there",
    "once upon a time in a land far away there lived a king",
    "a",
    "the quick brown fox jumps over the lazy dog " * 4,
    "我非常喜欢",
    "x y z",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
]


def _engine(path: str, **kwargs: Any) -> SequenceEngine:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return SequenceEngine(pipeline(TASK, model=model, tokenizer=tok), **{"max_rows": 3, "kv_tokens": 100_000, **kwargs})


def _run(
    engine: SequenceEngine, items: list[tuple[int, Any]], params: dict[str, Any] | None = None
) -> dict[int, ItemResult]:
    out: dict[int, ItemResult] = {}
    for results, _timing in engine.run(items, params or {}):
        for r in results:
            assert r.idx not in out, "an item was reported twice"
            out[r.idx] = r
    assert sorted(out) == sorted(idx for idx, _ in items), "every item gets exactly one result"
    return out


def _alone(engine: SequenceEngine, ids: list[int], max_new_tokens: int) -> list[int]:
    """What ``model.generate`` gives the prompt alone, greedy, ending where the engine's end-of-sequence ids do
    (without the one it ended on)."""
    tensor = torch.tensor([ids])
    eos = sorted(engine.scheduler.eos) or [engine.model.config.vocab_size + 1]  # none: one no logit stands for
    out = engine.model.generate(
        input_ids=tensor,
        attention_mask=torch.ones_like(tensor),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    new = out[0, len(ids) :].tolist()
    ends = [i for i, token in enumerate(new) if token in eos]
    return new[: ends[0]] if ends else new


def test_text_generation_runs_on_the_sequence_engine() -> None:
    assert engine_name(TASK) == "sequence"
    assert engine_name("text-classification") == "batched"


@pytest.mark.parametrize("ends", ["end-of-sequence", "max_tokens"])
def test_greedy_outputs_equal_generate_on_each_prompt_alone(causal_lm: str, ending_lm: str, ends: str) -> None:
    # 3 rows for 7 prompts: rows are freed and taken again mid-run
    engine = _engine(causal_lm if ends == "max_tokens" else ending_lm)
    budgets = [5 + 9 * i for i in range(len(PROMPTS))]
    items = [
        (i, {"prompt": p, "params": {"max_tokens": n}}) for i, (p, n) in enumerate(zip(PROMPTS, budgets, strict=True))
    ]
    out = _run(engine, items)
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer(prompt)["input_ids"]
        want = _alone(engine, ids, budgets[i])
        got = out[i]
        assert got.status == C.ITEM_DONE
        assert got.output["generated_text"] == engine.tokenizer.decode(want, skip_special_tokens=True), i
        assert got.output["completion_tokens"] == got.output_tokens == len(want)
        assert got.output["prompt_tokens"] == got.n_tokens == len(ids)
        assert got.output["finish_reason"] == ("length" if len(want) == budgets[i] else "stop")
        assert got.first_token_ms is not None and got.first_token_ms >= 0 and got.decode_ms is not None
    if ends == "max_tokens":
        assert [out[i].output["completion_tokens"] for i in range(len(PROMPTS))] == budgets
        assert engine.scheduler.row_steps < sum(budgets), "a finished row ran on"


def test_chat_messages_are_rendered_with_the_template(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    out = _run(engine, [(0, {"messages": messages})], {"max_tokens": 6})
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = _alone(engine, ids, 6)
    assert out[0].output["generated_text"] == engine.tokenizer.decode(want, skip_special_tokens=True)
    assert out[0].n_tokens == len(ids)


def test_each_item_is_handed_over_the_step_it_ends(causal_lm: str) -> None:
    engine = _engine(causal_lm, max_rows=4)
    items = [(0, {"prompt": "long one", "params": {"max_tokens": 40}})] + [
        (i, {"prompt": f"short {i}", "params": {"max_tokens": 2}}) for i in range(1, 4)
    ]
    order = [r.idx for results, _ in engine.run(items, {}) for r in results]
    assert order[-1] == 0 and sorted(order[:-1]) == [1, 2, 3]


def test_a_stop_string_ends_an_item_and_is_cut_from_its_text(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    free = _run(engine, [(0, {"prompt": PROMPTS[1]})], {"max_tokens": 20})[0].output["generated_text"]
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    got = _run(engine, [(0, {"prompt": PROMPTS[1], "params": {"stop": [stop]}})], {"max_tokens": 20})[0]
    assert got.output["finish_reason"] == "stop"
    assert got.output["generated_text"] == free[: free.index(stop)]


def test_the_end_of_sequence_token_ends_an_item(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    first = _alone(engine, engine.tokenizer(PROMPTS[0])["input_ids"], 3)
    engine.scheduler.eos = {first[2]}  # the third token this prompt draws is now its end
    got = _run(engine, [(0, PROMPTS[0])], {"max_tokens": 10})[0]
    assert got.output["finish_reason"] == "stop" and got.output["completion_tokens"] == 2


def test_a_seeded_sample_repeats_whatever_runs_beside_it(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    params = {"max_tokens": 12, "temperature": 1.5, "seed": 7}
    alone = _run(engine, [(0, {"prompt": PROMPTS[0], "params": params})])[0].output
    crowd = [(i, {"prompt": p, "params": {"max_tokens": 12}}) for i, p in enumerate(PROMPTS[1:], start=1)]
    mixed = _run(engine, [*crowd, (0, {"prompt": PROMPTS[0], "params": params})])[0].output
    other = _run(engine, [(0, {"prompt": PROMPTS[0], "params": {**params, "seed": 8}})])[0].output
    greedy = _run(engine, [(0, {"prompt": PROMPTS[0], "params": {"max_tokens": 12}})])[0].output
    assert alone == mixed
    assert other["generated_text"] != alone["generated_text"] != greedy["generated_text"]


def test_items_that_cannot_run_fail_alone_with_their_reason(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    context = engine.max_length
    assert context is not None
    items = [
        (0, {"prompt": "fine", "params": {"max_tokens": 3}}),
        (1, {"prompt": "word " * (context + 10)}),
        (2, {"prompt": "bad params", "params": {"max_tokens": -1}}),
        (3, {"messages": [{"role": "wizard", "content": "hi"}]}),
        (4, {"nothing": "here"}),
    ]
    out = _run(engine, items, {"max_tokens": 3})
    assert out[0].status == C.ITEM_DONE
    assert [out[i].status for i in (1, 2, 3, 4)] == [C.ITEM_FAILED] * 4
    assert "context" in (out[1].error or "") and "max_tokens" in (out[2].error or "")
    assert "role" in (out[3].error or "") and "prompt" in (out[4].error or "")


def test_a_prompt_near_the_context_generates_what_is_left(causal_lm: str) -> None:
    engine = _engine(causal_lm)
    assert engine.max_length is not None
    prompt = "word " * (engine.max_length - 6)
    got = _run(engine, [(0, prompt)], {"max_tokens": 50})[0]
    assert got.status == C.ITEM_DONE and got.output["finish_reason"] == "length"
    assert got.n_tokens is not None and got.n_tokens + got.output["completion_tokens"] == engine.max_length


def test_the_kv_budget_bounds_the_rows_in_flight(causal_lm: str) -> None:
    wide = _engine(causal_lm, max_rows=8)
    narrow = _engine(causal_lm, max_rows=8, kv_tokens=64)  # one row of (prompt + 40) at a time
    items = [(i, {"prompt": p, "params": {"max_tokens": 40}}) for i, p in enumerate(PROMPTS[:4])]
    outputs = [{i: r.output for i, r in _run(e, items).items()} for e in (wide, narrow)]
    assert outputs[0] == outputs[1]
    assert narrow.scheduler.row_steps == narrow.scheduler.steps  # one row a step
    assert wide.scheduler.steps < narrow.scheduler.steps


def test_the_worker_builds_the_sequence_engine(causal_lm: str) -> None:
    cfg = WorkerConfig(key=ServeKey(TASK, causal_lm), warmup=False)
    engine = build_engine(load_pipeline(cfg).pipe, cfg, 1)
    assert isinstance(engine, SequenceEngine)
    out = _run(engine, [(0, PROMPTS[0])], {"max_tokens": 4})  # type: ignore[arg-type]
    assert out[0].output["completion_tokens"] == 4 and out[0].output["finish_reason"] == "length"
    with pytest.raises(Exception, match="max_tokens"):
        engine.stage_params({"max_tokens": 0})


@pytest.fixture(scope="module")
def causal_lm(model_dir: Callable[[str], str]) -> str:
    """A tiny causal LM that runs every item to its max_tokens (its end-of-sequence id is never drawn)."""
    return model_dir("causal-lm-endless")


@pytest.fixture(scope="module")
def ending_lm(model_dir: Callable[[str], str]) -> str:
    """The same shape, ending on ``[SEP]``: its tied embeddings draw it at once after prompts that end in it."""
    return model_dir("causal-lm")


def test_a_model_whose_cache_cannot_be_joined_is_refused_at_start(causal_lm: str, tmp_path: Any) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(causal_lm)
    config.layer_types = [
        "sliding_attention",
        "full_attention",
    ]  # a sliding-window layer: its cache is cut to the window
    config.sliding_window = 8
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = AutoTokenizer.from_pretrained(causal_lm)
    with pytest.raises(ConfigurationError, match="cannot join and cut"):
        SequenceEngine(pipeline(TASK, model=model, tokenizer=tok), max_rows=2, kv_tokens=1000)


def test_a_model_split_across_devices_generates_what_it_does_whole(causal_lm: str, tmp_path: Any) -> None:
    """accelerate places the layers (here the CPU and the disk, as it would GPUs): each step runs them one device
    after another, and the outputs are the whole model's."""
    items = [(i, {"prompt": p, "params": {"max_tokens": 6 + i}}) for i, p in enumerate(PROMPTS[:4])]
    whole = WorkerConfig(key=ServeKey(TASK, causal_lm), warmup=False)
    places = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    (tmp_path / "map.json").write_text(json.dumps({**places, "model.rotary_emb": "cpu"}))
    split = WorkerConfig(
        key=ServeKey(TASK, causal_lm),
        device_map=parse_device_map(str(tmp_path / "map.json")),
        offload_folder=str(tmp_path / "offload"),
    )
    loaded = load_pipeline(split)
    assert loaded.placed is not None and "disk" in loaded.placed
    outputs = []
    for cfg, pipe in ((whole, load_pipeline(whole).pipe), (split, loaded.pipe)):
        engine = build_engine(pipe, cfg, 1)
        outputs.append({i: r.output for i, r in _run(engine, items).items()})  # type: ignore[arg-type]
    assert outputs[0] == outputs[1]


def test_an_item_that_ends_on_its_first_token_leaves_its_batch_mates_running(causal_lm: str) -> None:
    engine = _engine(causal_lm, max_rows=16)  # 16 rows: an ended row waits for others before it is dropped
    first = _alone(engine, engine.tokenizer(PROMPTS[0])["input_ids"], 1)
    engine.scheduler.eos = {first[0]}  # the first token this prompt draws is now its end
    items = [(i, {"prompt": p, "params": {"max_tokens": 8}}) for i, p in enumerate(PROMPTS)]
    out = _run(engine, items)
    assert out[0].output["completion_tokens"] == 0 and out[0].output["finish_reason"] == "stop"
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        want = _alone(engine, engine.tokenizer(prompt)["input_ids"], 8)
        assert out[i].output["generated_text"] == engine.tokenizer.decode(want, skip_special_tokens=True)
