"""`icr`: implicit cross-lingual rewards from an English-aligned DPO model (arXiv 2503.04647).

Every sample y of a prompt in language l is scored against the group's English prompt x_en:

    r(y) = beta * (log pi_theta(y | x_en) - log pi_ref(y | x_en))

with pi_theta the English-aligned DPO model and pi_ref its reference; per (prompt, language) the
pair is chosen = argmax r, rejected = argmin r, under the language-l prompt. The log-probs come
from the training engine's own path: `csd_fast.data.tokenize_pairs` (TRL's tokenization),
`csd_fast.packing.collate_packed` with the English prompt shared by two samples, and
`csd_fast.forward.reference_logps` (the fused log-prob head when `head_impl` asks for it).

    scores = icr_rewards(rows, policy_dir, reference_dir, beta=0.1)   # one per row
    build(rows, policy=..., reference=..., beta=0.1)
"""

from __future__ import annotations

import numpy as np

from csd_fast.pairs.common import NO_SOURCE, PairResult, best_worst, by_group, prompt_of


def _english_prompts(rows: list[dict], source_lang: str, conv: bool) -> dict[str, object]:
    out = {}
    for group, langs in by_group(rows).items():
        if source_lang in langs:
            out[group] = prompt_of(langs[source_lang][0], conv)
    return out


def sequence_logps(
    model,
    tokenizer,
    prompts: list,
    responses: list[str],
    *,
    batch_pairs: int = 16,
    head_impl: str = "auto",
    max_length: int | None = None,
) -> np.ndarray:
    """log pi(response | prompt) summed over the response tokens (EOS included), per row."""
    import json
    from collections import defaultdict

    import torch

    from csd_fast.attention import enable_packed_attention, packed_attention_supported
    from csd_fast.data import tokenize_pairs
    from csd_fast.forward import reference_logps
    from csd_fast.packing import collate_packed

    n = len(responses)
    # two responses to the same prompt share it in one prefix-shared pair (prompt computed once);
    # an odd one out is paired with itself
    same_prompt: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        same_prompt[json.dumps(prompts[i], sort_keys=True)].append(i)
    rows, owners = [], []
    for idxs in same_prompt.values():
        for k in range(0, len(idxs), 2):
            a = idxs[k]
            b = idxs[k + 1] if k + 1 < len(idxs) else None
            if b is None:  # odd one out: a filler rejected (TRL refuses identical pairs), dropped
                other = next((r for r in responses if r != responses[a]), None)
                filler = other if other is not None else responses[a] + tokenizer.eos_token
            rows.append(
                {
                    "prompt": prompts[a],
                    "chosen": responses[a],
                    "rejected": responses[b] if b is not None else filler,
                }
            )
            owners.append((a, b))
    pairs = tokenize_pairs(rows, tokenizer, max_length=max_length, cache_dir=None)
    packed = packed_attention_supported(model)[0]
    if packed:
        enable_packed_attention(model)
    out = np.zeros(n, dtype=np.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    for start in range(0, len(pairs), batch_pairs):
        idx = range(start, min(start + batch_pairs, len(pairs)))
        examples = [pairs[i] for i in idx]
        if packed:
            batch = collate_packed(examples, pad, prefix_sharing=True)
        else:
            from csd_fast.batch import collate_padded

            batch = collate_padded(examples, pad)
        device = next(model.parameters()).device
        batch = batch.to(device) if hasattr(batch, "to") else batch
        with torch.no_grad():
            chosen, rejected = reference_logps(model, batch, head_impl=head_impl)
        for k, i in enumerate(idx):
            row = int(pairs.rows[i])
            a, b = owners[row]
            out[a] = float(chosen[k])
            if b is not None:
                out[b] = float(rejected[k])
    return out


def icr_rewards(
    rows: list[dict],
    policy,
    reference,
    tokenizer,
    *,
    beta: float = 0.1,
    source_lang: str = "en",
    **kw,
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, has_source): beta * log-ratio given the English prompt; NaN without one."""
    from csd_fast.pairs.common import is_conversational

    conv = is_conversational(rows)
    english = _english_prompts(rows, source_lang, conv)
    keep = [i for i, r in enumerate(rows) if _group(r) in english]
    prompts = [english[_group(rows[i])] for i in keep]
    responses = [rows[i]["response"] for i in keep]
    rewards = np.full(len(rows), np.nan)
    if keep:
        lp = sequence_logps(policy, tokenizer, prompts, responses, **kw)
        lr = sequence_logps(reference, tokenizer, prompts, responses, **kw)
        rewards[keep] = beta * (lp - lr)
    return rewards, ~np.isnan(rewards)


def _group(row: dict) -> str:
    return str(row["group"] if row.get("group") is not None else row["prompt_id"])


def build(
    rows: list[dict],
    *,
    policy=None,
    reference=None,
    tokenizer=None,
    beta: float = 0.1,
    source_lang: str = "en",
    rewards=None,
    min_gap: float = 0.0,
    **kw,
) -> PairResult:
    """Pairs by ICR reward; `rewards` (one per row) skips the model passes (precomputed)."""
    if rewards is None:
        rewards, _ = icr_rewards(
            rows, policy, reference, tokenizer, beta=beta, source_lang=source_lang, **kw
        )
    scored, result = [], PairResult()
    missing: dict[tuple, int] = {}
    for r, value in zip(rows, rewards, strict=True):
        if np.isnan(value):
            key = (r["prompt_id"], r.get("lang"))
            missing[key] = missing.get(key, 0) + 1
        else:
            scored.append(dict(r, icr_reward=float(value)))
    inner = best_worst(scored, score="icr_reward", min_gap=min_gap)
    for key, count in missing.items():
        result.skip(key, NO_SOURCE, count)
    result.pairs, result.skipped = inner.pairs, result.skipped + inner.skipped
    return result
