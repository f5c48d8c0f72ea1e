"""Cross-Lingual Optimization (CLO) pairs from English SFT examples and their translations.

    from csd_fast.data.clo import clo_pairs_from_translations
    rows = [{"id": 7, "lang": "en", "prompt": "Sky?", "response": "Blue."},
            {"id": 7, "lang": "de", "prompt": "Himmel?", "response": "Blau."}]
    pairs = clo_pairs_from_translations(rows)
    # [{"prompt": "Sky?",    "chosen": "Blue.", "rejected": "Blau.", "group": 7, "sft": False},
    #  {"prompt": "Himmel?", "chosen": "Blau.", "rejected": "Blue.", "group": 7, "sft": True}]
    tokenize_pairs(pairs, tokenizer)   # keeps group/sft per pair for the "clo" loss and planner

Lee et al., "Cross-Lingual Optimization for Language Transfer in LLMs": for the English prompt the
English response is chosen over the translated one; for the translated prompt the translated
response is chosen over the English one. Both pairs share the example id as `group` (the planner
keeps them in one micro-batch), and only the target-language pair has `sft=True`: the NLL term
trains on y_t given x_t, never on the English response. Prompts and responses may be strings or
message lists (conversational format); they are copied as given.
"""

from __future__ import annotations

from typing import Any

from csd_fast.data.sources import load_rows

_FIELDS = ("id", "lang", "prompt", "response")


def clo_pairs_from_translations(rows: Any, *, source_lang: str = "en") -> list[dict]:
    """Two CLO preference pairs per id, in the order the ids first appear.

    `rows`: anything `load_rows` takes (list of dicts, path, Dataset), each row
    {id, lang, prompt, response}; every id needs exactly one `source_lang` row and one row in
    one other language. Errors are `PreferenceDataError`s naming the file, row and field.
    """
    src = load_rows(rows)
    raw = src.raw if src.raw is not None else src.to_list()
    if not raw:
        raise src.error(None, None, "no rows", "empty_source")
    source: dict[Any, int] = {}  # id -> row of its English example
    target: dict[Any, int] = {}  # id -> row of its translation
    for i, r in enumerate(raw):
        for name in _FIELDS:
            if r.get(name) is None:
                raise src.error(i, name, f"missing; each row needs {', '.join(_FIELDS)}")
        key = r["id"]
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise src.error(i, "id", f"expected an int or str id, got {type(key).__name__}")
        side = source if r["lang"] == source_lang else target
        if key in side:
            what = f"{source_lang!r}" if side is source else "target-language"
            raise src.error(
                i,
                "lang",
                f"id {key!r} already has a {what} row (row {side[key]}); "
                f"each id needs exactly one {source_lang!r} row and one translation",
            )
        side[key] = i
    out: list[dict] = []
    for key in dict.fromkeys(r["id"] for r in raw):  # ids in first-seen order
        if key not in target:
            raise src.error(source[key], "id", f"id {key!r} has no translation row")
        if key not in source:
            raise src.error(target[key], "id", f"id {key!r} has no {source_lang!r} row")
        en, t = raw[source[key]], raw[target[key]]
        out.append(_pair(en["prompt"], en["response"], t["response"], key, sft=False))
        out.append(_pair(t["prompt"], t["response"], en["response"], key, sft=True))
    return out


def _pair(prompt, chosen, rejected, group, *, sft: bool) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": group, "sft": sft}
