"""`clo`: Cross-Lingual Optimization pairs from English and translated responses.

For each group (the prompt and its translations) and each target language: the English prompt
prefers the English response over the target-language one, the target prompt the reverse
(Lee et al.; built by `csd_fast.data.clo_pairs_from_translations`, which also sets `sft` on the
target pair and the shared `group` the CLO loss and planner need). When a language has several
samples (a `csd score` output), its best-scored one stands for it; with a single row each (a
`csd translate` output of SFT data, no reward) that row is used.

    build(rows, source_lang="en")
"""

from __future__ import annotations

from csd_fast.data.clo import clo_pairs_from_translations
from csd_fast.pairs.common import (
    ALL_TIED,
    NO_SOURCE,
    PairResult,
    by_group,
    completion_of,
    extremes,
    is_conversational,
    prompt_of,
)


def _representative(samples: list[dict]) -> dict | None:
    if len(samples) == 1 or "reward" not in samples[0]:
        return samples[0]
    pick = extremes([float(s["reward"]) for s in samples])
    return None if pick is None else samples[pick[0]]


def build(rows: list[dict], *, source_lang: str = "en", **_) -> PairResult:
    result = PairResult()
    conv = is_conversational(rows)
    table, meta = [], {}
    for group, langs in by_group(rows).items():
        if source_lang not in langs:
            for lang, samples in langs.items():
                result.skip((samples[0]["prompt_id"], lang), NO_SOURCE, len(samples))
            continue
        src = _representative(langs[source_lang])
        if src is None:
            result.skip(
                (langs[source_lang][0]["prompt_id"], source_lang), ALL_TIED, len(langs[source_lang])
            )
            continue
        for lang, samples in langs.items():
            if lang == source_lang:
                continue
            tgt = _representative(samples)
            if tgt is None:
                result.skip((samples[0]["prompt_id"], lang), ALL_TIED, len(samples))
                continue
            key = f"{group}|{lang}"
            for row in (src, tgt):
                table.append(
                    {
                        "id": key,
                        "lang": row.get("lang"),
                        "prompt": prompt_of(row, conv),
                        "response": completion_of(row["response"], conv),
                    }
                )
            meta[key] = (src, tgt)
    if not table:
        return result
    for pair in clo_pairs_from_translations(table, source_lang=source_lang):
        src, tgt = meta[pair["group"]]
        head, other = (tgt, src) if pair["sft"] else (src, tgt)
        pair.update(
            prompt_id=head["prompt_id"],
            lang=head.get("lang"),
            chosen_reward=head.get("reward"),
            rejected_reward=other.get("reward"),
        )
        result.pairs.append(pair)
    return result
