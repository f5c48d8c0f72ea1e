"""Triton kernels of csd-fast, installed as csd_fast.kernels."""

from __future__ import annotations

from .logprob import (
    LinearLogprobFunction,
    LogprobParams,
    LogprobStats,
    fused_linear_logprob,
    fused_linear_logprob_ref,
    linear_logprob_inference,
)
from .pair_loss import SUPPORTED as PAIR_LOSS_TYPES
from .pair_loss import PairLossFunction, fused_pair_loss, pair_loss_torch

__all__ = [
    "LinearLogprobFunction",
    "LogprobParams",
    "LogprobStats",
    "PAIR_LOSS_TYPES",
    "PairLossFunction",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "fused_pair_loss",
    "linear_logprob_inference",
    "pair_loss_torch",
]
