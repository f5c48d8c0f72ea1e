"""Learning-rate schedules and logging cadences TRL 1.16 inherits from transformers, on CPU.

Run: `python -m pytest tests/test_schedules.py -q` (about 40 s on 2 cores).

The metric schedules (ReduceLROnPlateau, transformers' GreedyLR) step on the evaluation metric
after each evaluation, not after each optimizer step; the cases below are chosen so the rate
really moves (plateau: `mode="max"` on a falling eval loss halves it at every evaluation).
Each is compared with TRL's own run (every logged number, final weights), and a plateau run
resumed from its checkpoint ends where one never stopped does.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from trl_helpers import WEIGHT_ATOL, compare_logs, csd_trainer, max_weight_diff, rows, run

pytest.importorskip("trl")

EVAL = dict(eval_strategy="steps", eval_steps=1, eval_rows=4, max_steps=4)
CASES = {
    "plateau": dict(lr_scheduler_type="reduce_lr_on_plateau",
                    lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "mode": "max"}, **EVAL),
    "greedy": dict(lr_scheduler_type="greedy", lr_scheduler_kwargs={"patience": 1}, **EVAL),
    "cosine_warmup_min_lr": dict(lr_scheduler_type="cosine_warmup_with_min_lr",
                                 lr_scheduler_kwargs={"min_lr": 1e-4}, warmup_steps=1),
    "log_every_epoch": dict(logging_strategy="epoch", eval_strategy="epoch", eval_rows=4,
                            max_steps=6),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_trl(models, tmp_path, name):
    kw = CASES[name]
    if kw.get("lr_scheduler_type") == "greedy" and not hasattr(transformers, "GreedyLR"):
        pytest.skip("this transformers has no GreedyLR")
    data = rows("standard", 12)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data, **kw)
    our_logs, our_w = run("csd", "llama", models, tmp_path / "csd", data, **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) <= WEIGHT_ATOL
    rates = [h["learning_rate"] for h in our_logs if "learning_rate" in h]
    if name in ("plateau", "greedy"):
        assert len(set(rates)) > 1, rates  # the metric moved the rate
    if name == "log_every_epoch":  # 12 pairs / 4 = 3 steps an epoch: logs at 3 and 6 only
        assert [h["step"] for h in our_logs if "loss" in h] == [3, 6]


def test_metric_schedules_need_an_evaluation(tmp_path):
    from csd_fast import DPOConfig

    with pytest.raises(ValueError, match="requires an eval strategy"):
        DPOConfig(output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau")


def test_a_metric_the_evaluation_lacks_is_named(models, tmp_path):
    trainer = csd_trainer(models, tmp_path / "run", eval_rows=4, metric_for_best_model="nope",
                          lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps",
                          eval_steps=1, max_steps=1)  # fmt: skip
    with pytest.raises(KeyError, match="eval_nope"):
        trainer.train()


def test_plateau_resumes_exactly(models, tmp_path):
    kw = dict(CASES["plateau"], save_strategy="steps", save_steps=2)
    kw.pop("eval_rows")
    whole = csd_trainer(models, tmp_path / "run", eval_rows=4, **kw)
    whole.train()
    resumed = csd_trainer(models, tmp_path / "run", eval_rows=4, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]
    ours, ref = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
