"""TRL DPOConfig options that were on csd-fast's unsupported list, each against TRL 1.16 on CPU.

Run: `python -m pytest tests/test_trl_dropin.py -q` (about 2 minutes on 2 cores).

eval_on_start, save_only_model, neftune_noise_alpha and activation_offloading train the same
tiny model on the same rows with TRL's DPOTrainer and ours (tests/trl_helpers.py) and compare
every logged value, the checkpoints' contents and the final weights; a prompt-learning adapter
(which our forward cannot honour) must be refused, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl_helpers import compare_logs, eval_logs, rows, run, step_logs

pytest.importorskip("trl")

WEIGHT_ATOL = 2e-5  # as tests/test_trl_parity.py: well under one Adam step at lr 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _both(models, tmp_path, n=8, **kw):
    data = rows("standard", n)
    ref = run("trl", "llama", models, tmp_path / "trl", data, **kw)
    ours = run("csd", "llama", models, tmp_path / "csd", data, **kw)
    return ref, ours


def _same_weights(ours: dict, ref: dict) -> float:
    assert ours.keys() == ref.keys()
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def test_eval_on_start_matches_trl(models, tmp_path):
    kw = dict(eval_on_start=True, eval_strategy="steps", eval_steps=2, eval_rows=6)
    (ref_logs, _), (our_logs, _) = _both(models, tmp_path, **kw)
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
    (ref_logs, _), (our_logs, _) = _both(models, tmp_path, eval_rows=6, **kw)
    assert [h["step"] for h in eval_logs(ref_logs)] == evaluated_at
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)


def test_eval_on_start_without_an_eval_set_is_an_error(models, tmp_path):
    with pytest.raises(ValueError, match="eval"):
        run("csd", "llama", models, tmp_path, rows("standard", 8), eval_on_start=True)


def _checkpoint_files(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoint-2").iterdir()}


def _checkpoint_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(out / "checkpoint-2" / "model.safetensors").items()}


def test_save_only_model_matches_trl(models, tmp_path):
    from csd_fast.resume import CheckpointError

    kw = dict(save_strategy="steps", save_steps=2, save_only_model=True)
    _both(models, tmp_path, **kw)
    trl_files, our_files = _checkpoint_files(tmp_path / "trl"), _checkpoint_files(tmp_path / "csd")
    state = {"optimizer.pt", "scheduler.pt"}
    assert "model.safetensors" in trl_files and not state & trl_files  # what the option means
    assert "model.safetensors" in our_files and not state & our_files
    worst = _same_weights(
        _checkpoint_weights(tmp_path / "csd"), _checkpoint_weights(tmp_path / "trl")
    )
    assert worst <= WEIGHT_ATOL, f"checkpoint weights differ by up to {worst:.3g}"
    # a full checkpoint (the default) still carries the optimizer: the option made the difference
    run("csd", "llama", models, tmp_path / "full", rows("standard", 8), save_strategy="steps",
        save_steps=2)  # fmt: skip
    assert state <= _checkpoint_files(tmp_path / "full")
    # resuming from weights alone would restart the moments and schedule: refused, and why
    with pytest.raises(CheckpointError, match="save_only_model"):
        run("csd", "llama", models, tmp_path / "csd", rows("standard", 8),
            resume=True, **kw)  # fmt: skip


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
    assert _same_weights(our_w, ref_w) <= WEIGHT_ATOL


def test_prompt_learning_adapter_is_refused(models, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    with pytest.raises(ValueError, match="prompt-learning"):
        run("csd", "llama", models, tmp_path, rows("standard", 8),
            trainer_kwargs={"peft_config": config})  # fmt: skip


@pytest.mark.parametrize("precompute", [False, True])
def test_custom_data_collator_matches_trl(models, tmp_path, precompute):
    """TRL's own collator with its own truncation (max_length 12, under the config's 32): the
    collator, not the config, decides what is scored, on both sides."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl_helpers import save_tiny

    _, tok = save_tiny("llama", models)
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=12)
    kw = dict(trainer_kwargs={"data_collator": collator}, precompute_ref_log_probs=precompute)
    (ref_logs, ref_w), (our_logs, our_w) = _both(models, tmp_path, **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert _same_weights(our_w, ref_w) <= WEIGHT_ATOL
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
    (ref_logs, ref_w), (our_logs, our_w) = _both(models, tmp_path, fp16=True)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert _same_weights(our_w, ref_w) <= WEIGHT_ATOL


def _csd_trainer(models, out, **kw):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", models)
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=DPOConfig(**base_kwargs(out, **kw)),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip


def test_loss_scaling_is_exact_and_skips_overflowing_steps(models, tmp_path):
    """The fp16 loop path (a GradScaler; on a GPU made by fp16=True) run on the CPU's scaler:
    a power-of-two scale changes no number (TRL's fp32 run), an overflowing one skips the step
    (weights and schedule untouched, scale halved) and is saved for resume."""
    import json

    data = rows("standard", 8)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data)
    scaled = _csd_trainer(models, tmp_path / "scaled")
    scaled.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled.train()
    problems = compare_logs(scaled.state.log_history, ref_logs)
    assert not problems, "\n".join(problems)
    assert scaled.grad_scaler.get_scale() == 2.0**10  # no overflow, growth interval not reached

    over = _csd_trainer(models, tmp_path / "over", max_steps=1, save_strategy="steps",
                        save_steps=1)  # fmt: skip
    before = {k: v.clone() for k, v in over.model.state_dict().items()}
    over.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # an fp16 overflow, made certain: one gradient turns inf
    next(over.model.parameters()).register_hook(lambda g: g * float("inf"))
    over.train()
    assert all(torch.equal(before[k], v) for k, v in over.model.state_dict().items())
    assert over.lr_scheduler.last_epoch == 0  # a skipped step does not advance the schedule
    assert over.grad_scaler.get_scale() == 2.0**9
    saved = json.loads((tmp_path / "over" / "checkpoint-1" / "trainer_state.json").read_text())
    assert saved["grad_scaler"]["scale"] == 2.0**9


def test_sigterm_checkpoints_and_resumes_exactly(models, tmp_path):
    """enable_jit_checkpoint: a SIGTERM during step 2 (as SLURM sends before a preemption)
    ends training after that step with checkpoint-2 written; resuming from it ends with the
    weights of a run never stopped. The previous SIGTERM handler is back afterwards."""
    import os
    import signal

    class SigtermAtStep2:
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    kw = dict(max_steps=5, save_strategy="no", enable_jit_checkpoint=True)
    before = signal.getsignal(signal.SIGTERM)
    whole = _csd_trainer(models, tmp_path / "whole", **kw)
    whole.train()
    cut = _csd_trainer(models, tmp_path / "cut", **kw)
    cut.add_callback(SigtermAtStep2())
    cut.train()
    assert cut.state.global_step == 2
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = _csd_trainer(models, tmp_path / "cut", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    ours, ref = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


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


def test_ignore_data_skip_starts_the_epoch_over(models, tmp_path):
    """Resumed after step 1 of a 2-step epoch: by default step 2 takes the epoch's second
    batch (as never stopped); with ignore_data_skip it takes the first one again."""

    class StopAfterStep1:
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_training_stop = True
            return control

    def tokens_per_step(trainer) -> list[int]:
        seen = [h["num_tokens"] for h in step_logs(trainer.state.log_history)]
        return [b - a for a, b in zip([0, *seen], seen, strict=False)]

    kw = dict(max_steps=3, save_strategy="steps", save_steps=1)
    whole = _csd_trainer(models, tmp_path / "whole", **kw)
    whole.train()
    first, second, _ = tokens_per_step(whole)
    assert first != second  # the two batches of the epoch are told apart by their sizes
    for ignore, want in ((False, second), (True, first)):
        out = tmp_path / f"ignore_{ignore}"
        cut = _csd_trainer(models, out, **kw)
        cut.add_callback(StopAfterStep1())
        cut.train()
        resumed = _csd_trainer(models, out, ignore_data_skip=ignore, **kw)
        resumed.train(resume_from_checkpoint=True)
        assert tokens_per_step(resumed)[1] == want


def test_optim_args_are_ignored_with_adamw_as_in_trl(models, tmp_path):
    with pytest.warns(UserWarning, match="optim_args"):
        (ref_logs, ref_w), (our_logs, our_w) = _both(models, tmp_path, optim_args="eps=0.5")
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    plain, _ = run("trl", "llama", models, tmp_path / "plain", rows("standard", 8))
    assert not compare_logs(plain, ref_logs)  # TRL's own run: no effect either
