"""transformers' `Trainer` methods a TRL user calls or overrides, over csd-fast's own loop.

    class MyTrainer(DPOTrainer):                 # as with TRL's trainer
        def create_optimizer(self, model=None):  # own parameter groups; the loop uses it
            ...
    out = trainer.train()
    trainer.log_metrics("train", out.metrics); trainer.save_metrics("train", out.metrics)

`create_optimizer` / `create_scheduler` are the hooks `train()` calls (csd_fast.loop builds
nothing itself), with transformers' contract: build only when none is set, return it. The
metric writers are transformers' own functions; the getters answer as transformers' do.
Tests: tests/test_trainer_hooks.py.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import log_metrics, metrics_format, save_metrics


class TrainerHooks:
    """Mixin of DPOTrainer: optimizer/schedule hooks, metric files, small getters."""

    # transformers' functions of a Trainer (they read is_world_process_zero and output_dir)
    log_metrics = log_metrics
    save_metrics = save_metrics
    metrics_format = metrics_format
    get_optimizer_cls_and_kwargs = staticmethod(Trainer.get_optimizer_cls_and_kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`args.optim` over transformers' decay groups (csd_fast.optim), unless one is set."""
        from csd_fast.optim import build_optimizer

        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model if model is None else model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """`args.lr_scheduler_type` over `num_training_steps`, unless a schedule is set."""
        from csd_fast.optim import build_scheduler

        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            self.lr_scheduler = build_scheduler(optimizer, self.args, num_training_steps)
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    def get_decay_parameter_names(self, model) -> list[str]:
        from csd_fast.optim import decay_parameter_names

        names = decay_parameter_names(model)
        return [n for n, _ in model.named_parameters() if n in names]

    def get_learning_rates(self) -> list[float]:
        return [group["lr"] for group in self._need_optimizer().param_groups]

    def get_optimizer_group(self, param=None):
        """The group holding `param`, or every group's parameters (transformers' rule)."""
        groups = self._need_optimizer().param_groups
        if param is not None:
            for group in groups:
                if any(param is p for p in group["params"]):
                    return group
        return [group["params"] for group in groups]

    def get_num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_total_train_batch_size(self, args) -> int:
        """Pairs per optimizer step over all data-parallel ranks."""
        return (
            self._per_rank_batch_size(True)
            * args.gradient_accumulation_steps
            * (self.dist.world_size)
        )

    def floating_point_ops(self, inputs: dict) -> int:
        """transformers' estimate for one forward + backward of `inputs` (what total_flos sums)."""
        name = getattr(self.model, "main_input_name", "input_ids")
        return self._flos_per_input_id() * inputs[name].numel() if name in inputs else 0

    def num_examples(self, dataloader) -> int:
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):  # a stream's loader: estimated as transformers does
            return len(dataloader) * self.args.per_device_train_batch_size

    def _need_optimizer(self):
        if self.optimizer is None:
            raise ValueError(
                "Trainer optimizer is None, please make sure you have setup the optimizer before."
            )
        return self.optimizer
