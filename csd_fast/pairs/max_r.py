"""`max-r`: the best-scored response of each prompt only, as an SFT set (the seed's baseline).

Rows are TRL's prompt / completion format plus prompt_id, lang, group and `reward`. A prompt
whose samples all tie has no best one and is skipped; a single sample is kept only with
`allow_single=True` (there is nothing to rank it against otherwise).
"""

from __future__ import annotations

from csd_fast.pairs.common import (
    ALL_TIED,
    TOO_FEW,
    PairResult,
    by_prompt,
    completion_of,
    extremes,
    is_conversational,
    prompt_of,
)


def build(rows: list[dict], *, allow_single: bool = False, **_) -> PairResult:
    result = PairResult(kind="sft")
    conv = is_conversational(rows)
    for key, samples in by_prompt(rows).items():
        if len(samples) < 2 and not (allow_single and samples):
            result.skip(key, TOO_FEW, len(samples))
            continue
        values = [float(s["reward"]) for s in samples]
        pick = extremes(values) if len(samples) > 1 else (0, 0)
        if pick is None:
            result.skip(key, ALL_TIED, len(samples))
            continue
        best = samples[pick[0]]
        result.pairs.append(
            {
                "prompt": prompt_of(best, conv),
                "completion": completion_of(best["response"], conv),
                "prompt_id": best["prompt_id"],
                "lang": best.get("lang"),
                "source_group": best.get("group"),
                "reward": values[pick[0]],
                "sample_index": int(best.get("sample_index", 0)),
            }
        )
    return result
