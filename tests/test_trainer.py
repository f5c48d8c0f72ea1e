"""The training loop: exact resume, crash-safe checkpoints, trainable selection, reference handling.

Run: python -m pytest tests/test_trainer.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from csd_fast import DPOConfig, DPOTrainer
from csd_fast import checkpoint as ckpt

ROWS = [
    {"prompt": f"The cat sat {i % 3}", "chosen": " on the mat.", "rejected": " is happy."}
    for i in range(8)
] + [
    {"prompt": f"Hello world {i % 2}", "chosen": " the dog runs.", "rejected": " the mat sat."}
    for i in range(8)
]


def tiny_model(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(config)


def make_args(tmp_path, **kw) -> DPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=0,
    )
    base.update(kw)
    return DPOConfig(**base)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


RESUME_CASES = {
    "plain": {},
    # 16 pairs / 3 per batch = 6 micro-batches, GA 2 -> 3 steps an epoch with a remainder batch;
    # 5 steps cross the epoch boundary (epoch 1 reshuffles), the stop lands mid-epoch-0
    # 16 pairs / 3 = 6 micro-batches; GA 4 -> steps of 4 and 2 micro-batches (a remainder), so
    # the stop at step 2 is an epoch end with its eval, and step 5 is in epoch 2
    "ga_remainder_epoch_boundary": dict(
        per_device_train_batch_size=3, gradient_accumulation_steps=4, max_steps=5,
        eval_strategy="epoch", save_strategy="steps"),
    "token_budget_prefix": dict(max_tokens_per_batch=96, prefix_sharing=True, max_steps=5),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path, case):
    """N steps in one go == k steps, stop, resume from the checkpoint, N - k steps: bit for bit."""
    tok = tiny_tokenizer()
    extra = RESUME_CASES[case]
    evalset = ROWS[:6] if extra.get("eval_strategy") else None
    args = make_args(tmp_path / "a", **{"save_strategy": "no", **extra})
    full = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS,
                      eval_dataset=evalset, processing_class=tok)  # fmt: skip
    full.train()

    def interrupted(**kw):
        args = make_args(tmp_path / "b", **{"save_strategy": "steps", **extra}, save_steps=2)
        return DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, eval_dataset=evalset,
                          processing_class=tok, **kw)  # fmt: skip

    first = interrupted(callbacks=[StopAt(2)])
    first.train()
    assert first.state.global_step == 2
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "checkpoint-2"

    resumed = interrupted()
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == full.state.global_step
    want, got = _params(full.model), _params(resumed.model)
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"

    # the logged history of the resumed run continues the interrupted one, value for value
    def history(t):
        return [{k: v for k, v in h.items() if "second" not in k and "runtime" not in k}
                for h in t.state.log_history if "train_runtime" not in h]  # fmt: skip

    assert history(resumed) == history(full)
    logged = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged if "loss" in r and "train_loss" not in r] == list(
        range(1, full.state.global_step + 1)
    )


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    args = make_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies half-written
                raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    progress = ckpt.load_progress(tmp_path / "checkpoint-2")
    assert progress.global_step == 2
    model = tiny_model(tok, seed=1)
    ckpt.load_weights(model, tmp_path / "checkpoint-2")  # complete and loadable


def test_trainable_params_trains_attention_only(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    before = _params(model)
    args = make_args(tmp_path, max_steps=2, trainable_params=[r"\.self_attn\."])
    trainer = DPOTrainer(model, args=args, train_dataset=ROWS, processing_class=tok)
    trainer.train()
    after = _params(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert all(".self_attn." in n for n in changed)
    assert any(n.endswith("q_proj.weight") for n in changed)


def test_trainable_params_matching_nothing_is_an_error(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="match no parameter"):
        DPOTrainer(
            tiny_model(tok),
            args=make_args(tmp_path, trainable_params=["nope"]),
            train_dataset=ROWS,
            processing_class=tok,
        )


def test_in_memory_model_gets_a_frozen_reference(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    assert not model.config._name_or_path  # never saved: TRL 1.16 cannot reload it
    trainer = DPOTrainer(
        model, args=make_args(tmp_path, max_steps=3), train_dataset=ROWS, processing_class=tok
    )
    ref_before = _params(trainer.ref_model)
    trainer.train()
    assert all(
        torch.equal(v, dict(trainer.ref_model.named_parameters())[k]) for k, v in ref_before.items()
    )
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    first = trainer.state.log_history[0]
    # at step 1 the policy equals the reference: rewards are exactly zero
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    steps = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert steps[-1]["rewards/margins"] > 0


def test_precomputed_reference_matches_live_reference(tmp_path):
    tok = tiny_tokenizer()
    live = DPOTrainer(
        tiny_model(tok), args=make_args(tmp_path / "live"), train_dataset=ROWS, processing_class=tok
    )
    live.train()
    pre = DPOTrainer(
        tiny_model(tok),
        args=make_args(
            tmp_path / "pre", precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache")
        ),
        train_dataset=ROWS,
        processing_class=tok,
    )
    assert pre.ref_model is None  # no second copy in memory
    pre.train()
    steps = [
        (a, b)
        for a, b in zip(live.state.log_history, pre.state.log_history, strict=True)
        if "rewards/chosen" in a
    ]
    assert len(steps) == 4
    for a, b in steps:
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert len(list((tmp_path / "cache").glob("ref-*/manifest.json"))) == 1
    # a second run with the same reference and data hits the persistent cache
    again = DPOTrainer(
        tiny_model(tok),
        args=make_args(
            tmp_path / "again", precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache")
        ),
        train_dataset=ROWS,
        processing_class=tok,
    )
    assert len(list((tmp_path / "cache").glob("ref-*/manifest.json"))) == 1
    row0 = again.train_pairs[0]["row"]
    table_again = again._ref_tables[id(again.train_pairs)][1]
    assert table_again[row0] == pre._ref_tables[id(pre.train_pairs)][1][row0]


def test_eval_logs_prefixed_metrics_and_tracks_best(tmp_path):
    tok = tiny_tokenizer()
    args = make_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
    )
    trainer = DPOTrainer(
        tiny_model(tok), args=args, train_dataset=ROWS, eval_dataset=ROWS[:6], processing_class=tok
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert "eval_rewards/accuracies" in evals[0] and "eval_logps/chosen" in evals[0]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


def test_evaluate_new_set_after_training_needs_a_reference(tmp_path):
    """With precomputed tables and no reference model, a new eval set cannot be scored by the
    trained policy: TRL 1.16's ValueError, raised before the new set is tokenized."""
    tok = tiny_tokenizer()
    args = make_args(tmp_path, max_steps=1, precompute_ref_log_probs=True)
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    trainer.train()
    with pytest.raises(ValueError, match="after training has started"):
        trainer.evaluate(eval_dataset=ROWS[:4])


def test_model_path_loads_in_float32_like_trl(tmp_path):
    tok = tiny_tokenizer()
    tiny_model(tok).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    trainer = DPOTrainer(
        str(tmp_path / "bf16"), args=make_args(tmp_path / "out", max_steps=1), train_dataset=ROWS
    )
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_token_budget_batches_cover_every_pair_once_within_budget(tmp_path):
    tok = tiny_tokenizer()
    args = make_args(
        tmp_path, max_steps=0, num_train_epochs=1, max_tokens_per_batch=96, prefix_sharing=True
    )
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    plan = trainer._plan(trainer.train_pairs, "train", 0)
    assert sorted(i for mb in plan for i in mb) == list(range(len(ROWS)))
    for mb in plan:
        batch = trainer._collate(trainer.train_pairs, mb, "train")
        assert batch.layout == "prefix" and batch.num_real_tokens <= 96
        assert batch.num_real_tokens < batch.num_tokens  # the shared prompts were saved
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(plan) and all(h["padding_efficiency"] > 0.5 for h in logged)


def test_lora_reference_is_the_model_with_adapters_off(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    base = tiny_model(tok)
    base_params = _params(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DPOTrainer(
        base,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=ROWS,
        processing_class=tok,
        peft_config=lora,
    )
    assert trainer.ref_model is None  # no second copy in memory
    trainer.train()
    steps = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert steps[0]["rewards/chosen"] == 0.0  # LoRA B starts at zero: policy == reference
    assert steps[-1]["rewards/margins"] != 0.0
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    # the base weights are untouched: disabling the adapters gives the reference back
    with trainer.model.disable_adapter():
        for name, p in trainer.model.get_base_model().named_parameters():
            if "lora_" not in name:
                key = name.replace(".base_layer", "")
                assert torch.equal(p, base_params[key]), name


def _clo_rows(n: int) -> list[dict]:
    from csd_fast.data import clo_pairs_from_translations

    words = ["cat", "dog", "mat", "sat", "happy", "runs", "world", "hello"]
    src = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        src.append({"id": i, "lang": "en", "prompt": f"The {a} {i % 3}", "response": f" the {b}."})
        src.append({"id": i, "lang": "da", "prompt": f"Hello {a} {i % 3}", "response": f" is {b}."})
    return clo_pairs_from_translations(src)


@pytest.mark.parametrize("budget", [None, 120])
def test_clo_keeps_examples_together_and_trains(tmp_path, budget):
    tok = tiny_tokenizer()
    rows = _clo_rows(6)
    args = make_args(
        tmp_path,
        loss_type="clo",
        per_device_train_batch_size=3,
        max_steps=3,
        max_tokens_per_batch=budget,
        trainable_params=[r"\.self_attn\."],
    )
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=rows, processing_class=tok)
    plan = trainer._plan(trainer.train_pairs, "train", 0)
    groups = trainer.train_pairs.groups()
    for mb in plan:  # an example's two pairs are never split across micro-batches
        ids = {int(groups[i]) for i in mb}
        assert sum(int((groups == g).sum()) for g in ids) == len(mb)
    batch = trainer._collate(trainer.train_pairs, plan[0], "train")
    assert batch.sft_mask is not None and batch.group_ids is not None
    assert int(batch.sft_mask.sum()) == len(plan[0]) // 2  # only the translated chosen is NLL'd
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]
    assert len(steps) == 3 and steps[-1]["rewards/margins"] > 0


def test_evaluating_several_new_sets_never_reuses_a_stale_plan(tmp_path):
    tok = tiny_tokenizer()
    args = make_args(tmp_path, per_device_eval_batch_size=3)
    a = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    b = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
    want = a.evaluate(eval_dataset=ROWS[4:12])
    for _ in range(3):  # temporary sets come and go; ids may be recycled
        b.evaluate(eval_dataset=ROWS[:4])
    got = b.evaluate(eval_dataset=ROWS[4:12])
    for key in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected"):
        assert got[key] == want[key], key


class CancelDefaults(TrainerCallback):
    """Sees the default flags (set before on_step_end, as in transformers) and cancels them."""

    def __init__(self):
        self.seen_log = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen_log.append(control.should_log)
        control.should_save = control.should_evaluate = False
        return control


def test_callbacks_see_and_can_cancel_the_default_flags(tmp_path):
    tok = tiny_tokenizer()
    cb = CancelDefaults()
    args = make_args(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer = DPOTrainer(
        tiny_model(tok),
        args=args,
        train_dataset=ROWS,
        eval_dataset=ROWS[:4],
        processing_class=tok,
        callbacks=[cb],
    )
    trainer.train()
    assert cb.seen_log == [True, True]
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not [h for h in trainer.state.log_history if "eval_loss" in h]


def test_stopping_mid_epoch_still_runs_the_epoch_end(tmp_path):
    tok = tiny_tokenizer()
    args = make_args(tmp_path, max_steps=2, eval_strategy="epoch", save_strategy="epoch")
    trainer = DPOTrainer(
        tiny_model(tok), args=args, train_dataset=ROWS, eval_dataset=ROWS[:4], processing_class=tok
    )  # 4 steps an epoch: max_steps stops mid-epoch
    trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2]


def test_epochs_of_varying_length_get_their_own_step_counts(tmp_path):
    """CLO groups of 1 and 2 pairs pack into a different number of batches each epoch: the
    schedule is the sum of each epoch's own steps, and every epoch runs whole."""
    tok = tiny_tokenizer()
    rows = [dict(r, group=i // 2 if i < 12 else i) for i, r in enumerate(ROWS)]
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=4, per_device_train_batch_size=3)
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=rows, processing_class=tok)
    lengths = [len(trainer._plan(trainer.train_pairs, "train", e)) for e in range(4)]
    trainer.train()
    assert trainer.state.global_step == sum(lengths)
    assert trainer.state.epoch == 4.0
