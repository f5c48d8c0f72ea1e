"""Triton kernels of the fused linear -> log-prob (impl="triton"), and their launchers.

Maths, the torch code they replace and the public API: kernels/logprob.py. Here:

  _logprob_fwd_kernel      per (row block, vocabulary split): an online log-sum-exp over vocabulary
                           tiles recomputed from H and W; writes per-split partials (max, sumexp,
                           label logit, optional stats) that `triton_fwd` combines.
  _logprob_bwd_dh_kernel   per (row block, split): dH[rows] = sum_v dlogits @ W[v], one writer per
                           output element (no atomics: bits independent of launch order).
  _logprob_bwd_dw_kernel   per vocabulary block: dW[v] = sum_rows dlogits.T @ H[rows], and dbias.

The vocabulary split of the forward and dH kernels is a triton.heuristics of the BLOCK_N the
autotuner picked (kernels/autotune.py), and the partial buffers are sized for the largest split
any config can ask for. Compiled for sm80 / sm90 / gfx90a without a GPU by `python -m bench
compile` (registers, spills, shared memory, occupancy in bench/results/compile.csv).

Tests: python -m pytest tests/kernels/test_logprob.py -q -k triton   (TRITON_INTERPRET=1 on CPU)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autotune
from .logprob_chunked import LogprobParams

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the chunked path needs no triton
    triton = None
    tl = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@_jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # y = h[offs_n] @ w[offs_v].T + b in fp32, reduced over H in BLOCK_H steps
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@_jit
def _logprob_fwd_kernel(
    h_ptr,  # (N, H) hidden, unit stride along H
    w_ptr,  # (V, H) weight, unit stride along H
    b_ptr,  # (V,) bias (unused without HAS_BIAS)
    labels_ptr,  # (N,) int64
    part_ptr,  # (6, >= SPLIT_V, N) fp32 out: max, sumexp, sum(e*z), sum(z), max before label, z_y
    N, V, H, stride_hn, stride_wv, stride_plane,  # stride_plane: elements between part's planes
    logit_scale, softcap, inv_temp, ignore_index,
    SPLIT_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # Program (pid_n, pid_v) folds vocabulary range pid_v of rows pid_n into online-LSE partials;
    # splitting V keeps the GPU full when N / BLOCK_N is smaller than the number of SMs.
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    per_split = tl.cdiv(tl.cdiv(V, SPLIT_V), BLOCK_V) * BLOCK_V
    v_start = pid_v * per_split
    v_end = tl.minimum(v_start + per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    xs = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    before = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        # 1. logits tile and the head's transform
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn,
                         stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                         UPCAST)  # fmt: skip
        z = z * logit_scale
        if HAS_SOFTCAP:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # softcap * tanh(z / softcap)
        z = z * inv_temp
        # 2. the label's logit lies in exactly one tile of one split
        is_label = offs_v[None, :] == labels[:, None]
        z_label += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        if HAS_STATS:
            zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
            early = mask_v[None, :] & (offs_v[None, :] < labels[:, None])
            before = tl.maximum(before, tl.max(tl.where(early, z, float("-inf")), axis=1))
        # 3. online log-sum-exp: every tile has a valid column, so new_m is finite
        z_in = tl.where(mask_v[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z_in, axis=1))
        rescale = tl.exp(m - new_m)
        e = tl.exp(z_in - new_m[:, None])  # 0 outside the tile, where z stays finite
        s = s * rescale + tl.sum(e, axis=1)
        if HAS_STATS:
            xs = xs * rescale + tl.sum(e * z, axis=1)
        m = new_m

    row = part_ptr + pid_v * N + offs_n
    plane = stride_plane
    tl.store(row, m, mask=mask_n)
    tl.store(row + plane, s, mask=mask_n)
    tl.store(row + 5 * plane, z_label, mask=mask_n)
    if HAS_STATS:
        tl.store(row + 2 * plane, xs, mask=mask_n)
        tl.store(row + 3 * plane, zsum, mask=mask_n)
        tl.store(row + 4 * plane, before, mask=mask_n)


@_jit
def _dlogits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, labels, lse, g, H, stride_hn,
    stride_wv, logit_scale, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # dL/dy = g * (onehot - softmax(z)) * dz/dy on one recomputed tile, 0 outside the valid tile;
    # rounded to the input dtype for the next dot, as the eager backward rounds its logits gradient
    y = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_hn,
                     stride_wv, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                     UPCAST)  # fmt: skip
    u = y * logit_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * u / softcap) - 1.0
        z = softcap * t * inv_temp
        dz_dy = logit_scale * inv_temp * (1.0 - t * t)
    else:
        z = u * inv_temp
        dz_dy = logit_scale * inv_temp
    p = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
    d = g[:, None] * (onehot - p) * dz_dy
    d = tl.where(mask_n[:, None] & mask_v[None, :], d, 0.0)
    dc = d.to(h_ptr.dtype.element_ty)
    if UPCAST:
        dc = dc.to(tl.float32)
    return d, dc


@_jit
def _logprob_bwd_dh_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    b_ptr,  # (V,) bias (unused without HAS_BIAS)
    labels_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32 log-sum-exp of z from the forward
    g_ptr,  # (N,) fp32 incoming gradient, already 0 on ignored rows
    dh_ptr,  # (>= SPLIT_V, N, H) fp32 out; program (pid_n, pid_v) alone writes rows of plane pid_v
    N, V, H, stride_hn, stride_wv,
    logit_scale, softcap, inv_temp,
    SPLIT_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ONE_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # dH[rows] = sum over vocabulary blocks of dlogits @ W[vblock], in a fixed order, by one program
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    # 1. this split's vocabulary range; a block whose rows all have g == 0 gets an empty range
    per_split = tl.cdiv(tl.cdiv(V, SPLIT_V), BLOCK_V) * BLOCK_V
    v_start = pid_v * per_split
    v_end = tl.minimum(v_start + per_split, V)
    v_stop = tl.where(tl.max(tl.abs(g), axis=0) > 0.0, v_end, v_start)
    out = dh_ptr + pid_v.to(tl.int64) * N * H + offs_n[:, None] * H
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)  # 2a. ONE_H: the register accumulator
    if not ONE_H:
        # 2b. wider H: the program's own rows of the output are the fp32 accumulator, zeroed
        #     first, then read-modify-written per vocabulary block; no other program touches them
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tl.store(out + offs_h[None, :], acc, mask=mask_n[:, None] & (offs_h < H)[None, :])
    for v0 in range(v_start, v_stop, BLOCK_V):
        # 3. recompute the tile's dlogits, then add dlogits @ W[vblock] one H block at a time
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_end
        _, dc = _dlogits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, labels, lse,
                              g, H, stride_hn, stride_wv, logit_scale, softcap, inv_temp,
                              HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                              UPCAST)  # fmt: skip
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :],
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                w = w.to(tl.float32)
            if ONE_H:
                acc = tl.dot(dc, w, acc, input_precision=DOT_PRECISION)
            else:
                mask = mask_n[:, None] & mask_h[None, :]
                part = tl.load(out + offs_h[None, :], mask=mask, other=0.0)
                part = tl.dot(dc, w, part, input_precision=DOT_PRECISION)
                tl.store(out + offs_h[None, :], part, mask=mask)
    if ONE_H:  # 4. stored once
        offs_h = tl.arange(0, BLOCK_H)
        tl.store(out + offs_h[None, :], acc, mask=mask_n[:, None] & (offs_h < H)[None, :])


@_jit
def _logprob_bwd_dw_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    b_ptr,  # (V,) bias (unused without HAS_BIAS)
    labels_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32 log-sum-exp of z from the forward
    g_ptr,  # (N,) fp32 incoming gradient, already 0 on ignored rows
    dw_ptr,  # (V, H) fp32 out (unused without NEED_DW); program pid_v alone writes rows offs_v
    db_ptr,  # (V,) fp32 out (unused without NEED_DB)
    N, V, H, stride_hn, stride_wv,
    logit_scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, ONE_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # dW[vblock] = sum over row blocks of dlogits.T @ H[rows], in a fixed order, by one program
    pid_v = tl.program_id(0)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_temp = tl.cast(inv_temp, tl.float32)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    out = dw_ptr + offs_v[:, None] * H
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)  # 1a. ONE_H: the register accumulator
    if NEED_DW and not ONE_H:
        # 1b. wider H: the program's own rows of dW are the accumulator, zeroed first
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tl.store(out + offs_h[None, :], acc, mask=mask_v[:, None] & (offs_h < H)[None, :])
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
        # 2. row blocks whose g is all 0 (ignored labels) contribute nothing: skip the recompute
        if tl.max(tl.abs(g), axis=0) > 0.0:
            labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
            lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
            d, dc = _dlogits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, labels,
                                  lse, g, H, stride_hn, stride_wv, logit_scale, softcap,
                                  inv_temp, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H,
                                  DOT_PRECISION, UPCAST)  # fmt: skip
            if NEED_DB:
                db += tl.sum(d, axis=0)
            if NEED_DW:
                # 3. dW[vblock] += dc.T @ H[rows], one H block at a time
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    mask_h = offs_h < H
                    h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
                                mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
                    if UPCAST:
                        h = h.to(tl.float32)
                    if ONE_H:
                        acc = tl.dot(tl.trans(dc), h, acc, input_precision=DOT_PRECISION)
                    else:
                        mask = mask_v[:, None] & mask_h[None, :]
                        part = tl.load(out + offs_h[None, :], mask=mask, other=0.0)
                        part = tl.dot(tl.trans(dc), h, part, input_precision=DOT_PRECISION)
                        tl.store(out + offs_h[None, :], part, mask=mask)
    if NEED_DW and ONE_H:  # 4. stored once
        offs_h = tl.arange(0, BLOCK_H)
        tl.store(out + offs_h[None, :], acc, mask=mask_v[:, None] & (offs_h < H)[None, :])
    if NEED_DB:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


_AUTOTUNED: dict[str, object] = {}
_ONE_H = {"ONE_H": lambda args: args["H"] <= args["BLOCK_H"]}
# the vocabulary split is a function of the config's own BLOCK_N (sm90 runs 128-row blocks, the
# interpreter 16): evaluated per config, after the autotuner picked BLOCK_N
_SPLIT_FWD = {"SPLIT_V": lambda a: autotune.logprob_split_v(a["N"], a["V"], a["BLOCK_N"])}
_SPLIT_DH = {
    "SPLIT_V": lambda a: autotune.logprob_bwd_split_v(a["N"], a["V"], a["H"], a["BLOCK_N"])
}


def _kernel(name: str, fp32: bool = False):
    # Built on first use, so importing this module never touches the GPU. Every output element is
    # written by exactly one program, so autotuning needs no reset between benchmark runs. fp32
    # inputs get their own (smaller) tiles: an ieee tl.dot holds far more registers.
    key = f"{name}/fp32" if fp32 else name
    if key not in _AUTOTUNED:
        if name == "fwd":
            fn = triton.autotune(
                autotune.logprob_fwd_configs(fp32=fp32), key=["N", "V", "H", "HAS_STATS"]
            )(triton.heuristics(_SPLIT_FWD)(_logprob_fwd_kernel))
        elif name == "dh":
            fn = triton.autotune(autotune.logprob_bwd_dh_configs(fp32=fp32), key=["N", "V", "H"])(
                triton.heuristics({**_ONE_H, **_SPLIT_DH})(_logprob_bwd_dh_kernel)
            )
        else:
            fn = triton.autotune(
                autotune.logprob_bwd_dw_configs(fp32=fp32), key=["V", "H", "NEED_DW"]
            )(triton.heuristics(_ONE_H)(_logprob_bwd_dw_kernel))
        _AUTOTUNED[key] = fn
    return _AUTOTUNED[key]


def _splits_used(name: str, fp32: bool, split_fn) -> int:
    """Splits of the config the autotuner ran last (the launch just made)."""
    return split_fn(_kernel(name, fp32).best_config.kwargs["BLOCK_N"])


def check_triton(hidden: Tensor) -> None:
    if triton is None:
        raise RuntimeError("impl='triton' needs triton; use impl='chunked'")
    if hidden.device.type == "cpu" and not autotune.is_interpreter():
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import"
        )


def _scalars(p: LogprobParams) -> tuple[float, float, float]:
    return float(p.logit_scale), float(p.softcap or 1.0), 1.0 / float(p.temperature)


def _flags(p: LogprobParams, hidden: Tensor, bias: Tensor | None) -> dict:
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=p.softcap is not None,
        DOT_PRECISION=autotune.dot_precision(hidden.dtype),
        UPCAST=autotune.upcast_for_dot(hidden.dtype),
    )


def triton_fwd(hidden, weight, bias, labels, p: LogprobParams):
    N, H = hidden.shape
    V = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    configs = autotune.logprob_fwd_configs(fp32=fp32)
    max_split = autotune.logprob_max_split_v(N, V, configs)
    part = torch.empty((6, max_split, N), dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_V"])
    _kernel("fwd", fp32)[grid](
        hidden, weight, bias if bias is not None else part, labels, part,
        N, V, H, hidden.stride(0), weight.stride(0), max_split * N, *_scalars(p), p.ignore_index,
        HAS_STATS=p.return_stats, **_flags(p, hidden, bias),
    )  # fmt: skip
    part = part[:, : _splits_used("fwd", fp32, lambda bn: autotune.logprob_split_v(N, V, bn))]
    # combine the vocabulary splits exactly as the online update would
    m = part[0].amax(0)
    w = torch.exp(part[0] - m)  # (split, N); empty splits have max -inf and weigh 0
    s = (part[1] * w).sum(0)
    lse = m + torch.log(s)
    z_label = part[5].sum(0)
    stats = None
    if p.return_stats:
        xs = (part[2] * w).sum(0)
        before = part[4].amax(0)
        valid = labels != p.ignore_index
        top1 = valid & (z_label >= m) & (z_label > before)
        stats = (lse - xs / s, part[3].sum(0) / V, top1)
    return lse, z_label, stats


def triton_bwd(hidden, weight, bias, labels, lse, g, p: LogprobParams, needs):
    """Two contention-free kernels: dH over row blocks, dW / dbias over vocabulary blocks; each is
    launched only when its input needs a gradient (a frozen or LoRA head skips dW)."""
    N, H = hidden.shape
    V = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dummy = torch.empty(1, **f32)
    common = (hidden, weight, bias if bias is not None else dummy, labels, lse, g)
    sizes = (N, V, H, hidden.stride(0), weight.stride(0), *_scalars(p))
    dh = dw = db = None
    if needs[0]:
        # small N cannot fill the device with row blocks alone: split the vocabulary too and add
        # the fp32 partial planes afterwards, in a fixed order
        max_split = max(
            autotune.logprob_bwd_split_v(N, V, H, c.kwargs["BLOCK_N"])
            for c in autotune.logprob_bwd_dh_configs(fp32=fp32)
        )
        part = torch.empty((max_split, N, H), **f32)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_V"])
        _kernel("dh", fp32)[grid](*common, part, *sizes, **_flags(p, hidden, bias))
        split = _splits_used("dh", fp32, lambda bn: autotune.logprob_bwd_split_v(N, V, H, bn))
        dh = part[0] if split == 1 else part.sum(0)
    if needs[1] or needs[2]:
        dw = torch.empty((V, H), **f32) if needs[1] else dummy
        db = torch.empty((V,), **f32) if needs[2] else dummy
        grid = lambda meta: (triton.cdiv(V, meta["BLOCK_V"]),)
        _kernel("dw", fp32)[grid](
            *common, dw, db, *sizes, NEED_DW=needs[1], NEED_DB=needs[2], **_flags(p, hidden, bias)
        )  # fmt: skip
    return tuple(x if need else None for x, need in zip((dh, dw, db), needs, strict=True))
