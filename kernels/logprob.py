"""Fused linear -> log-prob: each label's log-probability under the LM head, never forming (N, V).

    y = hidden @ weight.T + bias                          (N, V), only ever one tile of it
    z = transform(y) = softcap * tanh(y * logit_scale / softcap) / temperature
    logps[n] = z[n, labels[n]] - logsumexp_v z[n, v]      (0 where labels[n] == ignore_index)

replaces the eager torch (the `eager` impl, also the fp64 reference):

    z = transform(F.linear(hidden, weight, bias).float())            # (N, V)
    logps = z.log_softmax(-1).gather(-1, labels[:, None])[:, 0]

Backward, per row with incoming gradient g (0 on ignored rows):
    dL/dz[n, v] = g[n] * (1[v == labels[n]] - softmax(z)[n, v])
    dL/dy = dL/dz * logit_scale * (1 - tanh^2) / temperature, dH = dL/dy @ W, dW = dL/dy.T @ H.

Implementations (`impl=`):
  "triton"   kernels/logprob_triton.py. Forward: per row block, an online log-sum-exp over
             vocabulary blocks (optionally split over V for small N); saves only lse (N,). Backward,
             with no atomics (each output element has one writer, so results do not depend on launch
             order): a dH kernel over row blocks that recomputes each (rows, vocab) tile and adds
             dlogits @ W[vblock], and a dW / dbias kernel over vocabulary blocks that adds dlogits.T
             @ H[rows]; fp32 accumulation in registers when H fits one block, else in the program's
             own fp32 output rows. Row blocks whose g is all 0 (ignored labels) are skipped, and
             each kernel launches only if its input needs a gradient.
  "chunked"  the same algorithm in torch on (chunk_n, chunk_v) tiles (kernels/logprob_chunked.py):
             the CPU path.
  "eager"    full logits, plain torch.
"auto" = triton for CUDA / ROCm tensors when triton imports, else chunked.

Optional stats (no grad), with TRL's definitions (trl/kernels/chunked_logprob.py), per row:
entropy = -sum_v p log p, mean_logit = mean_v z, is_top1 = labels[n] is the first argmax of z.

With a known pair loss, kernels/linear_pair_loss.py fuses this head with the loss and reaches
3 GEMM-equivalents (logits, dH, dW) instead of the 4-5 a generic upstream gradient costs here.

Tests: python -m pytest tests/kernels/test_logprob.py -q   (TRITON_INTERPRET=1 on CPU)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import logprob_triton
from .logprob_chunked import (  # noqa: F401 - LogprobParams / Stats and the ref are public here
    LogprobParams,
    LogprobStats,
    chunked_bwd,
    chunked_fwd,
    eager_logprob,
    fused_linear_logprob_ref,
)


def _resolve(p: LogprobParams, hidden: Tensor) -> str:
    if p.impl != "auto":
        return p.impl
    if logprob_triton.triton is not None and hidden.device.type == "cuda":  # ROCm is "cuda" too
        return "triton"
    return "chunked"


def _forward(hidden, weight, bias, labels, p: LogprobParams, impl: str):
    """-> (logps fp32 (N,), lse (N,), stats tuple | None), for the triton / chunked impls."""
    fwd = logprob_triton.triton_fwd if impl == "triton" else chunked_fwd
    lse, z_label, stats = fwd(hidden, weight, bias, labels, p)
    logps = torch.where(labels != p.ignore_index, z_label - lse, 0.0)
    return logps, lse, stats


class LinearLogprobFunction(torch.autograd.Function):
    """(hidden, weight, bias, labels, params) -> (logps, entropy, mean_logit, is_top1).

    Saves only the inputs and the (N,) log-sum-exp; the backward recomputes each tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, p: LogprobParams):
        impl = _resolve(p, hidden)
        logps, lse, stats = _forward(hidden, weight, bias, labels, p, impl)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.params, ctx.impl = p, impl
        if stats is None:
            return logps, None, None, None
        ctx.mark_non_differentiable(*stats)
        return (logps, *stats)

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        p, needs = ctx.params, ctx.needs_input_grad[:3]
        g = torch.where(labels != p.ignore_index, grad_logps.float(), 0.0).contiguous()
        bwd = logprob_triton.triton_bwd if ctx.impl == "triton" else chunked_bwd
        dh, dw, db = bwd(hidden, weight, bias, labels, lse, g, p, needs)
        return (
            dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None,
            None,
        )


def _prepare(hidden, weight, bias, labels, p: LogprobParams):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden must be fp32 / bf16 / fp16, got {hidden.dtype}")
    if _resolve(p, hidden) == "triton":
        logprob_triton.check_triton(hidden)
    # both impls expect matching operand dtypes (under autocast the hidden states arrive in bf16
    # while the master weights are fp32). The cast is differentiable: dW is accumulated in fp32
    # and handed back rounded to the cast's dtype, as an eager lm_head under autocast does
    weight = weight.to(hidden.dtype)
    bias = bias.to(hidden.dtype) if bias is not None else None
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return hidden, weight, bias, labels.long().contiguous()


def fused_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_stats: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, LogprobStats]:
    """Log-prob (N,) fp32 of each label under `transform(hidden @ weight.T + bias)`, 0 on ignored
    rows; differentiable in hidden, weight, bias. With return_stats, also LogprobStats (no grad)."""
    p = LogprobParams(logit_scale, softcap, temperature, ignore_index, return_stats, impl)
    if p.impl == "eager":
        logps, stats = eager_logprob(hidden, weight, bias, labels, p)
        return (logps, stats) if return_stats else logps
    hidden, weight, bias, labels = _prepare(hidden, weight, bias, labels, p)
    logps, *stats = LinearLogprobFunction.apply(hidden, weight, bias, labels, p)
    return (logps, LogprobStats(*stats)) if return_stats else logps


@torch.no_grad()
def linear_logprob_inference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_stats: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, LogprobStats]:
    """Forward-only `fused_linear_logprob` for reference-model passes: no autograd state is kept."""
    p = LogprobParams(logit_scale, softcap, temperature, ignore_index, return_stats, impl)
    if p.impl == "eager":
        logps, stats = eager_logprob(hidden, weight, bias, labels, p)
    else:
        hidden, weight, bias, labels = _prepare(hidden, weight, bias, labels, p)
        logps, _, raw = _forward(hidden, weight, bias, labels, p, _resolve(p, hidden))
        stats = LogprobStats(*raw) if raw is not None else None
    return (logps, stats) if return_stats else logps
