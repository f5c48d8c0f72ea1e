"""Optimizer, learning-rate schedule and trainable-parameter selection for the trainer.

AdamW with transformers' decay groups (no decay on biases and norm weights), the schedules of
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
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay",
)


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
    """AdamW over the trainable parameters, in transformers' two decay groups."""
    optim = str(getattr(args, "optim", "adamw_torch"))
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise NotImplementedError(
            f"optim={optim!r} is not supported yet (adamw_torch, adamw_torch_fused)"
        )
    decay = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    if optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)


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
        if name != "cosine_with_min_lr":
            raise ValueError(f"min_lr needs a cosine schedule, got lr_scheduler_type={name!r}")
        kwargs.setdefault("min_lr", min_lr)
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type {name!r} is not one of {SCHEDULES}")
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps_for(args, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
