"""The LM head fused with the pair loss: 3 GEMM-equivalents (logits, dH, dW) for forward + backward.

    z = transform(hidden @ weight.T + bias)                    (N, V), one chunk of pairs at a time
    token_logps[n] = z[n, labels[n]] - logsumexp_v z[n, v]
    loss = sum_chunks sum_pairs pair_terms(segment sums of token_logps)     (kernels/pair_loss.py)

replaces (same numbers, kernels/logprob.py + kernels/pair_loss.py):

    token_logps = fused_linear_logprob(hidden, weight, labels, ...)      # 1 GEMM fwd, 3-4 bwd
    loss, chosen, rejected = fused_pair_loss(token_logps, seq_offsets, ref_c, ref_r, ...)

Why 3: with a generic upstream gradient the head must recompute its logits in the backward (the
gradient of each token is unknown until then): logits, recompute, dH, dW = 4 GEMMs at best. Every
loss of kernels/pair_loss.py is separable over pairs once its normalisers (1/P, the NLL's token
count, CLO's G) are fixed, so the gradient of a chunk of WHOLE pairs is known inside the forward:

  per chunk of whole pairs (its chosen and rejected tokens, at most `chunk_elements` logits):
    1. y = h[rows] @ W.T (+ b) -> fp32 (n, V), kept                           GEMM 1
    2. per row, in place: z = transform(y); lse, z_label (and stats)          (tile kernel A)
    3. token log-probs -> the chunk's pair sums -> pair_terms -> g = d loss / d token_logps
       (a P-sized torch graph: microseconds)
    4. in place: d = g * (onehot - exp(z - lse)) * dz/dy                      (tile kernel B)
    5. dH[rows] = d @ W;  dW += d.T @ h[rows];  db += sum_rows d               GEMMs 2, 3
  backward: dH, dW, db times the incoming scalar gradient (no GEMM).

A single pair whose logits exceed the budget is split into row blocks and recomputed in step 4
(4 GEMMs for that pair only). dz/dy needs no saved tile: with softcap, z = c tanh(u / c) / T, so
1 - tanh^2 = 1 - (z T / c)^2 is read off z itself.

Impls: "triton" (tile kernels A, B: one program per row, one read of the tile in A and one read
+ write in B) and "torch" (CPU, and the reference of the tile kernels), which changes 2 and 4:
  2'. whole-tile ops (few ops matter more than cache blocking on a busy CPU): the tile becomes
      e = exp(z - max) in place, lse = max + log(sum e) as the chunked head computes it
  4'. tile -> e - (sum e) onehot (n writes), and the row scale -g / sum e moves onto the (n, H)
      operands: dH = -g/S ((e - S onehot) @ W), dW += (e - S onehot).T @ (-g/S h): no pass over
      the tile besides the GEMMs. With softcap dz/dy is elementwise and step 4 runs.
GEMMs are torch matmuls either way (cuBLAS / hipBLASLt on a GPU, fp32 into reused buffers on
CPU).
"auto" = triton on CUDA / ROCm tensors, else torch.

The chunks are planned on the host from the sequence offsets: pass `host_offsets` (the collator's
copy, `PairBatch.host_seq_offsets`) and the call reads nothing back from the device; without it,
seq_offsets is read once (a sync when it lives on a GPU). Everything else stays on the device:
row indices are device aranges, lengths a device diff (no blocking copy of host data).

Tests: python -m pytest tests/kernels/test_linear_pair_loss.py -q
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from . import autotune
from .logprob_chunked import LogprobStats, _addmm_fp32_, transform_
from .pair_loss import SUPPORTED, has_nll_term, loss_coefs, pair_terms, segment_sum, sft_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch impl needs no triton
    triton = None
    tl = None

# torch impl: fp32 elements per row block of the entropy's temporary (32 MiB, stats only: a
# quarter of a CPU chunk, so 4 ops per chunk rather than 32, see _tile_stats_torch)
BLOCK_ELEMENTS = 1 << 23
IMPLS = ("auto", "triton", "torch")


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _tile_softmax_kernel(
    z_ptr,  # (n, V) fp32: raw logits in, transformed logits z out (in place)
    labels_ptr,  # (n,) int64, ignore_index on ignored rows
    out_ptr,  # (5, n) fp32 out: lse, z_label, sum_v p z, sum_v z, label-is-first-argmax flag
    n, V, stride_z, logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, HAS_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # one program per row: transform in place, online log-sum-exp, the label's logit
    row = tl.program_id(0).to(tl.int64)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    label = tl.load(labels_ptr + row)
    base = z_ptr + row * stride_z
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane running max and sums
    s = tl.zeros((BLOCK_V,), tl.float32)
    xs = tl.zeros((BLOCK_V,), tl.float32)
    zsum = tl.zeros((BLOCK_V,), tl.float32)
    zl = tl.zeros((BLOCK_V,), tl.float32)  # the label's logit, in the one lane that meets it
    # max of z left of the label: the label is the first argmax iff it is above that
    before = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        # 1. transform, written back for kernel B
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=0.0) * logit_scale
        if HAS_SOFTCAP:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
        z = z * inv_temp
        tl.store(base + offs, z, mask=mask)
        # 2. per-lane online log-sum-exp (combined across lanes at the end)
        z_in = tl.where(mask, z, float("-inf"))
        new_m = tl.maximum(m, z_in)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # lanes with nothing seen yet
        rescale = tl.exp(m - safe_m)
        e = tl.exp(z_in - safe_m)
        s = s * rescale + e
        zl += tl.where(offs == label, z, 0.0)
        if HAS_STATS:
            xs = xs * rescale + e * z
            zsum += tl.where(mask, z, 0.0)
            before = tl.maximum(before, tl.where(mask & (offs < label), z, float("-inf")))
        m = new_m
    # 3. combine the lanes
    z_label = tl.sum(zl, axis=0)
    row_max = tl.max(m, axis=0)
    w = tl.exp(m - row_max)  # 0 for lanes that only saw padding
    total = tl.sum(s * w, axis=0)
    tl.store(out_ptr + row, row_max + tl.log(total))
    tl.store(out_ptr + n + row, z_label)
    if HAS_STATS:
        tl.store(out_ptr + 2 * n + row, tl.sum(xs * w, axis=0) / total)
        tl.store(out_ptr + 3 * n + row, tl.sum(zsum, axis=0))
        first = (z_label >= row_max) & (z_label > tl.max(before, axis=0))
        tl.store(out_ptr + 4 * n + row, first.to(tl.float32))


@_jit
def _tile_grad_kernel(
    z_ptr,  # (n, V) fp32: z in, d = dloss/dy out (in place)
    labels_ptr,  # (n,) int64
    lse_ptr,  # (n,) fp32
    g_ptr,  # (n,) fp32 dloss / d token_logps, 0 on ignored rows
    n, V, stride_z, scale, softcap_over_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # d = g * (onehot - softmax(z)) * dz/dy, dz/dy = logit_scale / T * (1 - (z T / c)^2)
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # logit_scale / temperature
    c_t = tl.cast(softcap_over_temp, tl.float32)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    base = z_ptr + row * stride_z
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(base + offs, mask=mask, other=0.0)
        d = g * (tl.where(offs == label, 1.0, 0.0) - tl.exp(z - lse)) * scale
        if HAS_SOFTCAP:
            t = z / c_t
            d = d * (1.0 - t * t)
        tl.store(base + offs, d, mask=mask)


class PairHeadOutput(NamedTuple):
    loss: Tensor  # () fp32, differentiable in hidden, weight, bias
    chosen_logps: Tensor  # (P,) fp32, detached
    rejected_logps: Tensor  # (P,)
    token_logps: Tensor  # (N,) fp32, detached, 0 on ignored rows
    stats: LogprobStats | None  # per token, no grad


@dataclass(frozen=True)
class PairHeadParams:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    clo_lambda: float = 0.5
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    ignore_index: int = -100
    return_stats: bool = False
    impl: str = "auto"
    chunk_elements: int | None = None  # fp32 logits kept per chunk (None: by device)

    def __post_init__(self) -> None:
        if self.loss_type not in SUPPORTED:
            raise ValueError(f"loss_type must be one of {SUPPORTED}, got {self.loss_type!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.temperature <= 0 or (self.softcap is not None and self.softcap <= 0):
            raise ValueError("temperature and softcap must be > 0")


def _row_blocks(n: int, V: int):
    """Row ranges of ~BLOCK_ELEMENTS (the entropy's temporaries)."""
    step = max(1, BLOCK_ELEMENTS // V)
    return ((r, min(n, r + step)) for r in range(0, n, step))


def _tile_stats_torch(z: Tensor, labels: Tensor, p: PairHeadParams):
    """In place: raw logits -> e = exp(z - max) (with softcap z stays, for dz/dy); returns
    (norm, token_logps, stats | None), each (n,): norm = sum_v e, or lse with softcap.

    lse = max + log(sum e), the chunked head's arithmetic op for op, so a policy still equal to
    its cached reference scores bit-equal log-probs (rewards exactly 0 at step 0, as in TRL).
    Whole-tile ops, not row blocks: each CPU op is one OpenMP region whose threads must all meet,
    and on a busy machine that wait costs more than the cache misses blocking would save (a
    (32, V) block loop measured 20x slower than one whole-tile log_softmax at load 5 on 2 cores)."""
    transform_(z, p)
    n, V = z.shape
    valid = labels != p.ignore_index
    cols = labels.clamp(0, V - 1)[:, None]
    z_label = z.gather(1, cols)[:, 0]
    if p.return_stats:
        # max(dim) returns the first index of the maximum, as TRL's argmax compare does
        top = z.max(1)
        top1, mean, m = valid & (top.indices == labels), z.mean(1), top.values
    else:
        m = z.amax(1)
    xs = torch.empty(n, dtype=z.dtype, device=z.device) if p.return_stats else None
    if p.softcap is None:
        s = z.sub_(m[:, None]).exp_().sum(1)  # the tile is e from here on
    else:  # z is kept: e in row blocks of a temporary
        s = torch.empty(n, dtype=z.dtype, device=z.device)
        tmp = torch.empty((min(n, max(1, BLOCK_ELEMENTS // V)), V), dtype=z.dtype, device=z.device)
        for r0, r1 in _row_blocks(n, V):
            e = torch.sub(z[r0:r1], m[r0:r1, None], out=tmp[: r1 - r0]).exp_()
            s[r0:r1] = e.sum(1)
            if xs is not None:
                xs[r0:r1] = torch.linalg.vecdot(e, z[r0:r1])
    lse = m + s.log()
    token_logps = torch.where(valid, z_label - lse, 0.0)
    norm = s if p.softcap is None else lse
    if not p.return_stats:
        return norm, token_logps, None
    if p.softcap is None:  # sum_v e z = sum_v e (log e + m): entropy = lse - that / s
        tmp = torch.empty((min(n, max(1, BLOCK_ELEMENTS // V)), V), dtype=z.dtype, device=z.device)
        for r0, r1 in _row_blocks(n, V):
            e_log_e = torch.special.xlogy(z[r0:r1], z[r0:r1], out=tmp[: r1 - r0]).sum(1)
            xs[r0:r1] = e_log_e + s[r0:r1] * m[r0:r1]
    return norm, token_logps, (lse - xs / s, mean, top1)


def _tile_grad_torch(z: Tensor, labels: Tensor, norm: Tensor, g: Tensor, p: PairHeadParams):
    """In place -> d = g s_l (onehot - softmax) dz/dy (s_l = logit_scale / T), from the tile and
    norm `_tile_stats_torch` left: e and sum e, or (softcap) z and lse."""
    scale = p.logit_scale / p.temperature
    cols = labels.clamp(0, z.shape[1] - 1)[:, None]
    if p.softcap is None:  # softmax = e / sum e
        z.mul_((g * -scale / norm)[:, None])
        z.scatter_add_(1, cols, (g * scale)[:, None])  # g is 0 on ignored rows
        return
    factor = 1.0 - (z / (p.softcap / p.temperature)).square()  # dz/dy = 1 - (z T / c)^2
    at_label = g * scale * factor.gather(1, cols)[:, 0]
    z.sub_(norm[:, None]).exp_().mul_((g * -scale)[:, None]).mul_(factor)
    z.scatter_add_(1, cols, at_label[:, None])


def _head_grads_torch(e, h, w, labels, g, norm, p: PairHeadParams, dh_part, dw, dw_beta, db):
    """No softcap: the head's gradients from the tile e = exp(z - max) with no pass over it.

    d = g s_l (onehot - e / S) (S = sum e, s_l = logit_scale / T) is never formed: the tile
    becomes e - S onehot (n writes at the labels) and the row scale -g s_l / S moves onto the
    (n, H) operands,
        dH = (-g s_l / S) ((e - S onehot) @ W)        dW += (e - S onehot).T @ ((-g s_l / S) h)
    so the (n, V) tile is read by the two GEMMs and by nothing else. Consumes the tile."""
    neg = g * -(p.logit_scale / p.temperature) / norm  # (n,), 0 on ignored rows
    cols = labels.clamp(0, e.shape[1] - 1)[:, None]
    e.scatter_add_(1, cols, -norm[:, None])
    if dh_part is not None:
        torch.mm(e, w, out=dh_part).mul_(neg[:, None])
    if dw is not None:
        dw.addmm_(e.T, h * neg[:, None], beta=dw_beta)
    if db is not None:
        db.addmv_(e.T, neg)


def _tile_stats_triton(z: Tensor, labels: Tensor, p: PairHeadParams):
    n, V = z.shape
    out = torch.empty((5, n), dtype=torch.float32, device=z.device)
    _tile_softmax_kernel[(n,)](
        z, labels, out, n, V, z.stride(0), float(p.logit_scale), float(p.softcap or 1.0),
        1.0 / p.temperature, HAS_SOFTCAP=p.softcap is not None, HAS_STATS=p.return_stats,
        BLOCK_V=autotune.tile_block(), num_warps=autotune.tile_warps(),
    )  # fmt: skip
    valid = labels != p.ignore_index
    lse, token_logps = out[0], torch.where(valid, out[1] - out[0], 0.0)
    stats = (lse - out[2], out[3] / V, valid & (out[4] > 0)) if p.return_stats else None
    return lse, token_logps, stats


def _tile_grad_triton(z: Tensor, labels: Tensor, lse: Tensor, g: Tensor, p: PairHeadParams):
    n, V = z.shape
    c_t = (p.softcap / p.temperature) if p.softcap is not None else 1.0
    _tile_grad_kernel[(n,)](
        z, labels, lse.contiguous(), g.contiguous(), n, V, z.stride(0),
        p.logit_scale / p.temperature, c_t, HAS_SOFTCAP=p.softcap is not None,
        BLOCK_V=autotune.tile_block(), num_warps=autotune.tile_warps(),
    )  # fmt: skip


def _chunks(offsets: list[int], P: int, V: int, budget: int) -> list[tuple[int, int]]:
    """Pair ranges [a, b) whose tokens' logits (tokens x V) fit `budget` elements (>= 1 pair)."""
    out, a, used = [], 0, 0
    for i in range(P):
        tokens = offsets[i + 1] - offsets[i] + offsets[P + i + 1] - offsets[P + i]
        if i > a and (used + tokens) * V > budget:
            out.append((a, i))
            a, used = i, 0
        used += tokens
    if P:
        out.append((a, P))
    return out


def _default_budget(device: torch.device, V: int) -> int:
    # GPU: <= 1 GiB of fp32 logits (the transient goal). CPU: 128 MiB, 1024 rows at
    # V=32000: the dW GEMM's K is the chunk's rows, and at 512 rows its 8 read-modify-writes of
    # dW cost ~15% over one bare GEMM (measured at N=4096, H=512; 1024 rows: ~4%)
    return (1 << 28) if device.type == "cuda" else max(1 << 25, 2 * V)


class LinearPairLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, labels, seq_offsets, ref_c, ref_r, sft_mask, group_ids, host_offsets,
    params) -> (loss, chosen, rejected, token_logps, entropy, mean_logit, is_top1)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, seq_offsets, ref_c, ref_r, sft_mask, group_ids,
                host_offsets, p: PairHeadParams):  # fmt: skip
        N, H = hidden.shape
        V, P, dev = weight.shape[0], ref_c.numel(), hidden.device
        impl = p.impl if p.impl != "auto" else ("triton" if dev.type == "cuda" else "torch")
        stats_fn = _tile_stats_triton if impl == "triton" else _tile_stats_torch
        grad_fn = _tile_grad_triton if impl == "triton" else _tile_grad_torch
        offsets = host_offsets if host_offsets is not None else seq_offsets.tolist()
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        f32 = dict(dtype=torch.float32, device=dev)
        mm = torch.float32 if dev.type == "cpu" else hidden.dtype  # fp32 GEMMs on CPU
        h_all, w = hidden.to(mm), weight.to(mm)
        dh = torch.zeros((N, H), **f32) if needs_h else None
        # dW: the first chunk's GEMM writes it (beta=0), the others accumulate: no 4*V*H-byte fill
        dw = torch.empty((V, H), **f32) if needs_w else None
        acc = {"dw": 0.0}  # beta of the next dW GEMM
        db = torch.zeros((V,), **f32) if needs_b else None
        token_logps = torch.zeros(N, **f32)
        stats = [torch.zeros(N, **f32), torch.zeros(N, **f32), torch.zeros(N, dtype=torch.bool,
                 device=dev)] if p.return_stats else None  # fmt: skip
        coefs = loss_coefs(p.loss_type, P, p.clo_lambda, group_ids, dev)
        sft, sft_den = sft_inputs(seq_offsets, sft_mask, P)
        has_sft = has_nll_term(p.loss_type, p.clo_lambda)
        lengths = seq_offsets.diff()  # (2P,) on the device
        chosen, rejected = torch.zeros(P, **f32), torch.zeros(P, **f32)
        loss = torch.zeros((), **f32)
        budget = p.chunk_elements or _default_budget(dev, V)
        rows_max = max(1, budget // V)
        # CPU: one logits buffer for every chunk (a fresh 64 MiB tensor per chunk is page faults)
        buf = torch.empty((min(N, rows_max), V), **f32) if dev.type == "cpu" and N else None
        row_scaled = impl == "torch" and p.softcap is None and w.dtype == torch.float32
        dh_buf = torch.empty((min(N, rows_max), H), **f32) if needs_h and row_scaled else None
        for a, b in _chunks(offsets, P, V, budget):
            span_c, span_r = (offsets[a], offsets[b]), (offsets[P + a], offsets[P + b])
            rows = torch.cat([torch.arange(*span_c, device=dev), torch.arange(*span_r, device=dev)])
            n, k = rows.numel(), b - a
            h, lab = h_all.index_select(0, rows), labels.index_select(0, rows)
            blocks = [(r, min(n, r + rows_max)) for r in range(0, n, rows_max)]
            # lse: the tile's row normaliser (triton: lse; torch: sum_v exp(z - max), see above)
            kept, lse, x = [], torch.empty(n, **f32), torch.empty(n, **f32)
            for r0, r1 in blocks:  # 1-2: logits, softmax statistics
                z = _logits(h[r0:r1], w, bias, buf)
                lse[r0:r1], x[r0:r1], st = stats_fn(z, lab[r0:r1], p)
                if st is not None:
                    for out, val in zip(stats, st, strict=True):
                        out.index_copy_(0, rows[r0:r1], val)
                kept.append(z if len(blocks) == 1 else None)
            # 3. the chunk's pair sums, its share of the loss, and g = d loss / d token_logps
            valid = lab != p.ignore_index
            x.requires_grad_()
            local = torch.cat([lengths[a:b], lengths[P + a : P + b]]).cumsum(0)
            local = torch.cat([local.new_zeros(1), local])
            with torch.enable_grad():
                sums = segment_sum(x, local)  # (2k,)
                parts = pair_terms(sums[:k], sums[k:], ref_c[a:b], ref_r[a:b], lengths[a:b],
                                   lengths[P + a : P + b], p.loss_type, p.beta, p.label_smoothing,
                                   coefs, sft[a:b], sft_den, has_sft).sum()  # fmt: skip
                (g,) = torch.autograd.grad(parts, x)
            loss += parts.detach()
            chosen[a:b], rejected[a:b] = sums[:k].detach(), sums[k:].detach()
            token_logps.index_copy_(0, rows, x.detach())
            g = torch.where(valid, g, 0.0)
            if not (needs_h or needs_w or needs_b):
                continue  # no-grad call (evaluation): the loss and log-probs only
            for (r0, r1), z in zip(blocks, kept, strict=True):  # 4-5: d in place, dH, dW, db
                if z is None:
                    z = _refresh(h[r0:r1], w, bias, stats_fn, lab[r0:r1], p, buf)
                if row_scaled:  # torch, fp32 GEMMs, no softcap: one pass over the tile
                    part = dh_buf[: r1 - r0] if dh is not None else None
                    _head_grads_torch(z, h[r0:r1], w, lab[r0:r1], g[r0:r1], lse[r0:r1], p,
                                      part, dw, acc["dw"], db)  # fmt: skip
                    acc["dw"] = 1.0
                    if part is not None:
                        dh.index_copy_(0, rows[r0:r1], part)
                    continue
                grad_fn(z, lab[r0:r1], lse[r0:r1], g[r0:r1], p)
                if db is not None:
                    db += z.sum(0)
                d = z.to(mm)
                if dh is not None:
                    part = torch.zeros((r1 - r0, H), **f32)
                    _addmm_fp32_(part, d, w)
                    dh.index_copy_(0, rows[r0:r1], part)
                if dw is not None:
                    if acc["dw"] == 0.0:
                        dw.zero_()
                    _addmm_fp32_(dw, d.T, h[r0:r1])
                    acc["dw"] = 1.0
        if dw is not None and acc["dw"] == 0.0:  # no chunk wrote it (no pairs)
            dw.zero_()
        ctx.used = False
        # handed back in the inputs' dtypes (dW rounded once, as an eager head's would be)
        ctx.save_for_backward(*(None if t is None else t.to(x.dtype)
                                for t, x in ((dh, hidden), (dw, weight), (db, bias))))  # fmt: skip
        outs = [loss, chosen, rejected, token_logps] + (stats or [None, None, None])
        ctx.mark_non_differentiable(*[t for t in outs[1:] if t is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.used:  # the gradients were scaled in place by the first backward
            raise RuntimeError(
                "the fused head + loss supports one backward per forward (its gradients are "
                "computed in the forward and handed over once)"
            )
        ctx.used = True
        dh, dw, db = ctx.saved_tensors
        # in place: no second V x H buffer (the tensors were made for this hand-over)
        scale = lambda t: None if t is None else _scale_in_place(t, grad_loss)
        return (scale(dh), scale(dw), scale(db), *([None] * 8))


_SCALE_ROWS_ELEMENTS = 1 << 22  # fp32 transient of the fp16 rescale: 16 MiB at most


def _scale_in_place(t: Tensor, g: Tensor) -> Tensor:
    """t *= g. An fp16 loss scale (a GradScaler starts at 2**16) does not fit in fp16, so
    there the product is taken in fp32, a row block at a time, and rounded once, as the eager
    head's fp32 gradient rounds when it enters the fp16 GEMM; bf16 has fp32's range."""
    if t.dtype != torch.float16:
        return t.mul_(g.to(t.dtype))
    flat = t.view(t.shape[0], -1) if t.dim() else t.view(1)
    step = max(1, _SCALE_ROWS_ELEMENTS // max(1, flat.shape[1]))
    g = g.float()
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step]
        block.copy_(block.float().mul_(g))
    return t


def _logits(h: Tensor, w: Tensor, bias: Tensor | None, buf: Tensor | None = None) -> Tensor:
    """(n, V) fp32 logits; on CPU written into `buf` (fp32 GEMM), on a GPU in the GEMM's dtype
    first, rounded as the eager head rounds its logits."""
    if buf is not None:
        out = buf[: h.shape[0]]
        if bias is not None:
            return torch.addmm(bias.float(), h, w.T, out=out)
        return torch.mm(h, w.T, out=out)
    y = (h @ w.T).float()
    return y.add_(bias.float()) if bias is not None else y


def _refresh(h, w, bias, stats_fn, labels, p, buf=None):
    """A row block of an over-budget pair: recompute its logits and transform them in place."""
    z = _logits(h, w, bias, buf)
    stats_fn(z, labels, replace(p, return_stats=False))
    return z


def fused_linear_pair_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    seq_offsets: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    bias: Tensor | None = None,
    sft_mask: Tensor | None = None,
    group_ids: Tensor | None = None,
    host_offsets: Sequence[int] | None = None,
    **params,
) -> PairHeadOutput:
    """The pair loss of `kernels/pair_loss.py` over the head's token log-probs, with the head's
    gradients computed inside the forward (3 GEMMs). `params`: PairHeadParams fields."""
    p = PairHeadParams(**params)
    N, P = hidden.shape[0], ref_chosen_logps.numel()
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if labels.shape != (N,) or seq_offsets.shape != (2 * P + 1,):
        raise ValueError(f"need labels ({N},) and seq_offsets ({2 * P + 1},), got "
                         f"{tuple(labels.shape)} and {tuple(seq_offsets.shape)}")  # fmt: skip
    if host_offsets is not None and (len(host_offsets) != 2 * P + 1 or host_offsets[-1] != N):
        raise ValueError(f"host_offsets must be seq_offsets on the host: {2 * P + 1} values "
                         f"ending at N={N}, got {len(host_offsets)} ending at "
                         f"{host_offsets[-1] if host_offsets else None}")  # fmt: skip
    if p.impl == "triton" and (triton is None or (hidden.device.type == "cpu"
                                                  and not autotune.is_interpreter())):  # fmt: skip
        raise RuntimeError("impl='triton' needs triton and a GPU, or TRITON_INTERPRET=1 on CPU")
    # operands in one dtype, as the eager head under autocast (dW comes back in weight's dtype)
    weight = weight.to(hidden.dtype)
    bias = bias.to(hidden.dtype) if bias is not None else None
    loss, chosen, rejected, token_logps, *stats = LinearPairLossFunction.apply(
        hidden, weight, bias, labels.long(), seq_offsets.long(), ref_chosen_logps.float(),
        ref_rejected_logps.float(), sft_mask, group_ids, host_offsets, p,
    )  # fmt: skip
    st = LogprobStats(*stats) if p.return_stats else None
    return PairHeadOutput(loss, chosen, rejected, token_logps, st)
