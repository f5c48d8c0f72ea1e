"""Preference pairs from scored samples, one module per strategy (`csd pairs --strategy S`).

    from csd_fast.pairs import STRATEGIES, build_pairs
    result = build_pairs("paired", rows)      # rows: dicts of a `csd score` output
    result.pairs, result.skipped              # TRL preference rows; (key, reason) of the rest

Strategies: paired (best vs worst), sweet_spot (best vs nearest mu - 2 sigma), max_r (best only,
an SFT set), clo (cross-lingual, via csd_fast.data.clo_pairs_from_translations), icr (implicit
cross-lingual reward of an English-aligned DPO model), cm_align (consistency with the most
self-consistent English response under a multilingual encoder). A prompt whose samples all tie, or
with fewer than two samples, is skipped and reported, never paired at random.
"""

from __future__ import annotations

from csd_fast.pairs.common import PairResult, build_pairs

STRATEGIES = ("paired", "sweet-spot", "max-r", "clo", "icr", "cm-align")

__all__ = ["STRATEGIES", "PairResult", "build_pairs"]
