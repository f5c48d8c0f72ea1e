"""`cm-align`: cross-lingual consistency with the most self-consistent English response.

Per group (a prompt and its translations): embed every response with a multilingual encoder
(mean of the last hidden states over the attention mask, L2-normalised, so similarity = cosine);
the English reference is the English sample with the highest mean similarity to the group's other
English samples; then, in every language, chosen = the sample most similar to the reference and
rejected = the least similar. The English samples are paired the same way (the reference itself
excluded). Equal similarities: the first sample; all equal: skipped and reported.

    encoder = MeanPooledEncoder("path/to/multilingual-encoder")
    build(rows, embed=encoder)            # or any callable list[str] -> (n, D) array
"""

from __future__ import annotations

import numpy as np

from csd_fast.pairs.common import (
    ALL_TIED,
    NO_SOURCE,
    TOO_FEW,
    PairResult,
    by_group,
    extremes,
    is_conversational,
    pair_row,
)


class MeanPooledEncoder:
    """A transformers `AutoModel` whose masked mean-pooled last hidden state embeds a text."""

    def __init__(
        self, model: str, *, device: str | None = None, batch_size: int = 32, max_length: int = 512
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state.float()  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


def reference_index(sim: np.ndarray) -> int:
    """The row of a (k, k) similarity matrix with the highest mean similarity to the others."""
    k = sim.shape[0]
    if k == 1:
        return 0
    mean_other = (sim.sum(1) - np.diag(sim)) / (k - 1)
    return int(np.argmax(mean_other))  # first of equal


def build(rows: list[dict], *, embed=None, source_lang: str = "en", **_) -> PairResult:
    """`embed`: texts -> (n, D) L2-normalised embeddings (MeanPooledEncoder or a table)."""
    if embed is None:
        raise ValueError("cm-align needs an encoder (--encoder MODEL)")
    result = PairResult()
    conv = is_conversational(rows)
    for _group, langs in by_group(rows).items():
        english = langs.get(source_lang, [])
        if len(english) < 2:  # a reference needs others to be consistent with
            for lang, samples in langs.items():
                reason = TOO_FEW if lang == source_lang else NO_SOURCE
                result.skip((samples[0]["prompt_id"], lang), reason, len(samples))
            continue
        flat = [s for samples in langs.values() for s in samples]
        emb = np.asarray(embed([s["response"] for s in flat]), dtype=np.float64)
        at = {id(s): i for i, s in enumerate(flat)}
        e_en = emb[[at[id(s)] for s in english]]
        ref = english[reference_index(e_en @ e_en.T)]
        ref_vec = emb[at[id(ref)]]
        for lang, samples in langs.items():
            cands = [s for s in samples if s is not ref]
            key = (samples[0]["prompt_id"], lang)
            if len(cands) < 2:
                result.skip(key, TOO_FEW, len(samples))
                continue
            sims = [float(emb[at[id(s)]] @ ref_vec) for s in cands]
            pick = extremes(sims)
            if pick is None:
                result.skip(key, ALL_TIED, len(samples))
                continue
            scored = [dict(s, similarity=v) for s, v in zip(cands, sims, strict=True)]
            result.pairs.append(
                pair_row(scored[pick[0]], scored[pick[1]], conv, score="similarity")
            )
    return result
