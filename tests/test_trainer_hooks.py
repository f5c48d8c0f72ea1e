"""Trainer methods TRL users call or override, as transformers' Trainer has them.

Run: `python -m pytest tests/test_trainer_hooks.py -q` (about 30 s on 2 cores).

`create_optimizer` / `create_scheduler` are the hooks a subclass overrides for its own
parameter groups or schedule: the same subclass of TRL's trainer and of ours must train to the
same logs and weights. `log_metrics` / `save_metrics` write the files transformers writes;
the small getters answer as transformers' do on the same run.
"""

from __future__ import annotations

import json

import pytest
import torch
from trl_helpers import WEIGHT_ATOL, compare_logs, make_trainer, max_weight_diff

pytest.importorskip("trl")


def _head_lr_subclass(base):
    class HeadLearnsFaster(base):
        """lm_head at 10x the rate, everything else as configured; a constant schedule."""

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model or self.model
                head = [p for n, p in model.named_parameters() if "lm_head" in n]
                rest = [p for n, p in model.named_parameters() if "lm_head" not in n]
                lr = self.args.learning_rate
                self.optimizer = torch.optim.AdamW(
                    [{"params": rest, "lr": lr}, {"params": head, "lr": 10 * lr}]
                )
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: 1.0
                )
            return self.lr_scheduler

    return HeadLearnsFaster


def _weights(trainer):
    return {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()}


def test_overridden_optimizer_and_scheduler_train_as_in_trl(models, tmp_path):
    trl = make_trainer("trl", models, tmp_path / "trl", _head_lr_subclass)
    trl.train()
    ours = make_trainer("csd", models, tmp_path / "csd", _head_lr_subclass)
    ours.train()
    problems = compare_logs(ours.state.log_history, trl.state.log_history)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(_weights(ours), _weights(trl)) <= WEIGHT_ATOL
    assert ours.get_learning_rates() == trl.get_learning_rates() == [1e-3, 1e-2]
    # the override really changed the run: the plain trainer ends elsewhere
    plain = make_trainer("csd", models, tmp_path / "plain")
    plain.train()
    assert max_weight_diff(_weights(plain), _weights(ours)) > 10 * WEIGHT_ATOL


def test_log_and_save_metrics_write_transformers_files(models, tmp_path, capsys):
    runs = {}
    for impl in ("trl", "csd"):
        trainer = make_trainer(impl, models, tmp_path / impl)
        metrics = trainer.train().metrics
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        runs[impl] = {name: json.loads((tmp_path / impl / name).read_text())
                      for name in ("train_results.json", "all_results.json")}  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("***** train metrics *****") == 2
    for name in ("train_results.json", "all_results.json"):
        ours, ref = runs["csd"][name], runs["trl"][name]
        assert sorted(ours) == sorted(ref)
        assert ours["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert ours["epoch"] == ref["epoch"]


def test_getters_answer_as_transformers(models, tmp_path):
    kw = dict(gradient_accumulation_steps=2, weight_decay=0.1)
    trl = make_trainer("trl", models, tmp_path / "trl", **kw)
    ours = make_trainer("csd", models, tmp_path / "csd", **kw)
    assert ours.get_num_trainable_parameters() == trl.get_num_trainable_parameters()
    assert sorted(ours.get_decay_parameter_names(ours.model)) == sorted(
        trl.get_decay_parameter_names(trl.model)
    )
    assert ours.get_total_train_batch_size(ours.args) == trl.get_total_train_batch_size(trl.args)
    inputs = {"input_ids": torch.zeros(4, 10, dtype=torch.long)}
    assert ours.floating_point_ops(inputs) == trl.floating_point_ops(inputs)
    for trainer in (trl, ours):
        trainer.create_optimizer()
    assert len(ours.get_optimizer_group()) == len(trl.get_optimizer_group()) == 2
    head = ours.model.lm_head.weight
    assert ours.get_optimizer_group(head)["weight_decay"] == 0.1
    cls, kwargs = type(ours).get_optimizer_cls_and_kwargs(ours.args, ours.model)
    assert cls is torch.optim.AdamW and kwargs["lr"] == 1e-3


def test_test_dataloader_batches_the_set_as_predict(models, tmp_path):
    import datasets
    from trl_helpers import rows

    ours = make_trainer("csd", models, tmp_path / "csd", per_device_eval_batch_size=3)
    loader = ours.get_test_dataloader(datasets.Dataset.from_list(rows("standard", 7)))
    assert [batch.num_pairs for batch in loader] == [3, 3, 1]
