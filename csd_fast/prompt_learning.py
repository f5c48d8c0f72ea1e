"""PEFT prompt learning (prompt tuning, P-tuning, prefix tuning) in csd-fast's own forward.

    kwargs, shift = with_virtual_tokens(peft_model, config, batch.model_kwargs)
    hidden = backbone(**kwargs)                          # (R, shift + T, H)
    index = shifted_index(batch.token_index, T, shift)   # the same scored tokens

csd-fast runs the decoder and the LM head itself, never `PeftModel.forward`, which is where
PEFT adds a prompt-learning adapter's virtual tokens. So the same steps are taken here, as PEFT
takes them:
  * prompt tuning / P-tuning: the adapter's V prompt embeddings go before each row's token
    embeddings (inputs_embeds), the attention mask gains V ones, position ids are dropped (the
    model counts 0..V+T-1), and every scored position moves V places right in its row;
  * prefix tuning: the adapter's per-layer keys and values are the cache the rows attend to
    (past_key_values), the mask gains V ones, position ids move by V; positions stay.
With the adapter disabled (`disable_adapter()`: the PEFT reference) nothing is added. Only the
padded layout holds them: a packed row has several sequences, each needing its own prefix.
Tests: tests/test_prompt_learning.py (against TRL's DPOTrainer).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EMBEDDING_PROMPTS = ("PROMPT_TUNING", "P_TUNING")
_CACHE_PROMPTS = ("PREFIX_TUNING",)


def active_prompt_learning(model):
    """The active prompt-learning PeftConfig of an enabled PEFT model, else None."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    if getattr(model, "_adapters_disabled", False):
        return None
    return config


def check_prompt_learning(config, args) -> None:
    """Refuse what this forward cannot give for a prompt-learning adapter (ValueError)."""
    kind = _kind(config)
    if kind not in (*_EMBEDDING_PROMPTS, *_CACHE_PROMPTS):
        raise ValueError(
            f"peft_config {kind}: csd-fast adds the virtual tokens of prompt tuning, P-tuning "
            "and prefix tuning; use one of those or a weight adapter (LoRA, ...)"
        )
    if args.padding_free or args.prefix_sharing or args.max_tokens_per_batch:
        raise ValueError(
            f"peft_config {kind} with a packed layout (padding_free, prefix_sharing, "
            "max_tokens_per_batch): each sequence would need its own virtual tokens; use the "
            "padded layout"
        )


def _kind(config) -> str:
    kind = config.peft_type
    return str(getattr(kind, "value", kind))


def with_virtual_tokens(model, config, kwargs: dict) -> tuple[dict, int]:
    """The backbone's inputs with the adapter's virtual tokens, and how far each scored position
    moves right in its row."""
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids")  # (R, T)
    R, T = ids.shape
    V = config.num_virtual_tokens
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(R, V), mask], dim=1)
    if _kind(config) in _CACHE_PROMPTS:
        if kwargs.get("position_ids") is not None:  # after the V cached positions
            kwargs["position_ids"] = kwargs["position_ids"] + V
        kwargs["past_key_values"] = model.get_prompt(R, max_cache_len=T + V)
        kwargs["input_ids"] = ids
        return kwargs, 0
    kwargs.pop("position_ids", None)  # as PEFT: the model numbers prompts and tokens itself
    embeds = model.word_embeddings(ids)  # (R, T, H)
    prompts = model.get_prompt(batch_size=R).to(embeds.dtype)  # (R, V, H)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    return kwargs, V


def shifted_index(index: Tensor, width: int, shift: int) -> Tensor:
    """Flat positions of (R, width) rows in rows of `shift + width`, each `shift` to the right."""
    if not shift:
        return index
    return (index // width) * (width + shift) + shift + index % width
