"""Tests for the CLO side of csd_fast.data: clo_pairs_from_translations and the group / sft columns.

Run: python -m pytest tests/test_data_clo.py -q
Checks that the columns are validated (errors name row and field), carried per pair through
tokenization, the cache and `collate_padded`, and change no token id (truth: TRL 1.16's own
`DPOTrainer._prepare_dataset`, see tests/data_helpers.py).
"""

from __future__ import annotations

import pytest
from data_helpers import (
    BAD_CLO,
    BAD_TRANSLATIONS,
    STANDARD,
    TRANSLATIONS,
    count_tokenizer_calls,
    make_source,
    pair_ids,
    tiny_tokenizer,
    trl_prepare,
    write_jsonl,
)

from csd_fast.batch import collate_padded
from csd_fast.data import PreferenceDataError, clo_pairs_from_translations, tokenize_pairs


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """The default cache_dir="auto" writes under $CSD_FAST_CACHE: keep it per test, off ~/.cache."""
    monkeypatch.setenv("CSD_FAST_CACHE", str(tmp_path / "auto-cache"))


@pytest.fixture
def count_calls(monkeypatch, tok):
    return count_tokenizer_calls(monkeypatch, tok)


def test_clo_pairs_from_translations_builds_both_pairs_per_id():
    en_a, fr_b, de_a, en_b = TRANSLATIONS
    assert clo_pairs_from_translations(TRANSLATIONS) == [
        {"prompt": en_a["prompt"], "chosen": en_a["response"], "rejected": de_a["response"]}
        | {"group": "a", "sft": False},
        {"prompt": de_a["prompt"], "chosen": de_a["response"], "rejected": en_a["response"]}
        | {"group": "a", "sft": True},
        {"prompt": en_b["prompt"], "chosen": en_b["response"], "rejected": fr_b["response"]}
        | {"group": "b", "sft": False},
        {"prompt": fr_b["prompt"], "chosen": fr_b["response"], "rejected": en_b["response"]}
        | {"group": "b", "sft": True},
    ]


@pytest.mark.parametrize("case", list(BAD_TRANSLATIONS))
def test_clo_translation_errors_name_the_row(case):
    rows, where, reason = BAD_TRANSLATIONS[case]
    with pytest.raises(PreferenceDataError) as e:
        clo_pairs_from_translations(rows)
    assert (e.value.row, e.value.field) == where and reason in e.value.reason


@pytest.mark.parametrize("kind", ["list", "jsonl", "dataset"])
def test_clo_columns_reach_pairs_and_collator(kind, tok, tmp_path):
    rows = clo_pairs_from_translations(TRANSLATIONS)
    src = rows if kind == "list" else make_source(kind, rows, tmp_path)
    pairs = tokenize_pairs(src, tok)
    plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    assert pair_ids(pairs) == trl_prepare(plain, tok)  # the extra columns change no id
    assert pairs.groups().tolist() == [0, 0, 1, 1]  # str ids numbered in first-seen order
    assert [p["sft"] for p in pairs] == [False, True, False, True]
    assert [p["group"] for p in pairs] == [0, 0, 1, 1]
    batch = collate_padded(list(pairs), tok.pad_token_id)
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.sft_mask.tolist() == [False, True, False, True]
    assert (
        tokenize_pairs(plain, tok).groups() is None and "group" not in tokenize_pairs(plain, tok)[0]
    )


def test_clo_columns_survive_the_cache(tok, tmp_path, count_calls):
    rows = [{**r, "group": g} for r, g in zip(STANDARD, [10, 10, 3, 7], strict=True)]
    rows = [{**r, "sft": i % 2 == 1} for i, r in enumerate(rows)]
    src, cache = make_source("jsonl", rows, tmp_path), tmp_path / "cache"
    first = tokenize_pairs(src, tok, cache_dir=cache)
    count_calls["n"] = 0
    second = tokenize_pairs(src, tok, cache_dir=cache)
    assert second.from_cache and count_calls["n"] == 0
    assert second.groups().tolist() == [10, 10, 3, 7]  # int ids kept as given
    assert list(second) == list(first) and second[1]["sft"] is True


@pytest.mark.parametrize("case", list(BAD_CLO))
def test_bad_clo_columns_name_row_and_field(case, tok, tmp_path):
    rows, where = BAD_CLO[case]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(PreferenceDataError) as e:
        tokenize_pairs(str(path), tok)
    assert (e.value.row, e.value.field, e.value.kind) == where
    assert e.value.source == str(path) and f"row {where[0]}" in str(e.value)


def test_skipped_rows_do_not_renumber_groups(tok):
    rows = [{**r, "group": g} for r, g in zip(STANDARD, ["x", "y", "x", "z"], strict=True)]
    rows[1] = {**rows[1], "rejected": rows[1]["chosen"]}  # skipped, but "y" still numbered
    pairs = tokenize_pairs(rows, tok, on_bad_row="skip")
    assert pairs.skipped == {"identical_pair": 1}
    assert [p["row"] for p in pairs] == [0, 2, 3] and pairs.groups().tolist() == [0, 0, 2]
