"""The forward of a preference micro-batch: backbone -> scored positions -> head -> sums.

    hidden = backbone(**batch.model_kwargs)              # (R, T, H), any layout
    h = hidden.flatten(0, 1)[batch.token_index]          # (N, H), completion positions only
    token_logps = head(h, batch.token_labels)            # (N,)  eager logits or the fused kernel
    seq_logps = segment_sum(token_logps, seq_offsets)    # (2P,) [chosen..., rejected...]

Prompt and padding positions never reach the LM head, which is where DPO spends its memory.
The same function serves the policy (with grad) and the reference (no grad, no saved state), so
the two can never disagree on layout, truncation or the head's transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csd_fast.batch import PairBatch, segment_sum


@dataclass(frozen=True)
class HeadSpec:
    """How a model turns hidden states into logits: weight, bias and the scalar transforms."""

    weight: Tensor  # (V, H)
    bias: Tensor | None
    logit_scale: float = 1.0  # Cohere (Tiny Aya) multiplies logits by config.logit_scale
    softcap: float | None = None  # Gemma 2/3 final_logit_softcapping


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT or DDP/compile wrapper."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def head_spec(model: nn.Module) -> HeadSpec:
    """Read the output head and its transforms from a HF causal LM's config."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings: not a causal LM")
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling  # Granite divides its logits
    return HeadSpec(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        logit_scale=1.0 if scale is None else float(scale),
        softcap=getattr(config, "final_logit_softcapping", None) or None,
    )


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns last_hidden_state (LoRA layers stay injected in it)."""
    lm = unwrap_causal_lm(model)
    return getattr(lm, lm.base_model_prefix, None) or lm.base_model


@dataclass
class ForwardOutput:
    """Per-token and per-sequence results of one micro-batch forward."""

    token_logps: Tensor  # (N,) fp32
    chosen_logps: Tensor  # (P,) LD-weighted when ld_alpha is set
    rejected_logps: Tensor  # (P,)
    plain_chosen_logps: Tensor | None = None  # (P,) unweighted, only when ld_alpha is set
    entropy: Tensor | None = None  # (N,) no grad
    mean_logit: Tensor | None = None  # (N,)
    is_top1: Tensor | None = None  # (N,) bool


def head_impl_for(fused: bool) -> str:
    """`--fused` picks the kernel (Triton on GPU, chunked torch on CPU); otherwise full logits."""
    return "auto" if fused else "eager"


def scored_hidden(model: nn.Module, batch: PairBatch) -> Tensor:
    """(N, H) hidden states of the positions that predict the scored tokens."""
    out = backbone(model)(**dict(batch.model_kwargs), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden.flatten(0, 1).index_select(0, batch.token_index)  # (N, H)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # the residual stream leaves the final norm in fp32; the head runs in the autocast dtype,
        # as an eager lm_head under autocast would (the kernels then read bf16 tiles)
        hidden = hidden.to(torch.get_autocast_dtype(dev))
    return hidden


def token_logps_and_stats(
    model: nn.Module,
    batch: PairBatch,
    *,
    head_impl: str = "eager",
    with_stats: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Run the backbone over the batch rows and score the completion tokens through the head."""
    from csd_fast.kernels.logprob import fused_linear_logprob, linear_logprob_inference

    hidden = scored_hidden(model, batch)
    spec = head_spec(model)
    # reference passes (no grad) take the forward-only kernel: no autograd state is kept
    head = fused_linear_logprob if torch.is_grad_enabled() else linear_logprob_inference
    result = head(
        hidden,
        spec.weight,
        batch.token_labels,
        bias=spec.bias,
        logit_scale=spec.logit_scale,
        softcap=spec.softcap,
        temperature=temperature,
        return_stats=with_stats,
        impl=head_impl,
    )
    if with_stats:
        logps, stats = result
        return logps, (stats.entropy, stats.mean_logit, stats.is_top1)
    return result, None


def length_weights(batch: PairBatch, ld_alpha: float | None) -> Tensor | None:
    """LD-DPO (ld_alpha): tokens past the shorter completion of a pair count ld_alpha times.

    TRL: the first min(|c|, |r|) completion tokens of both sequences are 'shared' (weight 1),
    the tail of the longer one gets weight ld_alpha. Returns (N,) weights or None.
    """
    if ld_alpha is None:
        return None
    lengths = batch.sequence_lengths()  # (2P,)
    P = lengths.numel() // 2
    shared = torch.minimum(lengths[:P], lengths[P:]).repeat(2)  # (2P,)
    seq = batch.sequence_ids()
    start = batch.seq_offsets[:-1].index_select(0, seq)
    pos_in_seq = torch.arange(seq.numel(), device=seq.device) - start
    tail = pos_in_seq >= shared.index_select(0, seq)
    return torch.where(tail, ld_alpha, 1.0).float()


def sequence_forward(
    model: nn.Module,
    batch: PairBatch,
    *,
    head_impl: str = "eager",
    with_stats: bool = True,
    ld_alpha: float | None = None,
    temperature: float = 1.0,
) -> ForwardOutput:
    """Per-sequence summed completion log-probs (chosen and rejected) for one micro-batch."""
    token_logps, stats = token_logps_and_stats(
        model, batch, head_impl=head_impl, with_stats=with_stats, temperature=temperature
    )
    weights = length_weights(batch, ld_alpha)
    summed = token_logps if weights is None else token_logps * weights
    seq_logps = segment_sum(summed, batch.seq_offsets)  # (2P,)
    P = batch.num_pairs
    out = ForwardOutput(token_logps, seq_logps[:P], seq_logps[P:])
    if weights is not None:
        chosen_end = batch.seq_offsets[P]  # chosen tokens come first
        out.plain_chosen_logps = segment_sum(token_logps[:chosen_end], batch.seq_offsets[: P + 1])
    if stats is not None:
        out.entropy, out.mean_logit, out.is_top1 = stats
    return out


def fused_sequence_loss(
    model: nn.Module,
    batch: PairBatch,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    clo_lambda: float = 0.5,
    with_stats: bool = True,
) -> tuple[Tensor, ForwardOutput]:
    """The pair loss with the head's gradients computed in its forward (3 GEMMs instead of 4-5:
    csd_fast.kernels.linear_pair_loss); `loss_type` among csd_fast.kernels.PAIR_LOSS_TYPES."""
    from csd_fast.kernels.linear_pair_loss import fused_linear_pair_loss

    hidden = scored_hidden(model, batch)
    spec = head_spec(model)
    out = fused_linear_pair_loss(
        hidden, spec.weight, batch.token_labels, batch.seq_offsets, ref_chosen_logps,
        ref_rejected_logps, bias=spec.bias, sft_mask=batch.sft_mask, group_ids=batch.group_ids,
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, clo_lambda=clo_lambda,
        logit_scale=spec.logit_scale, softcap=spec.softcap, return_stats=with_stats,
    )  # fmt: skip
    fwd = ForwardOutput(out.token_logps, out.chosen_logps, out.rejected_logps)
    if out.stats is not None:
        fwd.entropy, fwd.mean_logit, fwd.is_top1 = out.stats
    return out.loss, fwd


@torch.no_grad()
def reference_logps(
    ref_model: nn.Module,
    batch: PairBatch,
    *,
    head_impl: str = "eager",
    ld_alpha: float | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(ref_chosen_logps, ref_rejected_logps) of a frozen model; nothing is kept for backward."""
    out = sequence_forward(
        ref_model,
        batch,
        head_impl=head_impl,
        with_stats=False,
        ld_alpha=ld_alpha,
        temperature=temperature,
    )
    return out.chosen_logps.float(), out.rejected_logps.float()
