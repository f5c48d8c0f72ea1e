"""`paired`: chosen = the best-scored sample of a prompt, rejected = the worst (the seed's setup).

build(rows)            # rows of a `csd score` output (prompt_id, lang, response, reward, ...)
build(rows, min_gap=1.0)   # skip prompts whose best - worst < 1.0 (reported as small_gap)
"""

from __future__ import annotations

from csd_fast.pairs.common import PairResult, best_worst


def build(rows: list[dict], *, min_gap: float = 0.0, **_) -> PairResult:
    return best_worst(rows, min_gap=min_gap)
