"""Chunked torch implementation of the fused linear -> log-prob: the CPU path, impl="chunked".

Same algorithm as the Triton kernels in kernels/logprob.py, on (chunk_n, chunk_v) tiles with torch
matmuls: the forward folds each tile into an online log-sum-exp and keeps only lse (N,); the
backward recomputes every tile, turns it into the logits gradient in place and feeds dH / dW / dbias
through fp32 matmuls. Peak transient memory is one tile (TILE_ELEMENTS fp32 values) plus the inputs'
fp32 copies on CPU, whatever N * V is.

Also the torch-only pieces shared with the Triton path (re-exported by kernels/logprob.py, the
public import path): LogprobParams, LogprobStats, the eager full-logits implementation and
`fused_linear_logprob_ref` (the fp64 truth of the tests). Tested through kernels/logprob.py:

    python -m pytest tests/kernels/test_logprob.py -q -k chunked
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = ("auto", "triton", "chunked", "eager")
TILE_ELEMENTS = 1 << 22  # fp32 elements per (chunk_n, chunk_v) tile, 16 MiB
CHUNK_V = 8192


class LogprobStats(NamedTuple):
    entropy: Tensor  # (N,) fp32
    mean_logit: Tensor  # (N,) fp32
    is_top1: Tensor  # (N,) bool, False on ignored rows


@dataclass(frozen=True)
class LogprobParams:
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    ignore_index: int = -100
    return_stats: bool = False
    impl: str = "auto"
    chunk_n: int | None = None  # chunked impl: rows per tile (None: TILE_ELEMENTS // chunk_v)
    chunk_v: int = CHUNK_V  # chunked impl: vocabulary columns per tile

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")


def eager_logprob(hidden, weight, bias, labels, p: LogprobParams, dtype: torch.dtype | None = None):
    """Full-logits torch: `dtype=None` is plain torch at the input dtype (fp32 log-softmax);
    `dtype=torch.float64` upcasts everything first (the reference)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    y = F.linear(hidden, weight, bias)  # (N, V)
    y = y if dtype is not None else y.float()
    z = y * p.logit_scale
    if p.softcap is not None:
        z = p.softcap * torch.tanh(z / p.softcap)
    z = z / p.temperature
    valid = labels != p.ignore_index
    logp_all = z.log_softmax(-1)
    logps = logp_all.gather(-1, labels.masked_fill(~valid, 0)[:, None])[:, 0]
    logps = torch.where(valid, logps, torch.zeros_like(logps))
    if not p.return_stats:
        return logps, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        stats = LogprobStats(entropy, z.mean(-1), valid & (z.argmax(-1) == labels))
    return logps, stats


def transform_(y: Tensor, p: LogprobParams) -> Tensor:
    """In place on an fp32 tile: y -> softcap * tanh(y * logit_scale / softcap) / temperature."""
    if p.logit_scale != 1.0:
        y.mul_(p.logit_scale)
    if p.softcap is not None:
        y.div_(p.softcap).tanh_().mul_(p.softcap)
    if p.temperature != 1.0:
        y.div_(p.temperature)
    return y


def _tiles(hidden: Tensor, weight: Tensor, bias: Tensor | None, p: LogprobParams):
    """Yield (n0, n1, v0, v1, h_chunk, w_chunk, y) with y = hidden[n0:n1] @ weight[v0:v1].T + b
    in fp32.

    CPU matmuls run in fp32 (bf16 GEMMs are slow there and this is more accurate); on a GPU the
    GEMM runs in the input dtype and only the tile is upcast. Outer loop over vocabulary chunks so
    each weight chunk is converted once.
    """
    N, V = hidden.shape[0], weight.shape[0]
    mm_dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    cv = max(1, min(V, p.chunk_v))
    cn = max(1, p.chunk_n or TILE_ELEMENTS // cv)
    h = hidden.to(mm_dtype)
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w = weight[v0:v1].to(mm_dtype)
        b = bias[v0:v1].float() if bias is not None else None
        for n0 in range(0, N, cn):
            n1 = min(N, n0 + cn)
            y = (h[n0:n1] @ w.T).float()  # (n, v)
            if b is not None:
                y.add_(b)
            yield n0, n1, v0, v1, h[n0:n1], w, y


def chunked_fwd(hidden, weight, bias, labels, p: LogprobParams):
    """-> (lse (N,), z_label (N,), stats (entropy, mean_logit, is_top1) | None), all fp32 / bool."""
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.full((N,), float("-inf"), **f32)
    s, xs, zsum, z_label = (torch.zeros(N, **f32) for _ in range(4))
    before = torch.full((N,), float("-inf"), **f32)  # max of z left of the label: first argmax
    for n0, n1, v0, v1, _, _, z in _tiles(hidden, weight, bias, p):
        z = transform_(z, p)
        local = labels[n0:n1] - v0
        inside = (local >= 0) & (local < v1 - v0)
        picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
        z_label[n0:n1] += torch.where(inside, picked, 0.0)
        if p.return_stats:
            zsum[n0:n1] += z.sum(1)
            cols = torch.arange(v1 - v0, device=z.device)
            early = cols[None, :] < local[:, None]
            b_tile = z.masked_fill(~early, float("-inf")).amax(1)
            torch.maximum(before[n0:n1], b_tile, out=before[n0:n1])
        new_m = torch.maximum(m[n0:n1], z.amax(1))
        rescale = torch.exp(m[n0:n1] - new_m)
        if p.return_stats:
            e = torch.exp(z - new_m[:, None])
            xs[n0:n1] = xs[n0:n1] * rescale + (e * z).sum(1)
            e_sum = e.sum(1)
        else:
            e_sum = z.sub_(new_m[:, None]).exp_().sum(1)  # z is dead: reuse its memory
        s[n0:n1] = s[n0:n1] * rescale + e_sum
        m[n0:n1] = new_m
    lse = m + torch.log(s)
    stats = None
    if p.return_stats:
        top1 = (labels != p.ignore_index) & (z_label >= m) & (z_label > before)
        stats = (lse - xs / s, zsum / V, top1)
    return lse, z_label, stats


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with an fp32 accumulator; half inputs on CUDA keep the product in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError):
            acc.addmm_(a.float(), b.float())
    else:
        acc.addmm_(a.float(), b.float())


def chunked_bwd(hidden, weight, bias, labels, lse, g, p: LogprobParams, needs):
    """-> (dh, dw, db) fp32 or None per `needs`; g (N,) fp32 is already 0 on ignored rows."""
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros((N, H), **f32) if needs[0] else None
    dw = torch.zeros((V, H), **f32) if needs[1] else None
    db = torch.zeros((V,), **f32) if needs[2] else None
    for n0, n1, v0, v1, h, w, y in _tiles(hidden, weight, bias, p):
        # d = g * (onehot - softmax(z)) * dz/dy, built in place on the tile
        u = y.mul_(p.logit_scale) if p.logit_scale != 1.0 else y
        t = torch.tanh(u / p.softcap) if p.softcap is not None else None
        z = t * (p.softcap / p.temperature) if t is not None else u.div_(p.temperature)
        gn = g[n0:n1]
        d = z.sub_(lse[n0:n1, None]).exp_().mul_(-gn[:, None])
        local = labels[n0:n1] - v0
        inside = (local >= 0) & (local < v1 - v0)
        d.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], torch.where(inside, gn, 0)[:, None])
        d.mul_(p.logit_scale / p.temperature)
        if t is not None:
            d.mul_(t.square_().neg_().add_(1.0))
        if db is not None:
            db[v0:v1] += d.sum(0)
        d = d.to(h.dtype)
        if dh is not None:
            _addmm_fp32_(dh[n0:n1], d, w)
        if dw is not None:
            _addmm_fp32_(dw[v0:v1], d.T, h)
    return dh, dw, db


def fused_linear_logprob_ref(
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
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, LogprobStats]:
    """Eager full-logits reference computed in `dtype` (fp64 truth for tests, fp32 for benches);
    differentiable, results in `dtype`."""
    p = LogprobParams(logit_scale, softcap, temperature, ignore_index, return_stats, "eager")
    logps, stats = eager_logprob(hidden, weight, bias, labels, p, dtype=dtype)
    return (logps, stats) if return_stats else logps
