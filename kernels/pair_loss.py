"""Fused chosen/rejected loss: per-token log-probs + sequence boundaries -> sums -> the loss.

With sequences 0..P-1 the chosen and P..2P-1 the rejected completions (csd_fast/batch.py), one
program per pair sums its two sequences, forms ρ_c = chosen_logps - ref_chosen_logps, ρ_r likewise,
and writes its share of the loss and dloss/d(sequence sum). Because a sequence sum is linear in its
tokens, dloss/d token_logps[n] = dloss/d sum[seq(n)]: the backward only broadcasts. Replaces

    sums = segment_sum(token_logps, seq_offsets)                        # (2P,)
    chosen_logps, rejected_logps = sums[:P], sums[P:]
    loss = csd_fast.losses.preference_loss(LossParams(loss_type), PairLogps(...))

for one loss type among SUPPORTED (TRL 1.16 definitions, βΔ = β(ρ_c - ρ_r), |c| the token count):
sigmoid -log σ(βΔ) (TRL 1.16's sigmoid ignores label_smoothing; robust uses it);
hinge relu(1 - βΔ); ipo (ρ_c/|c| - ρ_r/|r| - 1/(2β))²; robust
(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε); sigmoid_norm -log σ(β(ρ_c/|c| - ρ_r/|r|));
sft -Σ chosen_logps[sft_mask] / Σ |c|[sft_mask]; clo λ·sft + (1-λ)·(P/G)·mean_pairs(sigmoid)
with G the CLO examples (distinct group_ids), as csd_fast.losses._clo. Others raise ValueError:
the engine then falls back to csd_fast.losses. chosen_logps / rejected_logps come back detached.

The module stands alone on torch and triton: `pair_loss_torch` is the pure-torch implementation
(the CPU path and the tests' fp32 peer), `pair_terms` the per-pair loss it shares with the fused
head (kernels/linear_pair_loss.py), `segment_sum` the deterministic segment reduction the engine
imports. Every batch-wide normaliser (1/P, the NLL's token count, CLO's G) is computed on the
device, so nothing here waits for the host.

Tests: python -m pytest tests/kernels/test_pair_loss.py -q   (TRITON_INTERPRET=1 on CPU)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autotune

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path needs no triton
    triton = None
    tl = None

SUPPORTED = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "sft", "clo")
# kernel codes of the pairwise term; sft has none, clo uses sigmoid
_CODES = {"sft": 0, "sigmoid": 1, "clo": 1, "hinge": 2, "ipo": 3, "robust": 4, "sigmoid_norm": 5}
IMPLS = ("auto", "triton", "torch")


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _log_sigmoid(x):
    # log σ(x) = min(x, 0) - log(1 + exp(-|x|)): no overflow for large |x|
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@_jit
def _segment_sum(x_ptr, start, end, BLOCK_T: tl.constexpr):
    acc = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(x_ptr + offs, mask=offs < end, other=0.0)
    return tl.sum(acc, axis=0)


@_jit
def _pair_loss_fwd_kernel(
    logps_ptr,  # (N,) fp32 per-token log-probs, ordered by sequence
    offsets_ptr,  # (2P+1,) int64 sequence boundaries
    ref_c_ptr,  # (P,) fp32 ref_chosen_logps
    ref_r_ptr,  # (P,) fp32 ref_rejected_logps
    sft_ptr,  # (P,) fp32 1.0 where the pair's chosen feeds the NLL term
    sft_den_ptr,  # () fp32 tokens of those chosen sequences, clamped to >= 1
    coef_ptr,  # (2,) fp32 pair_coef (1/P, or CLO's (1 - λ)/G), sft_coef (the NLL's weight)
    chosen_ptr,  # (P,) fp32 out: chosen_logps
    rejected_ptr,  # (P,) fp32 out: rejected_logps
    loss_ptr,  # (P,) fp32 out: this pair's share of the loss (they sum to the loss)
    dseq_ptr,  # (2P,) fp32 out: dloss / d sequence sum
    P, beta, label_smoothing,
    LOSS: tl.constexpr, HAS_SFT: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    beta = tl.cast(beta, tl.float32)
    eps = tl.cast(label_smoothing, tl.float32)
    pair_coef = tl.load(coef_ptr)  # read on the device: G (distinct groups) is a device count
    sft_coef = tl.load(coef_ptr + 1)
    # 1. the pair's two sequence sums
    c0 = tl.load(offsets_ptr + i)
    c1 = tl.load(offsets_ptr + i + 1)
    r0 = tl.load(offsets_ptr + P + i)
    r1 = tl.load(offsets_ptr + P + i + 1)
    chosen = _segment_sum(logps_ptr, c0, c1, BLOCK_T)
    rejected = _segment_sum(logps_ptr, r0, r1, BLOCK_T)
    tl.store(chosen_ptr + i, chosen)
    tl.store(rejected_ptr + i, rejected)
    rho_c = chosen - tl.load(ref_c_ptr + i)
    rho_r = rejected - tl.load(ref_r_ptr + i)
    len_c = tl.maximum((c1 - c0).to(tl.float32), 1.0)
    len_r = tl.maximum((r1 - r0).to(tl.float32), 1.0)
    # 2. the pairwise term ℓ(x) and its slopes d ℓ / d ρ_c, d ℓ / d ρ_r
    loss = 0.0
    d_c = 0.0
    d_r = 0.0
    if LOSS == 1 or LOSS == 2 or LOSS == 4:
        x = beta * (rho_c - rho_r)
        if LOSS == 1:  # sigmoid: -log σ(x), slope -σ(-x)
            loss = -_log_sigmoid(x)
            slope = -tl.sigmoid(-x)
        elif LOSS == 2:  # hinge: relu(1 - x), slope -1 where 1 - x > 0 (torch's relu grad)
            loss = tl.maximum(1.0 - x, 0.0)
            slope = tl.where(1.0 - x > 0.0, -1.0, 0.0)
        else:  # robust: d/dx log σ(-x) = -σ(x)
            loss = (-(1.0 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1.0 - 2.0 * eps)
            slope = (-(1.0 - eps) * tl.sigmoid(-x) - eps * tl.sigmoid(x)) / (1.0 - 2.0 * eps)
        d_c = slope * beta
        d_r = -slope * beta
    elif LOSS == 3:  # ipo: (u - 1/(2β))², u = ρ_c/|c| - ρ_r/|r|
        diff = rho_c / len_c - rho_r / len_r - 0.5 / beta
        loss = diff * diff
        d_c = 2.0 * diff / len_c
        d_r = -2.0 * diff / len_r
    elif LOSS == 5:  # sigmoid_norm: -log σ(βu)
        x = beta * (rho_c / len_c - rho_r / len_r)
        loss = -_log_sigmoid(x)
        slope = -tl.sigmoid(-x)
        d_c = slope * beta / len_c
        d_r = -slope * beta / len_r
    loss = loss * pair_coef
    d_c = d_c * pair_coef
    d_r = d_r * pair_coef
    # 3. the NLL term: -Σ_masked chosen / Σ_masked |c|, this pair's share
    if HAS_SFT:
        w = tl.load(sft_ptr + i) * sft_coef / tl.load(sft_den_ptr)
        loss = loss - w * chosen
        d_c = d_c - w
    tl.store(loss_ptr + i, loss)
    tl.store(dseq_ptr + i, d_c)
    tl.store(dseq_ptr + P + i, d_r)


@_jit
def _pair_loss_bwd_kernel(
    dlogps_ptr,  # (N,) fp32 out: dloss / d token_logps
    offsets_ptr,  # (2P+1,) int64
    dseq_ptr,  # (2P,) fp32 dloss / d sequence sum from the forward
    grad_ptr,  # () fp32 incoming gradient of the loss
    BLOCK_T: tl.constexpr,
):
    s = tl.program_id(0)
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    g = tl.load(dseq_ptr + s) * tl.load(grad_ptr)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        tl.store(dlogps_ptr + offs, tl.zeros((BLOCK_T,), tl.float32) + g, mask=offs < end)


def segment_sum(values: Tensor, seq_offsets: Tensor) -> Tensor:
    """Sum `values` (N,) over the segments `seq_offsets` (S+1,) -> (S,), differentiable.

    One sequential sum per segment (torch.segment_reduce): no index_add atomics, so the bits do
    not depend on thread scheduling on a GPU, no host sync (no repeat_interleave to size), and no
    cumsum differences (a long fp32 cumsum loses the low bits of short segments)."""
    return torch.segment_reduce(values, "sum", offsets=seq_offsets, unsafe=True)


def count_distinct(ids: Tensor) -> Tensor:
    """Number of distinct values of `ids` (P,) as a 0-d tensor on its device (no host sync)."""
    if ids.numel() == 0:
        return torch.zeros((), dtype=torch.long, device=ids.device)
    ordered = ids.sort().values
    return 1 + (ordered[1:] != ordered[:-1]).sum()


def loss_coefs(loss_type: str, P: int, clo_lambda: float, group_ids: Tensor | None, device):
    """(2,) fp32 on `device`: the pairwise term's weight per pair and the NLL term's weight.

    Filled on the device (torch.full), not copied from host data: a blocking copy syncs a GPU."""
    const = lambda v: torch.full((), v, dtype=torch.float32, device=device)
    if loss_type == "sft":
        return torch.stack([const(0.0), const(1.0)])
    if loss_type == "clo":
        groups = const(float(P))
        if group_ids is not None:
            groups = count_distinct(group_ids.to(device)).float()
        return torch.stack([(1.0 - clo_lambda) / groups.clamp(min=1.0), const(clo_lambda)])
    return torch.stack([const(1.0 / P), const(0.0)])


def has_nll_term(loss_type: str, clo_lambda: float) -> bool:
    """sft always; clo unless λ = 0 (then no sft_mask is needed, as in csd_fast.losses)."""
    return loss_type == "sft" or (loss_type == "clo" and clo_lambda != 0.0)


def sft_inputs(seq_offsets: Tensor, sft_mask: Tensor | None, P: int) -> tuple[Tensor, Tensor]:
    """(mask (P,) fp32, token count of the masked chosen sequences clamped to >= 1)."""
    lengths = (seq_offsets[1 : P + 1] - seq_offsets[:P]).float()
    mask = torch.ones(P, device=seq_offsets.device) if sft_mask is None else sft_mask.float()
    return mask.contiguous(), (lengths * mask).sum().clamp(min=1.0)


def pair_terms(
    chosen: Tensor,
    rejected: Tensor,
    ref_c: Tensor,
    ref_r: Tensor,
    len_c: Tensor,
    len_r: Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    coefs: Tensor,
    sft: Tensor,
    sft_den: Tensor,
    has_sft: bool,
) -> Tensor:
    """Each pair's share of the loss (P,), in torch; summed over any partition of the pairs it
    gives the batch loss, because every normaliser arrives precomputed (coefs, sft_den)."""
    import torch.nn.functional as F

    pair_coef, sft_coef = coefs[0].to(chosen.dtype), coefs[1].to(chosen.dtype)
    rho_c, rho_r = chosen - ref_c, rejected - ref_r
    len_c, len_r = len_c.clamp(min=1).to(chosen.dtype), len_r.clamp(min=1).to(chosen.dtype)
    x = beta * (rho_c - rho_r)
    eps = label_smoothing
    if loss_type in ("sigmoid", "clo"):
        term = -F.logsigmoid(x)
    elif loss_type == "hinge":
        term = torch.relu(1 - x)
    elif loss_type == "ipo":
        term = (rho_c / len_c - rho_r / len_r - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        term = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    elif loss_type == "sigmoid_norm":
        term = -F.logsigmoid(beta * (rho_c / len_c - rho_r / len_r))
    else:  # sft: no pairwise term
        term = torch.zeros_like(chosen)
    out = term * pair_coef
    if has_sft:
        out = out - sft_coef * sft.to(chosen.dtype) * chosen / sft_den.to(chosen.dtype)
    return out


class PairLossFunction(torch.autograd.Function):
    """(token_logps, seq_offsets, ref_c, ref_r, sft_mask, params) -> (loss, chosen, rejected)."""

    @staticmethod
    def forward(ctx, token_logps, seq_offsets, ref_c, ref_r, sft_mask, params):
        loss_type, beta, label_smoothing, clo_lambda, group_ids = params
        P = ref_c.numel()
        dev = token_logps.device
        coefs = loss_coefs(loss_type, P, clo_lambda, group_ids, dev)
        sft, sft_den = sft_inputs(seq_offsets, sft_mask, P)
        chosen, rejected, parts = (torch.empty(P, device=dev) for _ in range(3))
        dseq = torch.empty(2 * P, device=dev)
        eps = float(label_smoothing) if loss_type == "robust" else 0.0
        has_sft = has_nll_term(loss_type, clo_lambda)
        _pair_loss_fwd_kernel[(P,)](
            token_logps, seq_offsets, ref_c, ref_r, sft, sft_den, coefs, chosen, rejected, parts,
            dseq, P, float(beta), eps,
            LOSS=_CODES[loss_type], HAS_SFT=has_sft, BLOCK_T=autotune.pair_loss_block(),
        )  # fmt: skip
        ctx.save_for_backward(seq_offsets, dseq)
        ctx.num_tokens = token_logps.numel()
        ctx.mark_non_differentiable(chosen, rejected)
        return parts.sum(), chosen, rejected

    @staticmethod
    def backward(ctx, grad_loss, *_):
        seq_offsets, dseq = ctx.saved_tensors
        dlogps = torch.zeros(ctx.num_tokens, dtype=torch.float32, device=dseq.device)
        grad = grad_loss.float().reshape(()).contiguous()
        block = autotune.pair_loss_block()
        _pair_loss_bwd_kernel[(dseq.numel(),)](dlogps, seq_offsets, dseq, grad, BLOCK_T=block)
        return dlogps, None, None, None, None, None


def pair_loss_torch(
    token_logps: Tensor,
    seq_offsets: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    sft_mask: Tensor | None = None,
    clo_lambda: float = 0.5,
    group_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The pure-torch path (CPU, and the peer of the kernel's tests): segment sums, then
    `pair_terms` summed; in the dtype of token_logps (fp64 in, fp64 out)."""
    P = ref_chosen_logps.numel()
    sums = segment_sum(token_logps, seq_offsets)  # (2P,)
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    coefs = loss_coefs(loss_type, P, clo_lambda, group_ids, token_logps.device)
    sft, sft_den = sft_inputs(seq_offsets, sft_mask, P)
    parts = pair_terms(
        sums[:P], sums[P:], ref_chosen_logps.to(sums.dtype), ref_rejected_logps.to(sums.dtype),
        lengths[:P], lengths[P:], loss_type, beta, label_smoothing, coefs, sft, sft_den,
        has_nll_term(loss_type, clo_lambda),
    )  # fmt: skip
    return parts.sum(), sums[:P].detach(), sums[P:].detach()


def fused_pair_loss(
    token_logps: Tensor,
    seq_offsets: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    sft_mask: Tensor | None = None,
    clo_lambda: float = 0.5,
    group_ids: Tensor | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss scalar fp32, chosen_logps (P,), rejected_logps (P,)) from per-token log-probs (N,).

    Differentiable in token_logps only (the reference log-probs are constants). `group_ids`
    (P,) names each pair's CLO example (None: every pair is its own example), as in PairBatch.
    """
    if loss_type not in SUPPORTED:
        raise ValueError(
            f"fused_pair_loss supports loss_type in {SUPPORTED}, got {loss_type!r}; "
            "use csd_fast.losses.preference_loss for the others"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    P = ref_chosen_logps.numel()
    if token_logps.dim() != 1 or seq_offsets.shape != (2 * P + 1,):
        raise ValueError(
            f"need token_logps (N,) and seq_offsets (2P+1,) = ({2 * P + 1},), got "
            f"{tuple(token_logps.shape)} and {tuple(seq_offsets.shape)}"
        )
    if ref_rejected_logps.shape != (P,) or (sft_mask is not None and sft_mask.shape != (P,)):
        raise ValueError(f"ref_rejected_logps and sft_mask must be ({P},)")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
    kw = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    kw.update(sft_mask=sft_mask, clo_lambda=clo_lambda, group_ids=group_ids)
    if impl == "auto":
        impl = "triton" if triton is not None and token_logps.device.type == "cuda" else "torch"
    if impl == "torch":
        return pair_loss_torch(token_logps, seq_offsets, ref_chosen_logps, ref_rejected_logps, **kw)
    if triton is None or (token_logps.device.type == "cpu" and not autotune.is_interpreter()):
        raise RuntimeError("impl='triton' needs triton and a GPU, or TRITON_INTERPRET=1 on CPU")
    f32 = lambda t: t.float().contiguous()
    params = (loss_type, beta, label_smoothing, clo_lambda, group_ids)
    return PairLossFunction.apply(
        f32(token_logps), seq_offsets.long().contiguous(), f32(ref_chosen_logps),
        f32(ref_rejected_logps), sft_mask, params,
    )  # fmt: skip
