"""The reference store behind DPOTrainer: equal to the live reference for every loss type, kill -9
during the precompute, each fingerprint component, and no reference model with a complete store.

Run: python -m pytest tests/test_refcache.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from data_helpers import tiny_tokenizer
from test_trainer import ROWS, _clo_rows, make_args, tiny_model

from csd_fast import DPOTrainer
from csd_fast.losses import LOSS_TYPES
from csd_fast.refstore import StoreError, list_tables, verify_table

SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1}
# every loss type, the combinations and the LD-DPO / f-divergence variants that read the reference
CASES = {t: {"loss_type": [t], "label_smoothing": SMOOTHING.get(t, 0.0)} for t in LOSS_TYPES}
CASES |= {
    "sigmoid+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "ld_alpha+sft": {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5},
    "ld_alpha_ipo": {"loss_type": ["ipo"], "ld_alpha": 0.3},
    "js_divergence": {"f_divergence_type": "js_divergence"},
    "clo_ld_alpha": {"loss_type": ["clo"], "ld_alpha": 0.5},
}
TIMING = ("runtime", "per_second")


def _eval_metrics(trainer) -> dict:
    return {k: v for k, v in trainer.evaluate().items() if not any(t in k for t in TIMING)}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """(live, store) trainer pairs per data set: the policy differs from its reference, so the
    reference numbers matter. Each case rebinds `args` / `loss_params` (what compute_loss and
    the table lookup read at use time) instead of rebuilding the models for every loss type."""
    tmp = tmp_path_factory.mktemp("equal")
    tok = tiny_tokenizer()
    policy, ref = tiny_model(tok, seed=1), tiny_model(tok, seed=2)
    out = {}
    for data, rows in (("pairs", ROWS[::2]), ("clo", _clo_rows(4))):
        store = {"ref_cache_dir": str(tmp / "cache"), "ref_cache_shard_size": 3,
                 "precompute_ref_batch_size": 2}  # fmt: skip
        for name, extra in (("live", {}), ("store", store)):
            args = make_args(tmp / data / name, per_device_eval_batch_size=8, **extra)
            out[data, name] = DPOTrainer(policy, ref_model=ref, args=args, train_dataset=rows[:4],
                                         eval_dataset=rows, processing_class=tok)  # fmt: skip
            out[data, name].base_args = args
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_store_metrics_equal_live_reference(trainers, case):
    """Every eval metric (loss, rewards/*, logps/*, ...) from the sharded store equals the live
    reference pass's within fp32 tolerance, for every loss type and reference-reading option."""
    metrics = {}
    for name in ("live", "store"):
        trainer = trainers["clo" if "clo" in case else "pairs", name]
        trainer.args = dataclasses.replace(trainer.base_args, **CASES[case])
        trainer.loss_params = trainer.args.loss_params()
        metrics[name] = _eval_metrics(trainer)
    assert trainers["pairs", "live"].ref_model is not None
    assert trainers["pairs", "store"]._ref_tables  # the store side never ran the reference live
    assert metrics["live"].keys() == metrics["store"].keys()
    assert abs(metrics["live"]["eval_rewards/margins"]) > 1e-3  # the reference matters here
    for key, want in metrics["live"].items():
        got = metrics["store"][key]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (key, got, want)


def test_training_with_the_store_equals_live_reference(tmp_path):
    tok = tiny_tokenizer()
    logs = {}
    for name, extra in (("live", {}), ("store", {"ref_cache_dir": str(tmp_path / "c"),
                                                 "ref_cache_shard_size": 5})):  # fmt: skip
        args = make_args(tmp_path / name, max_steps=3, loss_type=["sigmoid", "sft"],
                         ld_alpha=0.5, **extra)  # fmt: skip
        trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(logs["live"]) == 3
    for a, b in zip(logs["live"], logs["store"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_trainer import ROWS, make_args, tiny_model
    from data_helpers import tiny_tokenizer
    import csd_fast.refstore as rs
    from csd_fast import DPOTrainer

    writes = []
    real = rs.write_bytes_atomically

    def dying_write(path, data):
        if path.name.startswith("shard-"):
            writes.append(path)
            if len(writes) == 4:  # half of the 4th shard on disk, then kill -9
                (path.parent / f".{{path.name}}.tmp{{os.getpid()}}").write_bytes(data[:50])
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)

    rs.write_bytes_atomically = dying_write
    tok = tiny_tokenizer()
    args = make_args({out!r}, ref_cache_dir={cache!r}, ref_cache_shard_size=2)
    DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    """
)


@pytest.mark.slow
def test_kill_9_during_precompute_resumes_from_finished_shards(tmp_path, capsys):
    cache = tmp_path / "cache"
    code = KILLER.format(tests=str(Path(__file__).parent), out=str(tmp_path / "a"),
                         cache=str(cache))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ((table_dir, manifest),) = list_tables(cache)
    assert not manifest["complete"]
    assert len(list(table_dir.glob("shard-*.safetensors"))) == 3
    tok = tiny_tokenizer()
    args = make_args(tmp_path / "b", ref_cache_dir=str(cache), ref_cache_shard_size=2)
    resumed = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    assert "3/8 shards reused; 5 built" in capsys.readouterr().out
    assert not list(table_dir.glob(".shard-*"))  # the half-written file is gone
    assert verify_table(table_dir) == {}
    args = make_args(tmp_path / "c", precompute_ref_log_probs=True)
    fresh = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    (_, got), (_, want) = *resumed._ref_tables.values(), *fresh._ref_tables.values()
    for col, values in want.columns.items():
        torch.testing.assert_close(torch.from_numpy(got.columns[col]), torch.from_numpy(values),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def _built(out: str) -> str:
    line = [x for x in out.splitlines() if "reference log-probs for train" in x][-1]
    return line


@pytest.mark.parametrize("change", ["model", "tokenizer", "data", "max_length", "truncation",
                                    "dtype", "layout", "head_impl"])  # fmt: skip
def test_changed_component_is_named_rebuilt_and_strict_refuses(tmp_path, capsys, change):
    tok = tiny_tokenizer()
    cache = str(tmp_path / "cache")

    def trainer(model=None, tokenizer=tok, rows=ROWS, **kw):
        args = make_args(tmp_path / "out", ref_cache_dir=cache, **kw)
        return DPOTrainer(model or tiny_model(tokenizer), args=args, train_dataset=rows,
                          processing_class=tokenizer)  # fmt: skip

    trainer()
    changed = {
        "model": lambda **kw: trainer(model=tiny_model(tok, seed=5), **kw),
        "tokenizer": lambda **kw: trainer(tokenizer=tiny_tokenizer("{{ messages }}"), **kw),
        "data": lambda **kw: trainer(rows=ROWS[:12], **kw),
        "max_length": lambda **kw: trainer(max_length=12, **kw),
        "truncation": lambda **kw: trainer(truncation_mode="keep_end", **kw),
        "dtype": lambda **kw: trainer(model=tiny_model(tok).to(torch.bfloat16), **kw),
        "layout": lambda **kw: trainer(padding_free=True, **kw),
        "head_impl": lambda **kw: trainer(fused=True, **kw),
    }[change]
    capsys.readouterr()
    with pytest.raises(StoreError, match=change):
        changed(ref_cache_strict=True)
    t = changed()
    line = _built(capsys.readouterr().out)
    assert change in line.split("differs in ")[1].rstrip(")").split(", "), line
    assert "0/1 shards reused; 1 built" in line
    assert len(list_tables(cache)) == 2  # the old table stays, for runs that still match it
    assert len(t._ref_tables) == 1


def test_complete_store_never_instantiates_a_reference(tmp_path, monkeypatch):
    """With a complete store: no deep copy of the policy, and a reference given by path is never
    loaded (it is identified by its files); without one, it is loaded once and then freed."""
    import copy

    import csd_fast.models as models

    tok = tiny_tokenizer()
    ref_dir = tmp_path / "ref"
    tiny_model(tok, seed=3).save_pretrained(ref_dir)
    loads, copies = [], []
    real_load, real_copy = models.load_model, copy.deepcopy
    monkeypatch.setattr(
        models, "load_model", lambda p, a, **k: loads.append(p) or real_load(p, a, **k)
    )

    def counting_copy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            copies.append(type(obj).__name__)
        return real_copy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", counting_copy)
    cache = str(tmp_path / "cache")

    def run(name):
        args = make_args(tmp_path / name, ref_cache_dir=cache, max_steps=2)
        t = DPOTrainer(tiny_model(tok), ref_model=str(ref_dir), args=args, train_dataset=ROWS,
                       eval_dataset=ROWS[:4], processing_class=tok)  # fmt: skip
        t.train()
        return t

    first = run("first")
    assert loads == [str(ref_dir)] and first.ref_model is None  # computed, then freed
    second = run("second")
    assert loads == [str(ref_dir)] and second.ref_model is None and copies == []
    # both runs saw the same reference numbers
    h1 = [h["rewards/chosen"] for h in first.state.log_history if "rewards/chosen" in h]
    h2 = [h["rewards/chosen"] for h in second.state.log_history if "rewards/chosen" in h]
    assert h1 == h2
    # a stored table also serves evaluate() on that set after training, with no reference
    assert second.evaluate(eval_dataset=ROWS[:4])["eval_loss"] > 0
    assert loads == [str(ref_dir)]


def test_table_for_other_tokens_is_refused_at_lookup(tmp_path):
    """The table's token counts are checked against every batch: a table forced onto data it
    was not built for (here: other truncation) fails loudly instead of training on it."""
    tok = tiny_tokenizer()
    t = DPOTrainer(tiny_model(tok), args=make_args(tmp_path, precompute_ref_log_probs=True),
                   train_dataset=ROWS, processing_class=tok)  # fmt: skip
    t.args.max_length = 8  # the collator now truncates what the table scored in full
    with pytest.raises(StoreError, match="tokens for dataset row"):
        t._collate(t.train_pairs, [0, 1], "train")


def test_manifest_says_what_the_table_holds(tmp_path):
    tok = tiny_tokenizer()
    DPOTrainer(tiny_model(tok), args=make_args(tmp_path / "o", ref_cache_dir=str(tmp_path / "c")),
               train_dataset=ROWS, eval_dataset=ROWS[:5], processing_class=tok)  # fmt: skip
    manifests = {m["labels"]["split"]: m for _, m in list_tables(tmp_path / "c")}
    assert set(manifests) == {"train", "eval"}
    assert manifests["eval"]["num_rows"] == 5 and manifests["train"]["num_rows"] == 16
    comps = manifests["train"]["components"]
    assert comps["device"] == "cpu" and comps["autocast"] == "none" and comps["dtype"] == "float32"
    assert json.loads(json.dumps(manifests["train"]))["complete"]
