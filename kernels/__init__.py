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

__all__ = [
    "LinearLogprobFunction",
    "LogprobParams",
    "LogprobStats",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "linear_logprob_inference",
]
