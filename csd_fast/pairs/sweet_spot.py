"""`sweet-spot`: chosen = best, rejected = the sample nearest mu + point * sigma (point = -2).

Xiao et al. 2025, "Finding the Sweet Spot": fit N(mu, sigma) to a prompt's K rewards (sigma the
population standard deviation) and take as rejected the sample closest to mu - 2 sigma: a
clearly worse response, but not the outlier at the very bottom. Equally near samples: the first.

    build(rows, point=-2.0)
"""

from __future__ import annotations

import numpy as np

from csd_fast.pairs.common import PairResult, best_worst


def target_index(values: list[float], point: float) -> int:
    v = np.asarray(values, dtype=np.float64)
    target = v.mean() + point * v.std()
    return int(np.argmin(np.abs(v - target)))  # argmin: first of equally near


def build(rows: list[dict], *, point: float = -2.0, min_gap: float = 0.0, **_) -> PairResult:
    return best_worst(
        rows, min_gap=min_gap, choose_rejected=lambda values, best: target_index(values, point)
    )
