"""The CLO demo: `csd train --fused --loss_type clo` and its per-language preference report.

Run: python -m pytest tests/test_demo_clo.py -q
"""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM

from csd_fast.cli import main
from csd_fast.data import load_rows, tokenize_pairs
from csd_fast.demo import build_demo_tokenizer
from csd_fast.demo.preference import clo_rows, language_preference


def _tables(text: str) -> list[dict[str, tuple[float, ...]]]:
    """Every printed preference table: lang -> (before,) or (before, after), as fractions."""
    tables = []
    for block in text.split("prefers the prompt's language")[1:]:
        rows = {}
        for lang, nums in re.findall(r"^  (\w+)\s+([\d.% ]+)$", block, flags=re.M):
            rows[lang] = tuple(float(x) / 100 for x in re.findall(r"([\d.]+)%", nums))
        tables.append(rows)
    return tables


def test_clo_rows_pair_each_item():
    rows = [
        {"id": 3, "lang": "en", "prompt": "a", "chosen": " a", "rejected": " b"},
        {"id": 3, "lang": "da", "prompt": "b", "chosen": " b", "rejected": " a"},
    ]
    out = clo_rows(rows)
    assert [r["group"] for r in out] == [3, 3] and [r["sft"] for r in out] == [False, True]


@pytest.mark.slow
def test_clo_demo_raises_the_target_language_without_hurting_english(tmp_path, capsys):
    out = tmp_path / "clo"
    assert main(["--fused", "--loss_type", "clo", "--output_dir", str(out)]) == 0
    before, final = _tables(capsys.readouterr().out)
    assert set(before) == set(final) == {"en", "da"}
    assert all(before[x][0] == final[x][0] for x in before)  # the same "before" column
    after = {x: final[x][1] for x in final}
    assert after["da"] > before["da"][0]
    assert after["en"] >= before["en"][0]
    # the printed "after" is the saved model's own preference on the held-out pairs
    tok = build_demo_tokenizer()
    held = tokenize_pairs(
        load_rows(str(out / "demo_assets" / "clo_eval.jsonl")), tok, cache_dir=None
    )
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    measured = language_preference(model, held, tok.pad_token_id)
    assert measured == pytest.approx(after, abs=1e-3)  # printed with one decimal of a percent
