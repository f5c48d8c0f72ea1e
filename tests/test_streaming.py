"""Streaming (`datasets.IterableDataset`) train and eval sets: csd_fast/streaming.py.

Run: `python -m pytest tests/test_streaming.py -q` (about 30 s on 2 cores).

A stream must train exactly as the same rows map-style in stream order (every metric, every
step, the final weights), its first step must equal TRL's on the same stream, evaluation over a
stream equals evaluation over the set, token budgets plan within a bounded buffer, and TRL's
refusals (precomputed references on a stream) hold.
"""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch
from trl_helpers import compare_logs, rows, run, step_logs

pytest.importorskip("trl")


def _stream(data):
    return datasets.IterableDataset.from_generator(lambda: iter(data))


def test_stream_trains_like_the_same_rows_in_order(models, tmp_path):
    # 10 pairs, batches of 4, GA 2: the pass ends mid-step (a 1-micro-batch step), then rereads
    data = rows("standard", 10)
    kw = dict(max_steps=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential")
    mapped, w_map = run("csd", "llama", models, tmp_path / "map", data, **kw)
    streamed, w_stream = run("csd", "llama", models, tmp_path / "stream", data,
                             train_dataset=_stream(data), **kw)  # fmt: skip
    assert [round(h["epoch"], 4) for h in step_logs(streamed)] == [0.6667, 1.0, 1.6667, 2.0]
    problems = compare_logs(
        streamed, mapped, rtol=1e-6, skip=("tokens_per_second", "pairs_per_second")
    )
    assert not problems, "\n".join(problems)
    assert all(torch.equal(w_map[k], w_stream[k]) for k in w_map)


def test_first_step_on_a_stream_equals_trl(models, tmp_path):
    """transformers' epoch bookkeeping on a stream differs (README); the first step's numbers
    come from the same first micro-batches in stream order and must agree."""
    data = rows("standard", 8)
    kw = dict(max_steps=1, per_device_train_batch_size=4)
    ref, _ = run("trl", "llama", models, tmp_path / "trl", data, train_dataset=_stream(data), **kw)
    ours, _ = run("csd", "llama", models, tmp_path / "csd", data, train_dataset=_stream(data), **kw)
    problems = compare_logs(ours, ref, skip=("epoch",))
    assert not problems, "\n".join(problems)


def _trainer(models, out, train, eval_dataset=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", models)
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=DPOConfig(**base_kwargs(out, **kw)), train_dataset=train,
        eval_dataset=eval_dataset, processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip


def test_evaluating_a_stream_equals_the_set(models, tmp_path):
    data = rows("conversational", 6)
    trainer = _trainer(models, tmp_path, datasets.Dataset.from_list(rows("standard", 4)),
                       eval_dataset={"s": _stream(data)}, per_device_eval_batch_size=4)  # fmt: skip
    streamed = trainer.evaluate()
    again = trainer.evaluate()  # a stream is reread for every evaluation
    mapped = trainer.evaluate(datasets.Dataset.from_list(data))
    for key, want in mapped.items():
        if "runtime" in key or "per_second" in key:
            continue
        assert streamed[key.replace("eval_", "eval_s_")] == pytest.approx(want, rel=1e-6), key
        assert again[key.replace("eval_", "eval_s_")] == streamed[key.replace("eval_", "eval_s_")]
    assert len(list(trainer.get_eval_dataloader("s"))) == 2


def test_token_budget_over_a_stream_uses_a_bounded_buffer(models, tmp_path):
    from csd_fast.streaming import StreamPlan

    data = rows("standard", 40)
    trainer = _trainer(models, tmp_path, _stream(data), max_tokens_per_batch=160,
                       padding_free=True, stream_buffer_size=12)  # fmt: skip
    pairs, opts = trainer.train_pairs, trainer._batching("train")
    plan = StreamPlan(pairs, 0, opts, None, trainer.args.stream_buffer_size).view(0)
    seen, most_buffered = [], 0
    for idx in plan:
        batch = trainer._collate(pairs, idx, "train")
        assert batch.num_real_tokens <= 160
        seen.extend(idx)
        most_buffered = max(most_buffered, len(pairs._buffer))
    assert sorted(seen) == list(range(40))  # every pair once per pass
    # a planned buffer plus the batch being handed out: never the whole stream
    assert most_buffered <= 2 * trainer.args.stream_buffer_size < 40


@pytest.mark.parametrize("where", ["train", "eval", "eval_dict", "eval_iterable_dataset_dict"])
def test_precomputed_reference_on_a_stream_is_refused_as_trl(models, tmp_path, where):
    data = rows("standard", 4)
    train, evalset = datasets.Dataset.from_list(data), None
    if where == "train":
        train = _stream(data)
    elif where == "eval":
        evalset = _stream(data)
    elif where == "eval_dict":
        evalset = {"e": _stream(data)}
    else:
        evalset = datasets.IterableDatasetDict({"e": _stream(data)})
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with Iterable"):
        _trainer(models, tmp_path, train, evalset, precompute_ref_log_probs=True)


def test_training_on_a_stream_needs_max_steps(models, tmp_path):
    trainer = _trainer(models, tmp_path, _stream(rows("standard", 4)), max_steps=-1)
    with pytest.raises(ValueError, match="max_steps must be set"):
        trainer.train()


def test_iterating_a_tokenized_stream_gives_trls_rows(models, tmp_path):
    """`next(iter(trainer.eval_dataset))` (TRL's own tests do this) on a stream, or a dict of
    streams, gives the tokenized row TRL's trainer gives, and does not disturb training."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    data = rows("standard", 6)
    path, _ = save_tiny("llama", models)
    ref = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=trl.DPOConfig(**base_kwargs(tmp_path / "trl")),
        train_dataset=datasets.Dataset.from_list(data), eval_dataset=_stream(data),
        processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip
    want = list(ref.eval_dataset)
    for k, evals in enumerate((_stream(data), {"a": _stream(data), "b": _stream(data)})):
        ours = _trainer(models, tmp_path / f"csd{k}", datasets.Dataset.from_list(data), evals)
        sets = ours.eval_dataset if isinstance(evals, dict) else {"eval": ours.eval_dataset}
        for got in sets.values():
            got = list(got)
            keys = ("prompt_ids", "chosen_ids", "rejected_ids")
            assert [{k: g[k] for k in keys} for g in got] == [{k: w[k] for k in keys} for w in want]
        ours.train()  # the evaluation pass after reading the stream is complete
        assert ours.evaluate()  # (a dict: eval_a_*, eval_b_*)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("budget", [None, 120])
def test_every_rank_takes_its_share_of_one_pass(models, tmp_path, world, budget):
    """Under torchrun each rank reads the whole stream and keeps its micro-batches: a count
    batch is dealt as the same rows map-style in stream order are (batching.rank_plans), a
    token budget plans each buffer for all ranks; every pair once per pass, equal lengths.
    (tests/distributed: 2 gloo ranks training on a stream equal one process.)"""
    from csd_fast.batching import rank_plans
    from csd_fast.streaming import StreamPlan

    data = rows("standard", 17)
    kw = dict(padding_free=True, max_tokens_per_batch=budget, stream_buffer_size=6)
    trainer = _trainer(models, tmp_path, _stream(data), max_steps=1, **kw)
    pairs, opts = trainer.train_pairs, trainer._batching("train")
    plan = StreamPlan(pairs, 0, opts, None, trainer.args.stream_buffer_size, world)
    views = [plan.view(r) for r in range(world)]
    per_rank, costs, k = [[] for _ in range(world)], [], 0
    while k < len(views[0]):
        for r in range(world):
            per_rank[r].append(views[r][k])
            if per_rank[r][-1]:  # collated now: entries before k have left the buffer
                costs.append(trainer._collate(pairs, per_rank[r][-1], "train").num_real_tokens)
        k += 1
    assert len({len(p) for p in per_rank}) == 1
    seen = sorted(i for p in per_rank for idx in p for i in idx)
    assert seen == list(range(17))
    if budget is None:  # the map-style deal of the same rows in stream order
        sequential = dataclasses.replace(opts, shuffle=False)
        assert per_rank == rank_plans(17, 0, sequential, world)
    else:
        assert max(costs) <= budget
