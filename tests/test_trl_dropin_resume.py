"""TRL DPOConfig options about checkpoints and resuming, against TRL 1.16 on CPU where it runs.

Run: `python -m pytest tests/test_trl_dropin_resume.py -q` (about a minute on 2 cores).

save_only_model (TRL's checkpoint contents and weights; resuming from one refused),
restore_callback_states_from_checkpoint (EarlyStoppingCallback's state saved as TRL saves it),
enable_jit_checkpoint (a real SIGTERM mid-run, then an exact resume), ignore_data_skip, and the
fp16 loss-scaling loop path (a CPU GradScaler: exact when nothing overflows, a skipped step
when something does). Helpers: tests/trl_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl_helpers import (
    WEIGHT_ATOL,
    both_runs,
    compare_logs,
    csd_trainer,
    max_weight_diff,
    rows,
    run,
    step_logs,
)

pytest.importorskip("trl")


def _checkpoint_files(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoint-2").iterdir()}


def _checkpoint_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(out / "checkpoint-2" / "model.safetensors").items()}


def test_save_only_model_matches_trl(models, tmp_path):
    from csd_fast.resume import CheckpointError

    kw = dict(save_strategy="steps", save_steps=2, save_only_model=True)
    both_runs(models, tmp_path, **kw)
    trl_files, our_files = _checkpoint_files(tmp_path / "trl"), _checkpoint_files(tmp_path / "csd")
    state = {"optimizer.pt", "scheduler.pt"}
    assert "model.safetensors" in trl_files and not state & trl_files  # what the option means
    assert "model.safetensors" in our_files and not state & our_files
    worst = max_weight_diff(
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


def test_loss_scaling_is_exact_and_skips_overflowing_steps(models, tmp_path):
    """The fp16 loop path (a GradScaler; on a GPU made by fp16=True) run on the CPU's scaler:
    a power-of-two scale changes no number (TRL's fp32 run), an overflowing one skips the step
    (weights and schedule untouched, scale halved) and is saved for resume."""
    import json

    data = rows("standard", 8)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data)
    scaled = csd_trainer(models, tmp_path / "scaled")
    scaled.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled.train()
    problems = compare_logs(scaled.state.log_history, ref_logs)
    assert not problems, "\n".join(problems)
    assert scaled.grad_scaler.get_scale() == 2.0**10  # no overflow, growth interval not reached

    over = csd_trainer(models, tmp_path / "over", max_steps=1, save_strategy="steps",
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
    whole = csd_trainer(models, tmp_path / "whole", **kw)
    whole.train()
    cut = csd_trainer(models, tmp_path / "cut", **kw)
    cut.add_callback(SigtermAtStep2())
    cut.train()
    assert cut.state.global_step == 2
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = csd_trainer(models, tmp_path / "cut", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    ours, ref = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


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
    whole = csd_trainer(models, tmp_path / "whole", **kw)
    whole.train()
    first, second, _ = tokens_per_step(whole)
    assert first != second  # the two batches of the epoch are told apart by their sizes
    for ignore, want in ((False, second), (True, first)):
        out = tmp_path / f"ignore_{ignore}"
        cut = csd_trainer(models, out, **kw)
        cut.add_callback(StopAfterStep1())
        cut.train()
        resumed = csd_trainer(models, out, ignore_data_skip=ignore, **kw)
        resumed.train(resume_from_checkpoint=True)
        assert tokens_per_step(resumed)[1] == want


def test_callback_states_saved_as_trl_and_restored(models, tmp_path):
    """EarlyStoppingCallback's patience counter goes into checkpoints as TRL writes it
    (trainer_state.json's stateful_callbacks) and comes back on resume only when asked."""
    import json

    from transformers import EarlyStoppingCallback

    # threshold 1: no eval counts as an improvement, so the counter climbs by one per eval
    def stopper():
        return EarlyStoppingCallback(early_stopping_patience=9, early_stopping_threshold=1.0)

    kw = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
              metric_for_best_model="loss")  # fmt: skip
    data = rows("standard", 8)
    for side in ("trl", "csd"):
        run(side, "llama", models, tmp_path / side, data, eval_rows=6,
            trainer_kwargs={"callbacks": [stopper()]}, **kw)  # fmt: skip

    def saved(side):
        state = json.loads((tmp_path / side / "checkpoint-2" / "trainer_state.json").read_text())
        return state["stateful_callbacks"]["EarlyStoppingCallback"]

    assert saved("csd") == saved("trl")
    assert saved("csd")["attributes"]["early_stopping_patience_counter"] == 1

    seen = {}

    class Probe:  # what the run's EarlyStoppingCallback holds when training resumes
        def on_train_begin(self, args, state, control, **kwargs):
            seen["counter"] = next(
                cb.early_stopping_patience_counter for cb in self.trainer.callbacks
                if isinstance(cb, EarlyStoppingCallback)
            )  # fmt: skip

    for restore, want in ((True, 1), (False, 0)):
        probe = Probe()
        trainer = csd_trainer(models, tmp_path / "csd", eval_rows=6, callbacks=[stopper(), probe],
                               restore_callback_states_from_checkpoint=restore, **kw)  # fmt: skip
        probe.trainer = trainer
        trainer.train(resume_from_checkpoint=str(tmp_path / "csd" / "checkpoint-2"))
        assert seen["counter"] == want


def test_auto_find_batch_size_retries_smaller_as_trl(models, tmp_path):
    """An out-of-memory above 3 pairs per micro-batch (raised as PyTorch words it): the search
    goes 8, 7, 6, 5, 4, 3 (accelerate's 0.9 steps) and trains exactly as TRL does at 3; its
    checkpoint resumes with the found size (no configuration change to refuse)."""
    data = rows("standard", 8)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data,
                          per_device_train_batch_size=3)  # fmt: skip
    kw = dict(per_device_train_batch_size=8, auto_find_batch_size=True, save_strategy="steps",
              save_steps=2)  # fmt: skip
    trainer = csd_trainer(models, tmp_path / "csd", **kw)
    tried = []
    compute_loss = trainer.compute_loss

    def oom_above_3(batch, mode="train", dummy=False):
        if mode == "train" and batch.num_pairs > 3:
            tried.append(batch.num_pairs)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return compute_loss(batch, mode, dummy)

    trainer.compute_loss = oom_above_3
    with pytest.warns(UserWarning, match="out of memory"):
        trainer.train()
    assert tried == [8, 7, 6, 5, 4]
    problems = compare_logs(trainer.state.log_history, ref_logs)
    assert not problems, "\n".join(problems)
    ours = {k: v.detach().float() for k, v in trainer.model.state_dict().items()}
    assert max_weight_diff(ours, ref_w) <= WEIGHT_ATOL
    resumed = csd_trainer(models, tmp_path / "csd", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "csd" / "checkpoint-2"))
    assert resumed.args.per_device_train_batch_size == 3 and resumed.state.global_step == 3
