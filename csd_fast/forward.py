"""The forward of a preference micro-batch: backbone -> scored positions -> head -> sums.

    hidden = backbone(**batch.model_kwargs)              # (R, T, H), any layout
    h = hidden.flatten(0, 1)[batch.token_index]          # (N, H), completion positions only
    token_logps = head(h, batch.token_labels)            # (N,)  eager logits or the fused kernel
    seq_logps = segment_sum(token_logps, seq_offsets)    # (2P,) [chosen..., rejected...]

Prompt and padding positions never reach the LM head, which is where DPO spends its memory.
The same function serves the policy (with grad) and the reference (no grad, no saved state), so
the two can never disagree on layout, truncation or the head's transform.

The head is a module whose forward calls the kernel (`LogprobHead`, swapped into the model's own
`lm_head`), and `PairScorer` wraps backbone + head as one module: both are what FSDP2 needs,
since its hooks gather a sharded unit's weights only inside that unit's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csd_fast.batch import PairBatch, segment_sum
from csd_fast.prompt_learning import active_prompt_learning, shifted_index, with_virtual_tokens


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
    head = getattr(head, "base_layer", head)  # PEFT's LoRA Linear around the head
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
    log_sum_sq_probs: Tensor | None = None  # (N,) log sum_v p_v^2, no grad (WPO weights)
    aux_loss: Tensor | None = None  # () MoE router load-balancing loss (router_aux_loss_coef)


def head_impl_for(fused: bool) -> str:
    """`--fused` picks the kernel (Triton on GPU, chunked torch on CPU); otherwise full logits."""
    return "auto" if fused else "eager"


class LogprobHead:
    """Mixed into the model's output-embedding module: `head(hidden, labels)` runs the kernel.

    The class of the existing `lm_head` (an nn.Linear, or PEFT's LoRA Linear around it) is
    swapped in place for a subclass with this mixin, so parameter names and the state dict stay
    the model's own (`lm_head.weight`) and `head(hidden)` without labels is still the plain
    logits. Called with labels it reads its weights inside its own forward: under FSDP2 the
    head is sharded as a unit and its hooks gather the full weight just for this call.

    A LoRA adapter on the head is folded in exactly, without materialising W + BA: logits
    W h + s B A drop(h) are one matmul of [h, s A drop(h)] (N, H+r) with [W, B] (V, H+r).
    """

    logit_scale: float = 1.0
    softcap: float | None = None

    def forward(self, hidden, labels=None, pair_loss: dict | None = None, **kernel_kwargs):
        from csd_fast.distributed.tensor_parallel import is_vocab_sharded

        sharded = is_vocab_sharded(self.weight)  # tensor parallelism: this rank's vocab rows
        if labels is None:
            if sharded:
                from csd_fast.distributed.tensor_parallel import sharded_logits

                return sharded_logits(hidden, self.weight, getattr(self, "bias", None))
            return super().forward(hidden)
        from csd_fast.kernels.logprob import fused_linear_logprob, linear_logprob_inference

        extras = kernel_kwargs.pop("extras", None)  # see _score_tokens
        hidden, weight, bias = self.operands(hidden)
        if sharded:  # this rank's vocabulary rows (never the fused pair loss: see trainer)
            from csd_fast.distributed import tensor_parallel as tp

            if pair_loss is not None:
                raise NotImplementedError("the fused pair-loss head under tp_size > 1")
            if extras is not None and "log_sum_sq_probs" in extras:
                extras["log_sum_sq_probs"] = tp.sharded_log_sum_sq_probs(
                    hidden.detach(), weight, bias, self.logit_scale, self.softcap,
                    kernel_kwargs.get("temperature", 1.0),
                )  # fmt: skip
            return tp.sharded_head_logprob(hidden, weight, bias, labels,
                                           logit_scale=self.logit_scale, softcap=self.softcap,
                                           **kernel_kwargs)  # fmt: skip
        if extras is not None and "log_sum_sq_probs" in extras:
            # here, inside the head's forward, the weight is whole even when FSDP shards it
            extras["log_sum_sq_probs"] = log_sum_sq_probs(
                hidden.detach(), weight, bias, self.logit_scale, self.softcap,
                kernel_kwargs.get("temperature", 1.0),
            )  # fmt: skip
        if pair_loss is not None:  # the head fused with the pair loss: 3 GEMMs (kernels/)
            from csd_fast.kernels.linear_pair_loss import fused_linear_pair_loss

            return fused_linear_pair_loss(
                hidden, weight, labels, bias=bias, logit_scale=self.logit_scale,
                softcap=self.softcap, temperature=kernel_kwargs.get("temperature", 1.0),
                return_stats=kernel_kwargs.get("return_stats", False), **pair_loss,
            )  # fmt: skip
        # reference passes (no grad) take the forward-only kernel: no autograd state is kept
        head = fused_linear_logprob if torch.is_grad_enabled() else linear_logprob_inference
        return head(
            hidden,
            weight,
            labels,
            bias=bias,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            **kernel_kwargs,
        )

    def operands(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(hidden (N, K), weight (V, K), bias) with any active LoRA adapter folded in."""
        base = getattr(self, "base_layer", None)
        if base is None:
            return hidden, self.weight, getattr(self, "bias", None)
        if getattr(self, "disable_adapters", False) or getattr(self, "merged", False):
            return hidden, base.weight, base.bias
        hiddens, weights = [hidden], [base.weight]
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if getattr(self, "use_dora", {}).get(name):
                raise NotImplementedError("DoRA on the LM head is not supported (LoRA is)")
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x = self.lora_dropout[name](hidden).to(lora_a.weight.dtype)
            low_rank = lora_a(x) * self.scaling[name]  # (N, r)
            hiddens.append(low_rank.to(hidden.dtype))
            weights.append(lora_b.weight.to(base.weight.dtype))  # (V, r)
        return torch.cat(hiddens, -1), torch.cat(weights, -1), base.bias


_HEAD_CLASSES: dict[type, type] = {}


def install_logprob_head(model: nn.Module) -> nn.Module:
    """Give the model's output head the `LogprobHead` forward (idempotent); returns the head."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings: not a causal LM")
    if not isinstance(head, LogprobHead):
        cls = type(head)
        if cls.__name__.startswith("FSDP"):
            raise RuntimeError("install the log-prob head before fully_shard wraps the model")
        if cls not in _HEAD_CLASSES:
            _HEAD_CLASSES[cls] = type(f"Logprob{cls.__name__}", (LogprobHead, cls), {})
        head.__class__ = _HEAD_CLASSES[cls]
    spec = head_spec(model)
    head.logit_scale, head.softcap = spec.logit_scale, spec.softcap
    return head


class PairScorer(nn.Module):
    """backbone -> scored positions -> head, as one module (the FSDP2 root of a sharded model).

    `fully_shard(scorer)` makes this forward the root's: its hooks gather what no decoder-layer
    or head unit owns (embeddings, final norm, a tied head) before the backbone runs. Single
    process it is a plain wrapper; `sequence_forward` accepts it or the bare model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        install_logprob_head(model)

    def forward(
        self, batch: PairBatch, head_impl: str, with_stats: bool, temperature: float,
        extras: dict | None = None, pair_loss: dict | None = None,
    ):  # fmt: skip
        return _score_tokens(
            self.model, batch, head_impl, with_stats, temperature, extras, pair_loss
        )


def _score_tokens(
    model, batch: PairBatch, head_impl: str, with_stats: bool, temperature: float,
    extras: dict | None = None, pair_loss: dict | None = None,
):  # fmt: skip
    """`extras` (a dict, filled in place) asks for outputs the common path does not compute:
    key "aux_loss" -> the MoE router loss, "log_sum_sq_probs" -> (N,) per-token log sum p^2.
    `pair_loss` (the pair-loss options) makes the head return the loss with its gradients
    computed in the forward (csd_fast.kernels.linear_pair_loss) instead of the log-probs."""
    kwargs = dict(batch.model_kwargs)
    index, shift = batch.token_index, 0
    prompt_learning = active_prompt_learning(model)
    if prompt_learning is not None:  # PEFT's virtual tokens, added as PeftModel.forward would
        width = kwargs["input_ids"].shape[1]
        kwargs, shift = with_virtual_tokens(model, prompt_learning, kwargs)
        index = shifted_index(index, width, shift)
    want_aux = extras is not None and "aux_loss" in extras
    if want_aux:
        kwargs["output_router_logits"] = True
    out = backbone(model)(**kwargs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if want_aux:
        extras["aux_loss"] = router_aux_loss(model, out.router_logits, batch)
    hidden = hidden.flatten(0, 1).index_select(0, index)  # (N, H)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # the residual stream leaves the final norm in fp32; the head runs in the autocast dtype,
        # as an eager lm_head under autocast would (the kernels then read bf16 tiles)
        hidden = hidden.to(torch.get_autocast_dtype(dev))
    head = unwrap_causal_lm(model).get_output_embeddings()
    if pair_loss is not None:  # -> PairHeadOutput (loss, chosen, rejected, token_logps, stats)
        return head(hidden, batch.token_labels, pair_loss=pair_loss, temperature=temperature,
                    return_stats=with_stats)  # fmt: skip
    result = head(
        hidden,
        batch.token_labels,
        temperature=temperature,
        return_stats=with_stats,
        impl=head_impl,
        **({"extras": extras} if extras else {}),
    )
    if with_stats:
        logps, stats = result
        return logps, (stats.entropy, stats.mean_logit, stats.is_top1)
    return result, None


def _reshard_after_no_grad(model: nn.Module) -> None:
    # an FSDP root keeps its weights gathered for the backward; none follows a no-grad pass, and
    # weights left gathered would miss the next step's gradient reduction (and skip the next
    # forward's all-gather on this rank only: the ranks' collectives would no longer match)
    if not torch.is_grad_enabled() and hasattr(model, "reshard"):
        model.reshard()


def token_logps_and_stats(
    model: nn.Module,
    batch: PairBatch,
    *,
    head_impl: str = "eager",
    with_stats: bool = True,
    temperature: float = 1.0,
    extras: dict | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Run the backbone over the batch rows and score the completion tokens through the head.

    `model` is a `PairScorer` (sharded or not) or a bare causal LM (its head is then given the
    `LogprobHead` forward on first use). `extras`: see `_score_tokens`."""
    if isinstance(model, PairScorer):
        out = model(batch, head_impl, with_stats, temperature, extras)
        _reshard_after_no_grad(model)
        return out
    install_logprob_head(model)
    return _score_tokens(model, batch, head_impl, with_stats, temperature, extras)


def router_aux_loss(model: nn.Module, router_logits, batch: PairBatch) -> Tensor:
    """The load-balancing loss a transformers MoE causal LM adds (its own module's function).

    Padded rows pass their 2-D attention mask, as the model's forward does; packed rows hold no
    padding, so every token counts and no mask is needed.
    """
    import sys

    lm = unwrap_causal_lm(model)
    fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    if fn is None or router_logits is None:
        raise ValueError(
            f"{type(lm).__name__} returns no router load-balancing loss; set "
            "router_aux_loss_coef=0.0 (or leave it None) for this model"
        )
    config = lm.config.get_text_config()
    num_experts = getattr(lm, "num_experts", None) or getattr(config, "num_local_experts", None)
    num_experts = num_experts or config.num_experts
    top_k = getattr(lm, "num_experts_per_tok", None) or config.num_experts_per_tok
    mask = batch.model_kwargs.get("attention_mask")
    mask = mask if mask is not None and mask.dim() == 2 else None
    return fn(router_logits, num_experts, top_k, mask)


@torch.no_grad()
def log_sum_sq_probs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: float = 1.0,
    softcap: float | None = None, temperature: float = 1.0,
) -> Tensor:  # fmt: skip
    """(N,) log sum_v softmax(logits)_v^2 per scored token, on eager logits in row chunks.

    WPO's per-token weight is p(y_t) / sqrt(sum_v p_v^2) in log space (TRL's `log_sum_sq_probs`);
    it is computed here without grad, so the head kernels need not return it.
    """
    out = []
    for h in hidden.split(1024):
        logits = torch.nn.functional.linear(h, weight, bias).float() * logit_scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logp = torch.log_softmax(logits / temperature, dim=-1)
        out.append(torch.logsumexp(2 * logp, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


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
    aux_loss: bool = False,
    with_sq_probs: bool = False,
) -> ForwardOutput:
    """Per-sequence summed completion log-probs (chosen and rejected) for one micro-batch.

    aux_loss: also the MoE router loss; with_sq_probs: also per-token log sum p^2 (WPO)."""
    extras = dict.fromkeys(
        [k for k, on in (("aux_loss", aux_loss), ("log_sum_sq_probs", with_sq_probs)) if on]
    )
    token_logps, stats = token_logps_and_stats(
        model, batch, head_impl=head_impl, with_stats=with_stats, temperature=temperature,
        extras=extras,
    )  # fmt: skip
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
    out.aux_loss, out.log_sum_sq_probs = extras.get("aux_loss"), extras.get("log_sum_sq_probs")
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
    temperature: float = 1.0,
) -> tuple[Tensor, ForwardOutput]:
    """The pair loss with the head's gradients computed inside its forward (3 GEMMs instead of
    4-5: csd_fast.kernels.linear_pair_loss); `loss_type` among csd_fast.kernels.PAIR_LOSS_TYPES.
    Runs through the head module (and a PairScorer root), so FSDP2 gathers as for the logps."""
    pair_loss = dict(
        seq_offsets=batch.seq_offsets, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, sft_mask=batch.sft_mask,
        group_ids=batch.group_ids, loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, clo_lambda=clo_lambda,
        host_offsets=batch.host_seq_offsets,  # the collator's: the head reads no device offsets
    )  # fmt: skip
    if isinstance(model, PairScorer):
        out = model(batch, "auto", with_stats, temperature, pair_loss=pair_loss)
        # (eval) the same as the log-prob path: a batch may take either path on either rank
        _reshard_after_no_grad(model)
    else:
        install_logprob_head(model)
        out = _score_tokens(model, batch, "auto", with_stats, temperature, pair_loss=pair_loss)
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
