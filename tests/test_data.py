"""Tests for csd_fast.data: sources, validation, TRL-exact tokenization, skip/rejects, cache.

Run: python -m pytest tests/test_data.py -q
The CLO columns (group / sft) and clo_pairs_from_translations are in tests/test_data_clo.py.
Truth for the token ids is TRL 1.16's own `DPOTrainer._prepare_dataset`, called unbound on a stub.
"""

from __future__ import annotations

import copy
import json
import pickle

import datasets
import pytest
from data_helpers import (
    CONVERSATIONAL,
    IMPLICIT,
    IMPLICIT_CONVERSATIONAL,
    STANDARD,
    count_tokenizer_calls,
    make_source,
    pair_ids,
    tiny_tokenizer,
    trl_prepare,
    write_jsonl,
)

from csd_fast.data import (
    PreferenceDataError,
    default_cache_dir,
    load_rows,
    tokenize_pairs,
    tokenizer_fingerprint,
)

FORMATS = {
    "standard": STANDARD,
    "implicit": IMPLICIT,
    "conversational": CONVERSATIONAL,
    "implicit_conversational": IMPLICIT_CONVERSATIONAL,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """The default cache_dir="auto" writes under $CSD_FAST_CACHE: keep it per test, off ~/.cache."""
    monkeypatch.setenv("CSD_FAST_CACHE", str(tmp_path / "auto-cache"))


# -- TRL parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matches_trl_prepare_dataset(fmt, tok):
    rows = FORMATS[fmt]
    pairs = tokenize_pairs(rows, tok)
    assert pair_ids(pairs) == trl_prepare(rows, tok)
    assert [pairs[i]["row"] for i in range(len(pairs))] == list(range(len(rows)))
    assert pairs.skipped == {}


def test_matches_trl_with_tools_and_template_kwargs(tok):
    # think=True makes the generation prompt differ from the rendered conversation, so the
    # boundary comes from the common-prefix rule; tools as a JSON string, as TRL accepts them
    tools = [{"type": "function", "function": {"name": "sky", "parameters": {}}}]
    rows = copy.deepcopy(CONVERSATIONAL)
    for r in rows:
        r["tools"] = json.dumps(tools)
        r["chat_template_kwargs"] = {"think": True}
    pairs = tokenize_pairs(rows, tok)
    ref = trl_prepare(rows, tok)
    assert pair_ids(pairs) == ref
    plain = tokenize_pairs(CONVERSATIONAL, tok)
    assert pairs[0]["prompt_ids"] != plain[0]["prompt_ids"]  # the tools really were rendered


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset", "datasetdict", "saved"])
@pytest.mark.parametrize("fmt", ["standard", "conversational", "implicit_conversational"])
def test_every_source_kind_gives_trl_ids(kind, fmt, tok, tmp_path):
    rows = FORMATS[fmt]
    src = load_rows(make_source(kind, rows, tmp_path))
    assert len(src) == len(rows)
    assert pair_ids(tokenize_pairs(src, tok)) == trl_prepare(rows, tok)


def test_prompt_too_long_is_a_bad_row_not_a_silent_drop(tok, tmp_path):
    rows = STANDARD + [
        {"prompt": "Paris is the capital of France. " * 8, "chosen": "a", "rejected": "b"}
    ]
    max_length = 12
    ref = trl_prepare(rows, tok, max_length=max_length)  # TRL silently drops the long prompt
    assert len(ref) < len(rows)
    with pytest.raises(PreferenceDataError) as e:
        tokenize_pairs(rows, tok, max_length=max_length)
    assert e.value.field == "prompt" and e.value.kind == "prompt_too_long"
    pairs = tokenize_pairs(rows, tok, max_length=max_length, on_bad_row="skip")
    assert pair_ids(pairs) == ref
    assert pairs.skipped == {"prompt_too_long": len(rows) - len(ref)}
    # keep_end keeps the completion end: TRL drops nothing, neither do we
    kept = tokenize_pairs(rows, tok, max_length=max_length, truncation_mode="keep_end")
    assert pair_ids(kept) == trl_prepare(
        rows, tok, max_length=max_length, truncation_mode="keep_end"
    )
    assert len(kept) == len(rows)


# -- errors name file, row and field -------------------------------------------------------------


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n\n" + '{"prompt": "x", "chosen": }\n')
    with pytest.raises(PreferenceDataError) as e:
        load_rows(str(path))
    assert e.value.line == 3 and e.value.source == str(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value)
    assert "Expecting value" in str(e.value)


def _std(**kw):
    return {**STANDARD[1], **kw}


def _conv(chosen):
    return {**CONVERSATIONAL[0], "chosen": chosen}


BAD_ROWS = {
    "misspelt_chosen": (
        {"prompt": "p", "choosen": " a", "rejected": " b"},
        "chosen",
        "did you mean 'chosen'",
    ),
    "misspelt_prompt": ({"promt": "p", "chosen": " a", "rejected": " b"}, "prompt", "'promt'"),
    "missing_rejected": ({"prompt": "p", "chosen": " a"}, "rejected", "missing column"),
    "non_string": (_std(chosen=3), "chosen", "expected a string"),
    "empty_completion": (_std(rejected="  "), "rejected", "empty completion"),
    "identical": (_std(rejected=STANDARD[1]["chosen"]), "rejected", "identical to chosen"),
    "no_common_prompt": ({"chosen": "Yes.", "rejected": "No."}, "prompt", "no common prefix"),
    "mixed_formats": (CONVERSATIONAL[0], "chosen", "mixed formats"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_standard_row_names_file_row_field(case, tok, tmp_path):
    bad, field, reason = BAD_ROWS[case]
    rows = STANDARD[:2] + [bad] + STANDARD[2:]
    path = write_jsonl(tmp_path / "train.jsonl", rows, blank_first=True)
    with pytest.raises(PreferenceDataError) as e:
        tokenize_pairs(str(path), tok)
    err = e.value
    assert (err.source, err.row, err.line, err.field) == (str(path), 2, 4, field)
    assert reason in err.reason
    assert str(err).startswith(f"{path}, row 2 (line 4), field '{field}': ")


BAD_MESSAGES = {
    "unknown_role": (
        _conv([{"role": "assitant", "content": "x"}]),
        "chosen",
        "did you mean 'assistant'",
    ),
    "missing_content": (_conv([{"role": "assistant"}]), "chosen", "missing 'content'"),
    "missing_role": (_conv([{"content": "x"}]), "chosen", "missing 'role'"),
    "empty_completion": (_conv([]), "chosen", "empty completion"),
    "string_among_messages": (_conv("It is blue."), "chosen", "mixed formats"),
    "bad_tools": ({**CONVERSATIONAL[1], "tools": "[not json"}, "tools", "invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_conversational_row_names_row_and_field(case, tok):
    bad, field, reason = BAD_MESSAGES[case]
    rows = copy.deepcopy(CONVERSATIONAL) + [bad, CONVERSATIONAL[1]]
    with pytest.raises(PreferenceDataError) as e:
        tokenize_pairs(rows, tok)  # plain rows: Arrow could not hold some of these
    assert (e.value.row, e.value.field) == (2, field)
    assert reason in e.value.reason and "row 2" in str(e.value)


def test_jsonl_rows_are_validated_as_written(tok, tmp_path):
    # Arrow would turn the missing key into content=None; the error must say what the file says
    rows = copy.deepcopy(CONVERSATIONAL) + [BAD_MESSAGES["missing_content"][0]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert isinstance(load_rows(str(path)).rows, datasets.Dataset)
    with pytest.raises(
        PreferenceDataError,
        match="row 2 \\(line 3\\), field 'chosen': message 0: missing 'content'",
    ):
        tokenize_pairs(str(path), tok)


def test_template_error_is_a_bad_row(tok):
    # a template that refuses system messages, as some models' templates do
    strict = tiny_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(PreferenceDataError) as e:
        tokenize_pairs(CONVERSATIONAL, strict)
    assert (e.value.row, e.value.field, e.value.kind) == (1, "prompt", "template_error")
    assert "no system role" in e.value.reason


# -- skip mode and the rejects file ---------------------------------------------------------------


def test_skip_writes_rejects_and_counts(tok, tmp_path):
    long_prompt = {"prompt": "Hello world, " * 10, "chosen": " a", "rejected": " b"}
    bad = [BAD_ROWS["empty_completion"][0], BAD_ROWS["identical"][0], long_prompt]
    rows = [STANDARD[0], bad[0], STANDARD[1], bad[1], STANDARD[2], bad[2]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    rejects = tmp_path / "out" / "rejects.jsonl"
    pairs = tokenize_pairs(
        str(path), tok, max_length=16, on_bad_row="skip", rejects_path=str(rejects)
    )
    good = [0, 2, 4]
    assert [pairs[i]["row"] for i in range(len(pairs))] == good
    assert pair_ids(pairs) == trl_prepare([rows[i] for i in good], tok, max_length=16)
    assert pairs.skipped == {"empty_completion": 1, "identical_pair": 1, "prompt_too_long": 1}
    assert pairs.num_skipped == 3
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["row"] for r in records] == [1, 3, 5]
    assert [r["line"] for r in records] == [2, 4, 6]
    assert [r["content"] for r in records] == bad
    assert [r["field"] for r in records] == ["rejected", "rejected", "prompt"]
    assert all(r["reason"] for r in records)
    assert not list(rejects.parent.glob("*.tmp*"))  # written through a temp file, then renamed


def test_skip_keeps_the_majority_format(tok):
    rows = STANDARD + [CONVERSATIONAL[0]]
    pairs = tokenize_pairs(rows, tok, on_bad_row="skip")
    assert len(pairs) == len(STANDARD) and pairs.format == "standard"
    assert pairs.skipped == {"mixed_format": 1} and pairs.rejects[0]["row"] == len(STANDARD)


# -- cache ---------------------------------------------------------------------------------------


@pytest.fixture
def count_calls(monkeypatch, tok):
    return count_tokenizer_calls(monkeypatch, tok)


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_cache_hit_does_not_retokenize(fmt, tok, tmp_path, count_calls):
    src = make_source("jsonl", FORMATS[fmt], tmp_path)
    cache = str(tmp_path / "cache")
    first = tokenize_pairs(src, tok, cache_dir=cache)
    assert count_calls["n"] > 0 and not first.from_cache
    count_calls["n"] = 0
    second = tokenize_pairs(src, tok, cache_dir=cache)
    assert count_calls["n"] == 0 and second.from_cache
    assert pair_ids(second) == pair_ids(first)
    for a, b in zip(first.lengths(), second.lengths(), strict=True):
        assert a.tolist() == b.tolist()
    # any change to what decides the ids is a miss
    tokenize_pairs(src, tok, cache_dir=cache, max_length=512)
    assert count_calls["n"] > 0
    assert len(list((tmp_path / "cache").glob("pairs-*.npz"))) == 2


def test_cache_key_follows_content_and_tokenizer(tok, tmp_path):
    cache = str(tmp_path / "cache")
    tokenize_pairs(datasets.Dataset.from_list(STANDARD), tok, cache_dir=cache)
    again = tokenize_pairs(datasets.Dataset.from_list(STANDARD), tok, cache_dir=cache)
    assert again.from_cache  # same content from a new object: a hit
    edited = copy.deepcopy(STANDARD)
    edited[0]["chosen"] = " so blue."
    assert not tokenize_pairs(edited, tok, cache_dir=cache).from_cache
    other = tiny_tokenizer(chat_template="{{ messages[0]['content'] }}")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert not tokenize_pairs(STANDARD, other, cache_dir=cache).from_cache


def test_cache_hit_rewrites_rejects(tok, tmp_path):
    rows = STANDARD + [BAD_ROWS["identical"][0]]
    cache, rejects = str(tmp_path / "cache"), tmp_path / "rejects.jsonl"
    kw = dict(on_bad_row="skip", rejects_path=str(rejects), cache_dir=cache)
    tokenize_pairs(rows, tok, **kw)
    rejects.unlink()
    hit = tokenize_pairs(rows, tok, **kw)
    assert hit.from_cache and hit.skipped == {"identical_pair": 1}
    assert json.loads(rejects.read_text())["row"] == len(STANDARD)


# -- small API details --------------------------------------------------------------------------


def test_tokenized_pairs_indexing(tok):
    pairs = tokenize_pairs(STANDARD, tok)
    assert pairs[-1] == pairs[len(pairs) - 1]
    with pytest.raises(IndexError):
        pairs[len(pairs)]
    p, c, r = pairs.lengths()
    assert p.tolist() == [len(x["prompt_ids"]) for x in pairs]
    assert c.tolist() == [len(x["chosen_ids"]) for x in pairs]
    assert r.tolist() == [len(x["rejected_ids"]) for x in pairs]


def test_split_and_error_pickling(tmp_path):
    dd = make_source("datasetdict", STANDARD, tmp_path)
    assert len(load_rows(dd, split="test")) == 1
    with pytest.raises(PreferenceDataError, match="no split 'dev'"):
        load_rows(dd, split="dev")
    err = PreferenceDataError("a.jsonl", 3, "chosen", "empty completion", line=5, kind="k")
    back = pickle.loads(pickle.dumps(err))
    assert (back.source, back.row, back.field, back.reason, back.line) == (
        "a.jsonl",
        3,
        "chosen",
        "empty completion",
        5,
    )
    assert str(back) == "a.jsonl, row 3 (line 5), field 'chosen': empty completion"


# -- sources and the default cache ------------------------------------------------------------


def test_streaming_source_is_not_implemented():
    stream = datasets.Dataset.from_list(STANDARD).to_iterable_dataset()
    with pytest.raises(NotImplementedError, match="streaming"):
        load_rows(stream)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CSD_FAST_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "pairs"
    monkeypatch.setenv("CSD_FAST_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.delenv("CSD_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "csd_fast" / "pairs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "csd_fast" / "pairs"


def test_second_run_hits_the_default_cache(tok, tmp_path, monkeypatch, count_calls):
    monkeypatch.setenv("CSD_FAST_CACHE", str(tmp_path / "c"))
    src = make_source("jsonl", STANDARD, tmp_path)
    assert not tokenize_pairs(src, tok).from_cache
    count_calls["n"] = 0
    again = tokenize_pairs(src, tok)  # cache_dir="auto" is the default
    assert again.from_cache and count_calls["n"] == 0
    (path,) = (tmp_path / "c" / "pairs").glob("pairs-*.npz")
    assert not tokenize_pairs(src, tok, cache_dir=None).from_cache  # None: no cache at all
    path.write_bytes(b"truncated")  # an unreadable cache is a miss, not a crash
    assert pair_ids(tokenize_pairs(src, tok)) == pair_ids(again)
