"""TRL DPOConfig options that were on csd-fast's unsupported list, each against TRL 1.16 on CPU.

Run: `python -m pytest tests/test_trl_dropin.py -q` (about 1.5 minutes on 2 cores).

eval_on_start, eval_delay, label_smoothing_factor, neftune_noise_alpha, activation_offloading,
a custom data_collator, fp16 (on the CPU), bf16_full_eval and optim_args train or evaluate the
same tiny model on the same rows with TRL's DPOTrainer and ours (tests/trl_helpers.py) and
compare every logged value and the final weights (prompt-learning adapters:
tests/test_prompt_learning.py). Checkpoint and resume options: tests/test_trl_dropin_resume.py.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import (
    WEIGHT_ATOL,
    both_runs,
    compare_logs,
    eval_logs,
    max_weight_diff,
    rows,
    run,
    step_logs,
)

pytest.importorskip("trl")


def test_eval_on_start_matches_trl(models, tmp_path):
    kw = dict(eval_on_start=True, eval_strategy="steps", eval_steps=2, eval_rows=6)
    (ref_logs, _), (our_logs, _) = both_runs(models, tmp_path, **kw)
    assert [h["step"] for h in eval_logs(ref_logs)] == [0, 2, 3]  # before step 1, then as usual
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "kw, evaluated_at",
    [
        (dict(eval_delay=2, eval_strategy="steps", eval_steps=1), [2, 3]),
        (dict(eval_delay=1.5, eval_strategy="epoch", max_steps=4), [4]),  # epoch 1 ends: too soon
        (dict(label_smoothing_factor=0.1, eval_strategy="steps", eval_steps=2), [2, 3]),
    ],
)
def test_eval_delay_and_label_smoothing_factor_match_trl(models, tmp_path, kw, evaluated_at):
    """eval_delay holds evaluations back (steps, or epochs); label_smoothing_factor has no
    effect on TRL's DPO loss, so none on ours."""
    (ref_logs, _), (our_logs, _) = both_runs(models, tmp_path, eval_rows=6, **kw)
    assert [h["step"] for h in eval_logs(ref_logs)] == evaluated_at
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)


def test_eval_on_start_without_an_eval_set_is_an_error(models, tmp_path):
    with pytest.raises(ValueError, match="eval"):
        run("csd", "llama", models, tmp_path, rows("standard", 8), eval_on_start=True)


def test_neftune_noise_as_trl(models, tmp_path, monkeypatch):
    """transformers' own NEFTune hook, on the same forwards as in TRL's run: the policy's
    training forwards only, with the same (rows, padded length) shapes, which set the noise
    scale alpha / sqrt(L * d). (The draws themselves follow each loop's RNG use, so the two
    runs' numbers are not compared.) The noise changes the loss; eval-mode forwards pass
    through the hook un-noised (its own training check)."""
    from transformers.integrations import neftune as hf_neftune

    calls = []
    original = hf_neftune.neftune_post_forward_hook

    def spy(module, inputs, output):
        calls.append((tuple(output.shape), module.training))
        return original(module, inputs, output)

    monkeypatch.setattr(hf_neftune, "neftune_post_forward_hook", spy)
    kw = dict(neftune_noise_alpha=5.0, eval_strategy="steps", eval_steps=3, eval_rows=6)
    data = rows("standard", 8)
    ref_logs, _ = run("trl", "llama", models, tmp_path / "trl", data, **kw)
    trl_calls, calls[:] = list(calls), []
    our_logs, _ = run("csd", "llama", models, tmp_path / "csd", data, **kw)
    noised = [shape for shape, training in calls if training]
    assert noised == [shape for shape, training in trl_calls if training]
    assert len(noised) == 3  # one policy forward per optimizer step
    kw.pop("neftune_noise_alpha")
    quiet_logs, _ = run("csd", "llama", models, tmp_path / "quiet", data, **kw)
    assert step_logs(quiet_logs)[0]["loss"] != step_logs(our_logs)[0]["loss"]  # noised forward
    assert any(not training for _, training in calls)  # evaluation ran through it, un-noised


def test_neftune_hook_removed_after_training(models, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", models)
    data = datasets.Dataset.from_list(rows("standard", 8))
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=DPOConfig(**base_kwargs(tmp_path, neftune_noise_alpha=5.0, max_steps=1)),
        train_dataset=data, eval_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip
    embed = trainer.model.get_input_embeddings()
    seen = []
    spy = embed.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    ids = torch.tensor([[3, 4, 5, 6]])
    plain = embed.weight[ids].detach()
    trainer.train()
    assert seen and not hasattr(embed, "neftune_noise_alpha")  # transformers' marker removed
    embed.train()
    assert torch.equal(embed(ids), plain)  # no hook left: no noise after train()
    spy.remove()


def test_activation_offloading_matches_trl(models, tmp_path, monkeypatch):
    packed = []
    original = torch.autograd.graph.save_on_cpu

    class Counting(original):  # count the tensors that take the offload route
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(1), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    # TRL's own offloading (trl.models.activation_offloading) fails on CPU in 1.16 (it asks for
    # a CUDA stream); offloading changes no number, so TRL's run without it is the reference
    data = rows("standard", 8)
    ref_logs, ref_w = run(
        "trl", "llama", models, tmp_path / "trl", data, gradient_checkpointing=True
    )
    assert not packed
    our_logs, our_w = run("csd", "llama", models, tmp_path / "csd", data,
                          gradient_checkpointing=True, activation_offloading=True)  # fmt: skip
    assert packed, "no activation went through the offload hooks"
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) <= WEIGHT_ATOL


@pytest.mark.parametrize("precompute", [False, True])
def test_custom_data_collator_matches_trl(models, tmp_path, precompute):
    """TRL's own collator with its own truncation (max_length 12, under the config's 32): the
    collator, not the config, decides what is scored, on both sides."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl_helpers import save_tiny

    _, tok = save_tiny("llama", models)
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=12)
    kw = dict(trainer_kwargs={"data_collator": collator}, precompute_ref_log_probs=precompute)
    (ref_logs, ref_w), (our_logs, our_w) = both_runs(models, tmp_path, **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) <= WEIGHT_ATOL
    plain, _ = run("csd", "llama", models, tmp_path / "plain", rows("standard", 8))
    assert step_logs(plain)[0]["num_tokens"] != step_logs(our_logs)[0]["num_tokens"]


def test_custom_data_collator_must_return_trls_layout(models, tmp_path):
    def collator(examples):
        return {"input_ids": torch.zeros(len(examples), 4, dtype=torch.long)}

    with pytest.raises(ValueError, match="completion_mask"):
        run("csd", "llama", models, tmp_path, rows("standard", 8),
            trainer_kwargs={"data_collator": collator})  # fmt: skip


def test_fp16_on_cpu_matches_trl(models, tmp_path):
    """On the CPU accelerate leaves fp16 off (no autocast, no scaler): TRL's fp16 run is fp32,
    and so is ours, to the last logged digit."""
    (ref_logs, ref_w), (our_logs, our_w) = both_runs(models, tmp_path, fp16=True)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) <= WEIGHT_ATOL


def test_bf16_full_eval_matches_trl(models, tmp_path):
    """evaluate() outside train() with bf16_full_eval: the policy is cast to bf16 (and stays
    so, as in transformers) and the metrics are TRL's within bf16 rounding."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", models)
    data = datasets.Dataset.from_list(rows("standard", 8))
    results = {}
    for name, (config, trainer_cls) in {
        "trl": (trl.DPOConfig, trl.DPOTrainer),
        "csd": (DPOConfig, DPOTrainer),
    }.items():
        trainer = trainer_cls(
            model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
            args=config(**base_kwargs(tmp_path / name, bf16_full_eval=True)),
            train_dataset=data, eval_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(path),
        )  # fmt: skip
        results[name] = trainer.evaluate()
        assert next(trainer.model.parameters()).dtype == torch.bfloat16, name
    ref, ours = results["trl"], results["csd"]
    keys = [k for k in ref if not k.endswith(("runtime", "per_second"))]
    assert keys and not [k for k in keys if k not in ours], [k for k in keys if k not in ours]
    bad = [k for k in keys if abs(ours[k] - ref[k]) > 2e-2 * max(1.0, abs(ref[k]))]
    assert not bad, {k: (ours[k], ref[k]) for k in bad}
    assert ours["eval_logps/chosen"] != pytest.approx(-40.39, abs=1e-6)  # not the fp32 value


@pytest.mark.parametrize("kw", [{"optim_args": "eps=0.5"}, {"optim_target_modules": ["q_proj"]}])
def test_optimizer_options_of_other_optimizers_are_ignored_as_in_trl(models, tmp_path, kw):
    with pytest.warns(UserWarning, match=next(iter(kw))):
        (ref_logs, ref_w), (our_logs, our_w) = both_runs(models, tmp_path, **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    plain, _ = run("trl", "llama", models, tmp_path / "plain", rows("standard", 8))
    assert not compare_logs(plain, ref_logs)  # TRL's own run: no effect either


def test_debug_underflow_overflow_aborts_as_trl(models, tmp_path):
    """debug="underflow_overflow": an inf in a weight stops training at the first forward
    that meets it, with transformers' ValueError, on both sides (without it: a nan loss)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", models)
    data = datasets.Dataset.from_list(rows("standard", 8))
    for name, config, trainer_cls in (
        ("trl", trl.DPOConfig, trl.DPOTrainer),
        ("csd", DPOConfig, DPOTrainer),
    ):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
        trainer = trainer_cls(
            model=model, args=config(**base_kwargs(tmp_path / name, debug="underflow_overflow")),
            train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path),
        )  # fmt: skip
        with pytest.raises(ValueError, match="inf/nan detected"):
            trainer.train()
