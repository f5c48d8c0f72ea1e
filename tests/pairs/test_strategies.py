"""Each pair strategy against hand-built reward / similarity tables; ties and too-few skipped.

python -m pytest -q tests/pairs/test_strategies.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from csd_fast.pairs import build_pairs
from csd_fast.pairs.sweet_spot import target_index


def _rows(table):
    """{(prompt_id, lang): [rewards]} -> score rows (responses named after the sample)."""
    rows = []
    for (pid, lang), rewards in table.items():
        for k, r in enumerate(rewards):
            rows.append(
                {
                    "prompt_id": pid,
                    "lang": lang,
                    "group": pid.split("-")[0],
                    "prompt": f"prompt {pid}",
                    "messages": None,
                    "sample_index": k,
                    "response": f"{pid}/{lang}/{k}",
                    "reward": r,
                }
            )
    return rows


TABLE = {
    ("a", "en"): [0.5, 2.0, -1.0, 2.0],  # best: sample 1 (first of the tied 2.0), worst: 2
    ("b", "en"): [1.0, 1.0, 1.0],  # all tied: skipped
    ("c", "de"): [3.0],  # one sample: skipped
    ("d", "de"): [-4.0, 0.0, 4.0, 1.0, 1.5, -0.5],
}


def _by_key(result):
    return {(p["prompt_id"], p["lang"]): p for p in result.pairs}


def test_paired_best_vs_worst():
    res = build_pairs("paired", _rows(TABLE))
    got = _by_key(res)
    assert set(got) == {("a", "en"), ("d", "de")}
    assert (got["a", "en"]["chosen"], got["a", "en"]["rejected"]) == ("a/en/1", "a/en/2")
    assert (got["a", "en"]["chosen_reward"], got["a", "en"]["rejected_reward"]) == (2.0, -1.0)
    assert (got["d", "de"]["chosen"], got["d", "de"]["rejected"]) == ("d/de/2", "d/de/0")
    assert {(s["prompt_id"], s["reason"]) for s in res.skipped} == {
        ("b", "all_tied"),
        ("c", "too_few"),
    }
    gap = build_pairs("paired", _rows(TABLE), min_gap=5.0)
    assert set(_by_key(gap)) == {("d", "de")}
    assert ("a", "small_gap") in {(s["prompt_id"], s["reason"]) for s in gap.skipped}


def test_sweet_spot_rejected_nearest_mu_minus_2_sigma():
    r = TABLE["d", "de"]  # mu = 1/3, sigma = sqrt(34.833 / 6) = 2.4095 (population)
    mu = sum(r) / len(r)
    sigma = (sum((x - mu) ** 2 for x in r) / len(r)) ** 0.5
    target = mu - 2 * sigma  # -4.486: nearest is -4.0 (sample 0)
    assert target == pytest.approx(-4.4856, abs=1e-4)
    assert target_index(r, -2.0) == 0
    assert target_index(r, -0.25) == 5  # mu - 0.25 sigma = -0.269: nearest -0.5 (sample 5)
    got = _by_key(build_pairs("sweet-spot", _rows(TABLE), point=-0.25))
    assert (got["d", "de"]["chosen"], got["d", "de"]["rejected"]) == ("d/de/2", "d/de/5")
    assert got["a", "en"]["rejected"] == "a/en/0"  # mu=0.875 sigma=1.244 -> -0.369: 0.5 nearest


def test_max_r_is_an_sft_set():
    res = build_pairs("max-r", _rows(TABLE))
    assert res.kind == "sft"
    assert {p["prompt_id"]: p["completion"] for p in res.pairs} == {"a": "a/en/1", "d": "d/de/2"}
    single = build_pairs("max-r", _rows(TABLE), allow_single=True)
    assert "c" in {p["prompt_id"] for p in single.pairs}


def test_conversational_rows_give_chat_pairs():
    rows = _rows({("a", "en"): [0.0, 1.0]})
    for r in rows:
        r["messages"] = json.dumps([{"role": "user", "content": "hi"}])
    (p,) = build_pairs("paired", rows).pairs
    assert p["prompt"] == [{"role": "user", "content": "hi"}]
    assert p["chosen"] == [{"role": "assistant", "content": "a/en/1"}]


def test_clo_uses_the_best_sample_of_each_language():
    rows = _rows(
        {
            ("g1-en", "en"): [0.0, 5.0],
            ("g1-de", "de"): [2.0, 1.0],
            ("g2-en", "en"): [1.0],
            ("g3-de", "de"): [1.0, 2.0],
        }
    )
    res = build_pairs("clo", rows)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["sft"]) for p in res.pairs] == [
        ("prompt g1-en", "g1-en/en/1", "g1-de/de/0", False),
        ("prompt g1-de", "g1-de/de/0", "g1-en/en/1", True),
    ]
    assert len({p["group"] for p in res.pairs}) == 1
    assert {(s["prompt_id"], s["reason"]) for s in res.skipped} == {("g3-de", "no_source")}


def test_icr_pairs_from_precomputed_rewards():
    rows = _rows({("g1-en", "en"): [0, 0, 0], ("g1-de", "de"): [0, 0, 0], ("g9-da", "da"): [0, 0]})
    icr = np.array([0.1, 0.3, -0.2, 1.0, -1.0, 0.5, np.nan, np.nan])
    res = build_pairs("icr", rows, rewards=icr)
    got = _by_key(res)
    assert (got["g1-en", "en"]["chosen"], got["g1-en", "en"]["rejected"]) == (
        "g1-en/en/1",
        "g1-en/en/2",
    )
    assert (got["g1-de", "de"]["chosen"], got["g1-de", "de"]["rejected"]) == (
        "g1-de/de/0",
        "g1-de/de/1",
    )
    assert got["g1-de", "de"]["chosen_reward"] == 1.0
    assert [(s["prompt_id"], s["reason"]) for s in res.skipped] == [("g9-da", "no_source")]


def test_cm_align_against_a_similarity_table():
    rows = _rows({("g-en", "en"): [0, 0, 0], ("g-de", "de"): [0, 0, 0]})
    vec = {  # unit vectors in 2-D: angle -> cosine similarity = cos(difference)
        "g-en/en/0": 0.0,
        "g-en/en/1": 0.3,
        "g-en/en/2": 1.4,  # en/1 is the most central
        "g-de/de/0": 1.2,
        "g-de/de/1": 0.25,
        "g-de/de/2": -2.0,
    }

    def embed(texts):
        return np.array([[np.cos(vec[t]), np.sin(vec[t])] for t in texts])

    res = build_pairs("cm-align", rows, embed=embed)
    got = _by_key(res)
    # mean sim of en/k to the other English samples: en/1 highest -> reference
    assert (got["g-de", "de"]["chosen"], got["g-de", "de"]["rejected"]) == (
        "g-de/de/1",
        "g-de/de/2",
    )
    assert (got["g-en", "en"]["chosen"], got["g-en", "en"]["rejected"]) == (
        "g-en/en/0",
        "g-en/en/2",
    )
    assert got["g-de", "de"]["chosen_reward"] == pytest.approx(np.cos(0.05))
    tied = build_pairs("cm-align", rows, embed=lambda t: np.ones((len(t), 2)) / 2**0.5)
    assert not tied.pairs and {s["reason"] for s in tied.skipped} == {"all_tied"}
