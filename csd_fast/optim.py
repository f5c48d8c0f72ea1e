"""Optimizer, learning-rate schedule and trainable-parameter selection for the trainer.

AdamW (or any other `optim` transformers knows, built by transformers) with transformers' decay
groups (no decay on biases and norm weights), the schedules of
`transformers.get_scheduler` (so a run matches TRL's to the bit), and `trainable_params`: regex
patterns over parameter names, e.g. CLO's attention-only training
`trainable_params=[r"\\.self_attn\\."]`.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Parameters whose names match these get no weight decay (transformers' rule).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay",
    "reduce_lr_on_plateau",
    "greedy",  # transformers' GreedyLR (in 5.19)
)
# schedules stepped with the evaluation metric (metric_for_best_model) after each evaluation,
# not after each optimizer step: they need an eval strategy
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def select_trainable(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Freeze every parameter whose name matches none of `patterns`; return the trainable names.

    Raises ValueError when the patterns match nothing, because a run that trains no weights
    would otherwise finish 'successfully' and teach nothing.
    """
    if not patterns:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    compiled = [re.compile(p) for p in patterns]
    names = []
    for name, param in model.named_parameters():
        keep = any(c.search(name) for c in compiled)
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(
            f"trainable_params {patterns} match no parameter of {type(model).__name__}"
        )
    return names


def decay_parameter_names(model: nn.Module) -> set[str]:
    forbidden = [re.compile(p) for p in NO_DECAY_PATTERNS]
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.LayerNorm) or any(f.search(full.lower()) for f in forbidden):
                continue
            out.add(full)
    return out


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """`args.optim` over the trainable parameters, in transformers' two decay groups.

    AdamW is built here (the default; bit-equal to TRL's). Every other name transformers knows
    (sgd, adagrad, rmsprop, adafactor, bitsandbytes' 8-bit / paged / lion, torchao's low-bit
    AdamW, ...) comes from transformers' own `Trainer.get_optimizer_cls_and_kwargs`, with
    `optim_args`, so its settings are what TRL would pick."""
    optim = str(getattr(args.optim, "value", args.optim))
    decay = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        return _transformers_optimizer(model, args, optim, groups)
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    if optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# transformers' optimizers that replace the training step (LOMO fuses it into backward) or hook
# per-layer optimizers into backward (layer-wise GaLore / APOLLO), or need train()/eval() calls
# around evaluation (schedule-free): the loop runs a plain optimizer.step()
_OWN_STEP = ("lomo", "adalomo", "layerwise", "schedule_free")


def _transformers_optimizer(model, args, optim: str, groups) -> torch.optim.Optimizer:
    from dataclasses import fields
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor
    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    if any(part in optim for part in _OWN_STEP):
        raise NotImplementedError(
            f"optim={optim!r}: it changes the training step itself (fused backward, per-layer "
            "hooks or train/eval modes), which csd-fast's loop does not run; choose another"
        )
    sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
    # transformers reads a TrainingArguments; these are the same fields, optim as its enum
    view = SimpleNamespace(**{f.name: getattr(args, f.name) for f in fields(args)})
    view.optim = OptimizerNames(optim)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(view, model)
    if sharded and not cls.__module__.startswith("torch.optim"):
        raise NotImplementedError(
            f"optim={optim!r} under FSDP2: {cls.__module__}.{cls.__name__} steps plain tensors, "
            "not the sharded DTensor parameters; use adamw_torch(_fused), sgd, adagrad or "
            "rmsprop under torchrun"
        )
    kwargs = dict(kwargs)
    if "params" in kwargs or "model" in kwargs or "optimizer_dict" in kwargs:
        raise NotImplementedError(f"optim={optim!r} builds its own parameter groups")
    optimizer = cls(groups, **kwargs)
    if "bitsandbytes" in cls.__module__ and kwargs.get("optim_bits") == 8:
        # transformers' rule: embeddings keep 32-bit optimizer state (8-bit is unstable there)
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def warmup_steps_for(args, num_training_steps: int) -> int:
    """transformers' rule: warmup_steps >= 1 is a count, a float in [0, 1) a ratio of the run."""
    ratio = getattr(args, "warmup_ratio", 0.0) or 0.0
    steps = getattr(args, "warmup_steps", 0) or 0
    if steps >= 1:
        return int(steps)
    if steps > 0:
        return math.ceil(num_training_steps * steps)
    return math.ceil(num_training_steps * ratio)


def build_scheduler(optimizer, args, num_training_steps: int):
    """The schedule of `transformers.get_scheduler`, plus `min_lr` as a floor for cosine."""
    from transformers import get_scheduler

    name = str(getattr(args, "lr_scheduler_type", "linear"))
    if hasattr(name, "value"):
        name = name.value
    kwargs = dict(getattr(args, "lr_scheduler_kwargs", None) or {})
    min_lr = getattr(args, "min_lr", None)
    if min_lr is not None:
        if name == "cosine":
            name = "cosine_with_min_lr"
        if name not in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
            raise ValueError(f"min_lr needs a cosine schedule, got lr_scheduler_type={name!r}")
        kwargs.setdefault("min_lr", min_lr)
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type {name!r} is not one of {SCHEDULES}")
    if name == "greedy" and not hasattr(__import__("transformers"), "GreedyLR"):
        raise NotImplementedError(
            "lr_scheduler_type='greedy' needs a transformers with GreedyLR (5.19 has it)"
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps_for(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


def steps_on_metric(scheduler) -> bool:
    """A schedule stepped with an evaluation metric (ReduceLROnPlateau, transformers' GreedyLR)."""
    return type(scheduler).__name__ in ("ReduceLROnPlateau", "GreedyLR")


def step_on_metric(scheduler, args, metrics: dict) -> None:
    """transformers' rule after an evaluation: step on metrics['eval_' + metric_for_best_model]."""
    if not steps_on_metric(scheduler):
        return
    key = args.metric_for_best_model or "loss"
    key = key if key.startswith("eval_") else f"eval_{key}"
    if key not in metrics:
        raise KeyError(
            f"metric_for_best_model={args.metric_for_best_model!r}: {key!r} is not among the "
            f"evaluation metrics {sorted(metrics)}; {args.lr_scheduler_type} steps on it"
        )
    scheduler.step(metrics[key])
