"""Tokenize preference rows into (prompt_ids, chosen_ids, rejected_ids), exactly as TRL 1.16 does.

    from csd_fast.data import tokenize_pairs
    pairs = tokenize_pairs("data/train.jsonl", tokenizer, max_length=1024, on_bad_row="skip",
                           rejects_path="rejects.jsonl")   # cached under default_cache_dir()
    pairs[0]           # {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...], "row": 0}
                       # (+ "group": int and "sft": bool when the source has those CLO columns,
                       #  "lang": str when it has a `lang` column)
    pairs.lengths()    # (prompt, chosen, rejected) token counts as numpy arrays, for packing
    pairs.groups()     # (n,) int64 CLO example id per pair, or None
    pairs.skipped      # {"empty_completion": 3, "prompt_too_long": 1}

The cache (`cache_dir="auto"`, the default) lives in $CSD_FAST_CACHE/pairs, else
$XDG_CACHE_HOME/csd_fast/pairs, else ~/.cache/csd_fast/pairs; `cache_dir=None` turns it off. Its
key is the source content, the tokenizer and the options, so an edit to either is a miss.

Same steps as `DPOTrainer._prepare_dataset`: implicit prompts extracted; EOS appended to plain-text
completions that lack it; conversational prompts rendered with `add_generation_prompt=True` (with
the row's `tools` / `chat_template_kwargs`); the completion starts where the tokenized prompt and
the tokenized prompt+completion diverge (the smaller of the two divergence points for chosen and
rejected). Ids are NOT truncated here: `csd_fast.batch.truncate_pair` does it in the collator.

Where TRL silently drops a row (prompt alone >= max_length under keep_start), this module treats it
as a bad row like any validation failure: `on_bad_row="error"` raises a `PreferenceDataError`,
`"skip"` counts it in `skipped` and writes it, with its reason, to `rejects_path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csd_fast.data.errors import PreferenceDataError
from csd_fast.data.formats import Format, extract_prompt, validate_rows
from csd_fast.data.sft import is_sft_rows, tokenize_sft_rows
from csd_fast.data.sources import RowSource, load_rows

logger = logging.getLogger(__name__)

# bump when the tokenization rules or the stored fields change, so old caches are never read
_CACHE_VERSION = 3  # 2: CLO group/sft columns stored; 3: lang column, SFT formats
_BATCH = 1024  # rows per batched tokenizer call for plain text
_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class TokenizedPairs:
    """Tokenized pairs stored flat: pair k's X ids are `flat[X][offsets[X][k]:offsets[X][k+1]]`."""

    flat: dict[str, np.ndarray]  # "prompt" / "chosen" / "rejected" -> (total_tokens,) int32
    offsets: dict[str, np.ndarray]  # same keys -> (n + 1,) int64
    rows: np.ndarray  # (n,) int64 source row of each pair
    source: str = "<Dataset>"
    format: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # bad-row kind -> count
    rejects: list[dict] = field(default_factory=list)  # one record per skipped row
    fingerprint: str = ""
    from_cache: bool = False
    group: np.ndarray | None = None  # (n,) int64 CLO example id of each pair (None: no column)
    sft: np.ndarray | None = None  # (n,) bool, pair's chosen feeds the NLL term (None: no column)
    lang: np.ndarray | None = None  # (n,) str, the prompt's language (None: no column)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range for {n} pairs")
        i %= n
        out: dict[str, Any] = {}
        for k in _KEYS:
            lo, hi = self.offsets[k][i], self.offsets[k][i + 1]
            out[f"{k}_ids"] = self.flat[k][lo:hi].tolist()
        out["row"] = int(self.rows[i])
        if self.group is not None:
            out["group"] = int(self.group[i])
        if self.sft is not None:
            out["sft"] = bool(self.sft[i])
        if self.lang is not None:
            out["lang"] = str(self.lang[i])
        return out

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen, rejected) token counts, each (n,) int64, untruncated."""
        return tuple(np.diff(self.offsets[k]) for k in _KEYS)  # type: ignore[return-value]

    @property
    def is_sft(self) -> bool:
        """SFT rows (prompt/completion, messages, text): every rejected side is empty."""
        return self.format.startswith("sft")

    def groups(self) -> np.ndarray | None:
        """(n,) int64 CLO example id of each pair, for keeping a group in one micro-batch."""
        return self.group

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def save(self, path: str) -> None:
        """One .npz file, written atomically (tmp + os.replace) so a crash never leaves half."""
        meta = {
            "source": self.source,
            "format": self.format,
            "skipped": self.skipped,
            "rejects": self.rejects,
            "fingerprint": self.fingerprint,
            "version": _CACHE_VERSION,
        }
        arrays = {f"{k}_flat": self.flat[k] for k in _KEYS}
        arrays.update({f"{k}_offsets": self.offsets[k] for k in _KEYS})
        arrays.update(
            {
                k: v
                for k, v in (("group", self.group), ("sft", self.sft), ("lang", self.lang))
                if v is not None
            }
        )
        meta_json = json.dumps(meta, default=str, ensure_ascii=False)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, rows=self.rows, meta=np.array(meta_json), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> TokenizedPairs:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(
                flat={k: z[f"{k}_flat"] for k in _KEYS},
                offsets={k: z[f"{k}_offsets"] for k in _KEYS},
                rows=z["rows"],
                source=meta["source"],
                format=meta["format"],
                skipped=meta["skipped"],
                rejects=meta["rejects"],
                fingerprint=meta["fingerprint"],
                from_cache=True,
                group=z["group"] if "group" in z.files else None,
                sft=z["sft"] if "sft" in z.files else None,
                lang=z["lang"] if "lang" in z.files else None,
            )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: vocab, merges, normalizer, post-processor, template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best stand-in we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def default_cache_dir() -> Path | None:
    """Where `cache_dir="auto"` keeps tokenized pairs; None when CSD_FAST_CACHE is "" or "off".

    $CSD_FAST_CACHE/pairs if that is set, else $XDG_CACHE_HOME/csd_fast/pairs, else
    ~/.cache/csd_fast/pairs.
    """
    env = os.environ.get("CSD_FAST_CACHE")
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "false"):
            return None
        return Path(env).expanduser() / "pairs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "csd_fast" / "pairs"


def tokenize_pairs(
    rows: Any,
    tokenizer,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    on_bad_row: str = "error",
    rejects_path: str | None = None,
    cache_dir: str | os.PathLike | None = "auto",
    drop_fully_truncated: bool = False,
) -> TokenizedPairs:
    """Validate, then tokenize every pair of `rows` (a RowSource or anything load_rows takes).

    `cache_dir`: "auto" (default_cache_dir()), a folder, or None for no cache.
    `drop_fully_truncated`: rows whose prompt alone fills max_length are skipped (and recorded
    in the rejects) even when on_bad_row="error", as TRL drops them.
    """
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(
            f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}"
        )
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    src = load_rows(rows)
    py_rows = src.to_list()

    auto = isinstance(cache_dir, str) and cache_dir == "auto"
    if auto:
        cache_dir = default_cache_dir()
    cache_path = None
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        key = json.dumps(
            [
                _CACHE_VERSION,
                src.fingerprint(py_rows),
                tokenizer_fingerprint(tokenizer),
                max_length,
                truncation_mode,
                on_bad_row,
            ]
            + ([True] if drop_fully_truncated else [])
        )
        fp = hashlib.sha256(key.encode()).hexdigest()
        cache_path = os.path.join(cache_dir, f"pairs-{fp[:40]}.npz")
        if os.path.exists(cache_path):
            try:
                out = TokenizedPairs.load(cache_path)
            except Exception as e:  # truncated by a full disk, written by another version, ...
                logger.warning("%s: unreadable cache (%s), tokenizing again", cache_path, e)
            else:
                out.source = src.name
                _report_skips(out, len(py_rows), rejects_path)  # a cache hit says it too
                _write_rejects(out.rejects, rejects_path)
                return out

    raw = src.raw if src.raw is not None else py_rows
    if is_sft_rows(raw):  # prompt/completion, messages or text: pairs with an empty rejected
        if not raw:
            raise src.error(None, None, "no rows", "empty_source")
        toks, bad, fmt_name = tokenize_sft_rows(
            src,
            raw,
            tokenizer,
            max_length=max_length,
            truncation_mode=truncation_mode,
            on_bad_row=on_bad_row,
        )
    else:
        checked = validate_rows(src, raw, on_bad_row=on_bad_row)
        toks, more_bad = _tokenize_rows(
            src,
            py_rows,
            checked.good,
            checked.format,
            tokenizer,
            max_length,
            truncation_mode,
            on_bad_row,
            drop_fully_truncated,
        )
        bad = list(checked.rejects) + more_bad
        fmt_name = checked.format.name if checked.format is not None else ""
    bad = sorted(bad, key=lambda e: e.row if e.row is not None else -1)
    rejects = [
        {
            "row": e.row,
            "line": e.line,
            "field": e.field,
            "kind": e.kind,
            "reason": e.reason,
            "content": raw[e.row] if e.row is not None else None,
        }
        for e in bad
    ]
    out = _pack(toks, src.name, fmt_name, rejects)
    out.group, out.sft = _clo_columns(raw, out.rows)
    if len(out.rows) and raw[int(out.rows[0])].get("lang") is not None:
        out.lang = np.array([str(raw[i]["lang"]) for i in out.rows.tolist()], dtype=np.str_)
    _report_skips(out, len(py_rows), rejects_path)
    _write_rejects(rejects, rejects_path)
    if cache_path is not None:
        out.fingerprint = os.path.basename(cache_path)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            out.save(cache_path)
        except OSError as e:
            if not auto:
                raise
            # a read-only home must not stop training: the cache only saves time
            logger.warning("could not write the tokenization cache %s: %s", cache_path, e)
    return out


def _clo_columns(raw: list[dict], rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-pair (group, sft) arrays from the source rows' CLO columns, or None where absent.

    Int group ids are kept as given (logs and the user's data agree); str ids are numbered in
    first-seen order over the whole source, so skipping a row never renumbers the others.
    Validation has already made each column all-or-nothing and of one type over the kept rows.
    """
    group = sft = None
    if len(rows) and raw[int(rows[0])].get("group") is not None:
        ids: dict[str, int] = {}
        for r in raw:
            g = r.get("group")
            if isinstance(g, str):
                ids.setdefault(g, len(ids))
        vals = [raw[i]["group"] for i in rows.tolist()]
        group = np.array([ids[g] if isinstance(g, str) else g for g in vals], dtype=np.int64)
    if len(rows) and raw[int(rows[0])].get("sft") is not None:
        sft = np.array([bool(raw[i]["sft"]) for i in rows.tolist()], dtype=bool)
    return group, sft


def _tokenize_rows(
    src: RowSource,
    py_rows: list[dict],
    good: list[int],
    fmt: Format | None,
    tokenizer,
    max_length: int | None,
    truncation_mode: str,
    on_bad_row: str,
    drop_fully_truncated: bool = False,
) -> tuple[list[tuple[int, list[int], list[int], list[int]]], list[PreferenceDataError]]:
    """(row, prompt_ids, chosen_ids, rejected_ids) of each good row, and the rows that failed here.

    With on_bad_row="error" the first failure raises at once, so a broken template costs one row.
    """
    stop = on_bad_row == "error"
    if fmt is None or not good:
        return [], []
    examples = [py_rows[i] for i in good]
    if fmt.implicit_prompt:
        examples = [extract_prompt(ex) for ex in examples]
    if fmt.conversational:
        encoded, bad = _encode_conversational(src, good, examples, tokenizer, stop)
    else:
        encoded, bad = _encode_text(good, examples, tokenizer), []

    out = []
    for i, p, pc, pr in encoded:
        # the completion starts where prompt and prompt+completion first differ (a template may
        # render the prompt alone differently, or tokens may merge across the boundary)
        n = min(_common_prefix(p, pc), _common_prefix(p, pr))
        prompt_ids, chosen_ids, rejected_ids = p[:n], pc[n:], pr[n:]
        err = None
        if max_length is not None and truncation_mode == "keep_start" and n >= max_length:
            err = src.error(
                i,
                "prompt",
                f"prompt is {n} tokens, >= max_length {max_length}: keep_start truncation "
                "would leave no completion token",
                "prompt_too_long",
            )
        elif not chosen_ids or not rejected_ids:
            empty = "chosen" if not chosen_ids else "rejected"
            err = src.error(i, empty, "completion has no tokens", "empty_completion_tokens")
        if err is not None:
            if stop and not (drop_fully_truncated and err.kind == "prompt_too_long"):
                raise err
            bad.append(err)
            continue
        out.append((i, prompt_ids, chosen_ids, rejected_ids))
    bad.sort(key=lambda e: e.row)
    return out, bad


def _encode_text(good: list[int], examples: list[dict], tokenizer):
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: TRL appends it to every text completion")
    texts: dict[str, list[str]] = {k: [] for k in _KEYS}
    for ex in examples:
        texts["prompt"].append(ex["prompt"])
        for k in ("chosen", "rejected"):
            c = ex[k] if ex[k].endswith(eos) else ex[k] + eos
            texts[k].append(ex["prompt"] + c)
    ids: dict[str, list[list[int]]] = {k: [] for k in _KEYS}
    for k in _KEYS:
        # batched calls give the same ids as TRL's one-text calls, much faster
        for s in range(0, len(texts[k]), _BATCH):
            ids[k].extend(tokenizer(text=texts[k][s : s + _BATCH])["input_ids"])
    return [(i, ids["prompt"][j], ids["chosen"][j], ids["rejected"][j]) for j, i in enumerate(good)]


def _encode_conversational(
    src: RowSource, good: list[int], examples: list[dict], tokenizer, stop: bool
):
    encoded, bad = [], []
    for i, ex in zip(good, examples, strict=True):
        tools = ex.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(ex.get("chat_template_kwargs") or {})}
        field = "prompt"
        try:
            p = _chat_ids(tokenizer, ex["prompt"], add_generation_prompt=True, **kwargs)
            field = "chosen"
            pc = _chat_ids(tokenizer, ex["prompt"] + ex["chosen"], **kwargs)
            field = "rejected"
            pr = _chat_ids(tokenizer, ex["prompt"] + ex["rejected"], **kwargs)
        except Exception as e:  # jinja raises its own types (TemplateError, TypeError, ...)
            err = src.error(
                i, field, f"chat template failed: {type(e).__name__}: {e}", "template_error"
            )
            if stop:
                raise err from e
            bad.append(err)
            continue
        encoded.append((i, p, pc, pr))
    return encoded, bad


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _pack(toks, source: str, fmt_name: str, rejects: list[dict]) -> TokenizedPairs:
    flat, offsets = {}, {}
    for j, k in enumerate(_KEYS):
        seqs = [t[j + 1] for t in toks]
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets[k] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat[k] = np.fromiter(
            (x for s in seqs for x in s), dtype=np.int32, count=int(offsets[k][-1])
        )
    return TokenizedPairs(
        flat=flat,
        offsets=offsets,
        rows=np.array([t[0] for t in toks], dtype=np.int64),
        source=source,
        format=fmt_name,
        skipped=dict(Counter(r["kind"] for r in rejects)),
        rejects=rejects,
    )


def _report_skips(out: TokenizedPairs, total: int, rejects_path) -> None:
    if out.rejects:
        logger.warning(
            "%s: skipped %d of %d rows %s%s%s",
            out.source,
            len(out.rejects),
            total,
            dict(out.skipped),
            " (tokenization cache)" if out.from_cache else "",
            f"; see {rejects_path}" if rejects_path else "",
        )


def _write_rejects(rejects: list[dict], path: str | None) -> None:
    """Every rejected row with its reason and original content, as JSONL, written atomically."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
