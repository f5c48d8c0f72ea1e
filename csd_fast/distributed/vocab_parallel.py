"""Log-probs under a vocabulary-sharded LM head (tensor parallelism), never gathering the logits.

    logps, stats = vocab_parallel_logprob(hidden, weight_shard, labels, vocab_start=r * V // tp,
                                          vocab_size=V, group=tp_group, return_stats=True)

Each of the `tp` ranks holds rows [vocab_start, vocab_start + V/tp) of the (V, H) head weight
and the same (N, H) hidden states. Per row n, rank r forms only its own logits z_r (in row
chunks, so one (chunk, V/tp) tile is live) and reduces them to six numbers:
    m_r = max z_r,  a_r = first argmax (global index),  s_r = sum exp(z_r - m_r),
    x_r = sum exp(z_r - m_r) z_r,  c_r = sum z_r,  t_r = z_r[label] (0 off this shard)
One all-gather of those (6, N) tensors, combined in rank order on every rank (so every rank
gets bitwise the same result; an all-reduce's order is the backend's):
    M = max_r m_r,  S = sum_r s_r exp(m_r - M),  lse = M + log S,  logp = sum_r t_r - lse
    entropy = lse - sum_r x_r exp(m_r - M) / S,  mean_logit = sum_r c_r / V,
    is_top1 = (a at the first r with m_r == M) == label
Backward: each rank builds its tile's dL/dz = g (onehot - exp(z - lse)) with the global lse
(csd_fast.kernels' chunked backward on the shard, labels off the shard never match), keeps its
own dW rows, and the dH partial sums are all-reduced over the group: the forward all-gather
is the only other collective. Megatron's vocab-parallel cross-entropy is the same idea.

`z = transform(hidden @ W.T + b)`: logit_scale, softcap and temperature as in kernels/logprob.py.
Tested against the fp64 full-vocabulary reference: tests/distributed/test_vocab_parallel.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from csd_fast.kernels.logprob import LogprobParams, LogprobStats, chunked_bwd

ROWS_PER_CHUNK = 1024  # (chunk, V/tp) fp32 tile: 1024 x 76k = 300 MiB for Qwen2.5 at tp=2


def _local_summaries(hidden, weight, bias, labels, vocab_start, p: LogprobParams) -> Tensor:
    """(6, N) fp32: max, global first argmax, sum exp, sum exp * z, sum z, label logit."""
    N, V_local = hidden.shape[0], weight.shape[0]
    out = torch.empty((6, N), dtype=torch.float32, device=hidden.device)
    mm_dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    w = weight.to(mm_dtype)
    b = bias.float() if bias is not None else None
    local = labels - vocab_start
    inside = (local >= 0) & (local < V_local)
    for n0 in range(0, N, ROWS_PER_CHUNK):
        n1 = min(N, n0 + ROWS_PER_CHUNK)
        z = (hidden[n0:n1].to(mm_dtype) @ w.T).float()  # (n, V/tp)
        if b is not None:
            z.add_(b)
        z = _transform(z, p)
        m, a = z.max(1)  # torch.max returns the first index of the maximum
        e = torch.exp(z - m[:, None])
        picked = z.gather(1, local[n0:n1].clamp(0, V_local - 1)[:, None])[:, 0]
        out[:, n0:n1] = torch.stack([
            m, (a + vocab_start).float(), e.sum(1), (e * z).sum(1), z.sum(1),
            torch.where(inside[n0:n1], picked, 0.0),
        ])  # fmt: skip
    return out


def _transform(z: Tensor, p: LogprobParams) -> Tensor:
    z = z * p.logit_scale
    if p.softcap is not None:
        z = p.softcap * torch.tanh(z / p.softcap)
    return z / p.temperature


def _combine(parts: list[Tensor], labels: Tensor, vocab_size: int, p: LogprobParams):
    """Every rank's (6, N) summaries -> (logps, lse, stats | None), in rank order."""
    stacked = torch.stack(parts)  # (tp, 6, N)
    m, argmax, s, x, c, t = stacked.unbind(1)  # each (tp, N)
    M = m.max(0).values
    w = torch.exp(m - M)
    S = (s * w).sum(0)
    lse = M + torch.log(S)
    valid = labels != p.ignore_index
    logps = torch.where(valid, t.sum(0) - lse, 0.0)
    if not p.return_stats:
        return logps, lse, None
    first = (m == M).int().argmax(0)  # the lowest rank holding the maximum
    top = argmax.gather(0, first[None])[0]
    entropy = lse - (x * w).sum(0) / S
    stats = LogprobStats(entropy, c.sum(0) / vocab_size, valid & (top == labels.float()))
    return logps, lse, stats


@torch.no_grad()
def vocab_parallel_log_sum_sq_probs(
    hidden: Tensor, weight: Tensor, *, group, bias: Tensor | None = None,
    logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0,
) -> Tensor:  # fmt: skip
    """(N,) log sum_v softmax(z)_v^2 (WPO's weights, csd_fast.forward.log_sum_sq_probs) from
    this rank's weight rows: log sum_r exp(logsumexp(2 z_r)) - 2 lse, a collective, no grad."""
    p = LogprobParams(logit_scale, softcap, temperature)
    mine = torch.empty((2, hidden.shape[0]), dtype=torch.float32, device=hidden.device)
    w, b = weight.float(), bias.float() if bias is not None else None
    for n0 in range(0, hidden.shape[0], ROWS_PER_CHUNK):
        z = torch.nn.functional.linear(hidden[n0 : n0 + ROWS_PER_CHUNK].float(), w, b)
        z = _transform(z, p)
        mine[0, n0 : n0 + len(z)] = torch.logsumexp(z, 1)
        mine[1, n0 : n0 + len(z)] = torch.logsumexp(2 * z, 1)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    lse, sq = torch.stack(parts).unbind(1)  # (tp, N) each, combined in rank order
    return torch.logsumexp(sq, 0) - 2 * torch.logsumexp(lse, 0)


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start, vocab_size, group, p):
        mine = _local_summaries(hidden, weight, bias, labels, vocab_start, p)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        logps, lse, stats = _combine(parts, labels, vocab_size, p)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.vocab_start, ctx.group, ctx.params = vocab_start, group, p
        if stats is None:
            return logps, None, None, None
        ctx.mark_non_differentiable(*stats)
        return (logps, *stats)

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        p, needs = ctx.params, ctx.needs_input_grad[:3]
        g = torch.where(labels != p.ignore_index, grad_logps.float(), 0.0).contiguous()
        # labels as this shard's columns; -1 (never a column) for a label on another shard
        local = labels - ctx.vocab_start
        local = torch.where((local >= 0) & (local < weight.shape[0]), local, -1)
        dh, dw, db = chunked_bwd(hidden, weight, bias, local, lse, g, p, needs)
        if needs[0]:  # each rank's dH covers its shard's logits only: sum over the group
            dist.all_reduce(dh, group=ctx.group)
        return (
            dh.to(hidden.dtype) if needs[0] else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None, None,
        )  # fmt: skip


def vocab_parallel_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, LogprobStats]:
    """(N,) fp32 log-probs of `labels` (global vocabulary ids) under the whole head, from this
    rank's weight rows [vocab_start, vocab_start + weight.shape[0]); a collective over `group`
    (every rank calls it with the same hidden and labels). Differentiable in hidden (the
    gradient summed over the group), weight and bias (this rank's rows)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V/tp, H), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    p = LogprobParams(logit_scale, softcap, temperature, ignore_index, return_stats, "chunked")
    weight = weight.to(hidden.dtype)
    bias = bias.to(hidden.dtype) if bias is not None else None
    labels = labels.long().contiguous()
    logps, *stats = _VocabParallelLogprob.apply(
        hidden.contiguous(), weight.contiguous(), bias, labels, vocab_start, vocab_size, group, p
    )
    return (logps, LogprobStats(*stats)) if return_stats else logps
