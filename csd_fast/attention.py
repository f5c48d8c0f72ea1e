"""The `csd_packed` attention function: any AttentionInterface model runs the packed layouts.

    from csd_fast.attention import enable_packed_attention
    enable_packed_attention(model)                 # once, after loading (policy and reference)
    hidden = model.model(**batch.model_kwargs)     # batch from csd_fast.packing.collate_packed

Registered with transformers' `AttentionInterface` as "csd_packed", so Llama, Qwen2/3, Mistral,
Gemma 1/2/3 and Cohere run packed with none of their code copied. The model's own mask builder
is bypassed: a `csd_packed` mask function returns None whenever no 2D padding mask is given, and the
layout reaches every attention layer through the forward's `**kwargs` (transformers 5 passes them
down), as the keys `csd_fast.packing` writes into `model_kwargs`:

* `csd_segment_ids` (R, T) long, -1 on padding; `csd_branch_ids` (R, T) int8 (prompt 0, chosen 1,
  rejected 2); `position_ids` (R, T): the dense path builds the block mask from them
  (same segment, causal in the row, rejected never sees chosen, and the sliding window measured
  in positions, which are the padded sequence's own positions in both layouts);
* `cu_seqlens_q`, `cu_seqlens_k` (int32), `max_seqlen_q`, `max_seqlen_k` (int), `csd_kv_index`
  (prefix sharing only): flash-attn's varlen kernel, used on CUDA/ROCm in fp16/bf16 when installed.

The prefix-shared layout in varlen form: queries [prompt, chosen] attend keys [prompt, chosen]; the
queries [rejected] attend the gathered keys [prompt, rejected] with flash's bottom-right causal
alignment (rejected j sees keys up to p + j), so the sliding window (left = W - 1) stays exact in
positions. This replaces the prefix + suffix attention merged by log-sum-exp: flash-attn's backward
ignores the gradient of its returned LSE, so that merge would need a custom backward, while the
key gather is one differentiable index_select per layer.

Without flash-attn (ROCm builds without it, fp32, CPU) the packed layouts run FlexAttention
(`torch.nn.attention.flex_attention`) with a `BlockMask` built from the same ids, so fully masked
(query block, key block) tiles are skipped and no T x T mask or score matrix is materialised:

    mask_mod(b, h, q, k) = segment[b, q] == segment[b, k]          document mask (packed pairs)
                         & q >= k                                    causal in the row
                         & !(branch[b, q] == 2 & branch[b, k] == 1)  rejected never sees chosen
                         & pos[b, q] - pos[b, k] < W                 sliding window, in positions
    score_mod(s)         = softcap * tanh(s / softcap)               Gemma 2's attention softcap

Flex runs compiled on CUDA / ROCm; on CPU it is opt-in (CSD_FAST_FLEX=1: compiled by inductor,
~30 s per new shape; CSD_FAST_FLEX=eager: uncompiled, for tests), because each new row length
recompiles, and forward-only (no-grad passes such as the reference model's): torch 2.13 has no
FlexAttention backward on CPU. Otherwise the dense path builds a (R, 1, T, T) bool mask (no wider
transients) and warns, naming why it runs. Without packing metadata (a padded batch through a
switched model) the function is ordinary attention with transformers' padding mask. Softcap
(Gemma 2) is applied on every path; attention sinks (gpt-oss) and other variants are refused by
`packed_attention_supported`. `deterministic=True` (set by `--full_determinism`) makes
flash-attn's backward deterministic; the dense and flex paths have no atomics in their forward.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_NAME = "csd_packed"
PACKING_KEYS = (
    "csd_segment_ids",
    "csd_branch_ids",
    "csd_kv_index",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
)
# checked by tests/test_attention.py (packed == padded, fwd and grads); the attention call of each
# passes only (scaling, dropout, sliding_window, softcap) on top of q, k, v
SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere"}
)

_varlen_fn = None  # flash_attn_varlen_func once imported; tests swap in `varlen_attention_ref`
_flex_fns: dict[str, object] = {}  # "compiled" / "eager" -> flex_attention callable
DETERMINISTIC = False  # --full_determinism: flash-attn's deterministic backward


def set_deterministic(on: bool) -> None:
    """Deterministic attention kernels (flash-attn `deterministic=True`) for this process."""
    global DETERMINISTIC
    DETERMINISTIC = bool(on)


def _flash_varlen():
    global _varlen_fn
    if _varlen_fn is None:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            _varlen_fn = False
        else:
            _varlen_fn = flash_attn_varlen_func
    return _varlen_fn or None


def _use_flash(query: Tensor, kwargs: dict) -> bool:
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and "cu_seqlens_q" in kwargs
        and _flash_varlen() is not None
    )


def flex_mode(device: torch.device, needs_grad: bool = False) -> tuple[str | None, str]:
    """("compiled" | "eager" | None, why not) for FlexAttention on `device`."""
    choice = os.environ.get("CSD_FAST_FLEX", "auto").lower()
    if choice in ("0", "off", "false"):
        return None, "CSD_FAST_FLEX=0"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return None, f"torch {torch.__version__} has no flex_attention"
    if device.type == "cpu" and needs_grad:  # torch raises NotImplementedError (2.13)
        return None, f"torch {torch.__version__} FlexAttention has no backward on CPU"
    if choice == "eager":
        return "eager", ""
    if device.type == "cuda" or choice in ("1", "on", "true", "compiled"):
        return "compiled", ""
    return None, "on CPU FlexAttention is opt-in (CSD_FAST_FLEX=1 compiles it per row length)"


def _flex_fn(mode: str):
    if mode not in _flex_fns:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_fns[mode] = torch.compile(flex_attention) if mode == "compiled" else flex_attention
    return _flex_fns[mode]


def flex_block_mask(
    segment_ids: Tensor,
    branch_ids: Tensor,
    position_ids: Tensor | None,
    sliding_window: int | None = None,
):
    """The packed layouts' BlockMask (see the module docstring), cached per forward."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", sliding_window)
    cache = getattr(segment_ids, "_csd_masks", None)
    if cache is not None and key in cache:
        return cache[key]
    if sliding_window is not None and position_ids is None:
        raise ValueError("packed attention with a sliding window needs position_ids")
    R, T = segment_ids.shape
    seg, branch = segment_ids, branch_ids
    pos = position_ids.expand_as(segment_ids) if position_ids is not None else None

    def mask_mod(b, h, q, k):
        allowed = (seg[b, q] == seg[b, k]) & (q >= k)
        allowed = allowed & ~((branch[b, q] == 2) & (branch[b, k] == 1))
        if sliding_window is not None:
            allowed = allowed & (pos[b, q] - pos[b, k] < sliding_window)
        return allowed

    compiled = segment_ids.device.type == "cuda"  # the vmap'd builder is slow for long rows
    mask = create_block_mask(mask_mod, R, None, T, T, device=segment_ids.device, _compile=compiled)
    if cache is None:
        cache = {}
        segment_ids._csd_masks = cache
    cache[key] = mask
    return mask


def _flex_attention(q, k, v, block_mask, scaling, softcap, mode) -> Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D) through flex_attention."""
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, k_idx):
            return softcap * torch.tanh(score / softcap)

    out = _flex_fn(mode)(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous()


def packed_mask(
    segment_ids: Tensor,
    branch_ids: Tensor,
    position_ids: Tensor | None,
    sliding_window: int | None = None,
) -> Tensor:
    """(R, 1, T, T) bool, True = attend: same segment, causal, rejected never sees chosen."""
    cache = getattr(segment_ids, "_csd_masks", None)  # one mask per forward, shared by layers
    if cache is not None and sliding_window in cache:
        return cache[sliding_window]
    T = segment_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed &= ~((branch_ids[:, :, None] == 2) & (branch_ids[:, None, :] == 1))
    if sliding_window is not None:
        if position_ids is None:
            raise ValueError("packed attention with a sliding window needs position_ids")
        pos = position_ids.expand_as(segment_ids)
        # pos_q - pos_k < W  <=>  pos_k > pos_q - W: the subtraction stays (R, T, 1), so the only
        # T x T tensor is the bool result (an int64 difference would be 8x the mask)
        allowed &= pos[:, None, :] > (pos - sliding_window)[:, :, None]
    allowed = allowed[:, None]
    if cache is None:
        cache = {}
        segment_ids._csd_masks = cache
    cache[sliding_window] = allowed
    return allowed


def _dense_attention(q, k, v, allowed, scaling, dropout, softcap) -> Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S, D), mask bool (B, 1, T, S) or additive -> (B, T, H, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # head h reads kv head h // n_rep, as transformers' repeat_kv
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling
        )
    else:  # SDPA has no softcap: scores, tanh cap, mask, softmax in fp32
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        if allowed.dtype == torch.bool:
            # finfo.min, not -inf: a padding row with no key left gives a finite (unused) output
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        else:
            scores = scores + allowed
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous()


def _varlen_attention(q, k, v, kw, scaling, dropout, sliding_window, softcap, fn) -> Tensor:
    B, H, T, D = q.shape
    q = q.transpose(1, 2).reshape(B * T, H, D)
    k = k.transpose(1, 2).reshape(B * T, k.shape[1], D)
    v = v.transpose(1, 2).reshape(B * T, v.shape[1], D)
    kv_index = kw.get("csd_kv_index")
    if kv_index is not None:  # prefix sharing: rejected queries read the prompt's keys again
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    out = fn(
        q,
        k,
        v,
        kw["cu_seqlens_q"],
        kw["cu_seqlens_k"],
        kw["max_seqlen_q"],
        kw["max_seqlen_k"],
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
        softcap=0.0 if softcap is None else softcap,
        **({"deterministic": True} if DETERMINISTIC else {}),
    )
    return out.view(B, T, H, D)


def packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention signature: q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D)."""
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("csd_packed attention does not implement attention sinks")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    segment_ids = kwargs.get("csd_segment_ids")
    if segment_ids is None:  # no packing: ordinary (padded) batch, transformers built the mask
        if attention_mask is None:
            T = query.shape[2]
            pos = torch.arange(T, device=query.device)[None]
            same = torch.zeros(1, T, dtype=torch.long, device=query.device)
            attention_mask = packed_mask(same, same, pos, sliding_window)
        return _dense_attention(query, key, value, attention_mask, scaling, dropout, softcap), None
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("csd_packed attention runs full sequences only (no KV cache)")
    if _use_flash(query, kwargs):
        out = _varlen_attention(
            query, key, value, kwargs, scaling, dropout, sliding_window, softcap, _flash_varlen()
        )
        return out, None
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    mode, why = flex_mode(query.device, needs_grad)
    if mode is not None and not dropout:
        block_mask = flex_block_mask(
            segment_ids, kwargs["csd_branch_ids"], kwargs.get("position_ids"), sliding_window
        )
        return _flex_attention(query, key, value, block_mask, scaling, softcap, mode), None
    _warn_dense(query, why if not dropout else "attention dropout (flex has none)")
    allowed = packed_mask(
        segment_ids, kwargs["csd_branch_ids"], kwargs.get("position_ids"), sliding_window
    )
    return _dense_attention(query, key, value, allowed, scaling, dropout, softcap), None


def _warn_dense(query: Tensor, why: str) -> None:
    """Every dense-fallback call warns (Python shows each distinct message once per place)."""
    flash = "flash-attn not installed" if _flash_varlen() is None else (
        "flash-attn needs CUDA fp16/bf16 inputs" if not (query.is_cuda and query.dtype in
        (torch.float16, torch.bfloat16)) else "no varlen metadata in the batch")  # fmt: skip
    warnings.warn(
        f"csd_packed attention: dense (R, 1, T, T) mask fallback for T={query.shape[2]} "
        f"({flash}; {why}): O(T^2) memory and work, no block skipping",
        RuntimeWarning,
        stacklevel=3,
    )


def _padding_mask(*args, attention_mask: Tensor | None = None, **kwargs):
    """Mask builder for "csd_packed": None for packed batches, transformers' SDPA mask otherwise."""
    if attention_mask is None:
        return None  # packed: the attention function builds its own mask from the segment ids
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # a None return would hide the sliding window
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


_registered = False


def register() -> None:
    """Register "csd_packed" with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
    _registered = True


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_attention_supported(model: nn.Module) -> tuple[bool, str]:
    """(True, "") when the packed layouts give this model's exact numbers, else (False, why)."""
    base = _base(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", type(base).__name__)
    if config is None or not hasattr(base, "set_attn_implementation"):
        return False, f"{model_type}: not a transformers PreTrainedModel"
    if model_type not in SUPPORTED_MODEL_TYPES:
        return False, (
            f"model type {model_type!r} is not verified with packed attention "
            f"(verified: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); use the padded layout"
        )
    if getattr(config, "attention_chunk_size", None) or getattr(
        config, "use_bidirectional_attention", False
    ):
        return False, f"model type {model_type!r}: chunked/bidirectional attention is not packable"
    can_set = getattr(base, "_can_set_attn_implementation", lambda: True)
    if not can_set():
        return False, f"model type {model_type!r} does not dispatch through AttentionInterface"
    return True, ""


def enable_packed_attention(model: nn.Module) -> nn.Module:
    """Switch a model (or a PEFT wrapper of one) to "csd_packed"; raises for unsupported models."""
    ok, why = packed_attention_supported(model)
    if not ok:
        raise ValueError(f"padding_free / prefix_sharing unavailable: {why}")
    register()
    _base(model).set_attn_implementation(ATTN_NAME)
    return model


def varlen_attention_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
    softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
) -> Tensor:  # fmt: skip
    """Pure-torch `flash_attn_varlen_func` (bottom-right causal, left window, softcap); no dropout.

    q (Nq, H, D), k/v (Nk, Hkv, D) -> (Nq, H, D). For tests of the varlen metadata on CPU.
    """
    if dropout_p:
        raise ValueError("varlen_attention_ref has no dropout")
    out = torch.empty_like(q)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    for s in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        k0, k1 = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        qs, ks, vs = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)  # bottom-right alignment
        j = torch.arange(k1 - k0)[None]
        allowed = j <= i if causal else torch.ones_like(j <= i)
        if window_size[0] >= 0:
            allowed = allowed & (i - j <= window_size[0])
        out[q0:q1] = _dense_attention(
            qs[None], ks[None], vs[None], allowed[None, None], scale, 0.0, softcap or None
        )[0]
    return out
