"""What `train()` returns and its summary: transformers' `TrainOutput` and `total_flos`, as TRL.

Run: `python -m pytest tests/test_train_output.py -q` (about 30 s on 2 cores).

`total_flos` is transformers' estimate, 6 x non-embedding parameters per `input_ids` entry of
TRL's padded rows; csd-fast's packed layouts count the padded rows TRL would have built, so the
number is TRL's whatever the layout (and with `pad_to_multiple_of`). It lives in the trainer
state, the summary log and checkpoints (a resumed run ends with the whole run's count).
"""

from __future__ import annotations

import pytest
from trl_helpers import csd_trainer, make_trainer

pytest.importorskip("trl")


@pytest.mark.parametrize(
    "ours", [{}, {"padding_free": True}, {"prefix_sharing": True, "pad_to_multiple_of": 8}],
    ids=["padded", "padding_free", "prefix_multiple_of_8"],
)  # fmt: skip
def test_train_output_and_total_flos_match_trl(models, tmp_path, ours):
    common = {"pad_to_multiple_of": ours.get("pad_to_multiple_of")}
    trl = make_trainer("trl", models, tmp_path / "trl", **common)
    want = trl.train()
    mine = csd_trainer(models, tmp_path / "csd", **ours)
    got = mine.train()
    assert type(got).__name__ == "TrainOutput"
    assert got.global_step == want.global_step
    assert got.training_loss == pytest.approx(want.training_loss, rel=1e-5)
    assert sorted(got.metrics) == sorted(want.metrics)
    assert got.metrics["epoch"] == want.metrics["epoch"]
    assert mine.state.total_flos == trl.state.total_flos > 0
    summary = mine.state.log_history[-1]
    assert list(summary)[:5] == list(trl.state.log_history[-1])[:5]  # TRL's keys, in order
    assert summary["total_flos"] == trl.state.log_history[-1]["total_flos"]


def test_a_resumed_run_counts_the_whole_runs_flos(models, tmp_path):
    whole = csd_trainer(models, tmp_path / "whole", max_steps=4)
    whole.train()
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    cut = csd_trainer(models, tmp_path / "cut", **kw)
    cut.train()
    resumed = csd_trainer(models, tmp_path / "cut", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.state.total_flos == whole.state.total_flos > 0
