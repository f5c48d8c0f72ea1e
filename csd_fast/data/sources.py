"""Load preference rows from JSONL, JSON, Parquet, a `datasets` object or a `save_to_disk` folder.

    from csd_fast.data import load_rows
    rows = load_rows("data/train.jsonl")          # or .parquet, a Dataset, a DatasetDict, a folder
    rows.name, len(rows), rows[0], rows.where(17)  # -> "data/train.jsonl", ..., "row 17 (line 18)"

JSONL is parsed here line by line rather than by `datasets`, so a broken line is reported with its
file and 1-based line number instead of an Arrow error about a block. The parsed rows are then
turned into a `datasets.Dataset` when Arrow accepts them, so nested message lists get the shape
(struct fields unified, missing keys as None) they would have after `load_dataset("json")`. When
Arrow refuses (a column that is a string in one row and a list in another) or the rows do not all
have the same keys, the plain rows are kept and the validator names the offending row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from csd_fast.data.errors import PreferenceDataError

_JSON_EXT = (".jsonl", ".json", ".ndjson")
_PARQUET_EXT = (".parquet", ".pq")


@dataclass
class RowSource:
    """Preference rows plus where they came from, so every error can name the file."""

    rows: Any  # datasets.Dataset, or list[dict] when Arrow could not hold the rows
    name: str  # the file / folder path, or "<Dataset>"
    lines: list[int] | None = None  # 1-based line of each row (JSONL sources only)
    content_hash: str | None = field(default=None, repr=False)  # sha256 of the file bytes
    # the rows exactly as parsed (JSONL): validated and written to the rejects file as the user
    # wrote them, since Arrow turns a missing message key into None
    raw: list[dict] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    @property
    def column_names(self) -> list[str]:
        if hasattr(self.rows, "column_names"):
            return list(self.rows.column_names)
        names: dict[str, None] = {}
        for r in self.rows:
            names.update(dict.fromkeys(r))
        return list(names)

    def line_of(self, i: int) -> int | None:
        return self.lines[i] if self.lines is not None else None

    def where(self, i: int) -> str:
        line = self.line_of(i)
        return f"row {i}" + (f" (line {line})" if line else "")

    def error(self, i: int | None, field: str | None, reason: str, kind: str = "invalid"):
        """A `PreferenceDataError` located at row `i` of this source."""
        line = self.line_of(i) if i is not None else None
        return PreferenceDataError(self.name, i, field, reason, line=line, kind=kind)

    def to_list(self) -> list[dict]:
        return self.rows.to_list() if hasattr(self.rows, "to_list") else list(self.rows)

    def fingerprint(self, rows: list[dict] | None = None) -> str:
        """sha256 of the content: the file bytes, or the rows serialised with sorted keys."""
        if self.content_hash is not None:
            return self.content_hash
        h = hashlib.sha256()
        for r in rows if rows is not None else self.to_list():
            h.update(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()


def load_rows(source: Any, *, split: str = "train") -> RowSource:
    """Rows of a path (.jsonl / .json / .parquet / save_to_disk folder) or of a dataset."""
    if isinstance(source, RowSource):
        return source
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return RowSource(_pick_split(source, split, "<DatasetDict>"), f"<DatasetDict>[{split}]")
    if isinstance(source, datasets.Dataset):
        return RowSource(source, "<Dataset>")
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        # a RowSource is a whole set (lengths, row ids); DPOTrainer reads streams chunk by chunk
        raise NotImplementedError(
            f"load_rows needs a whole set, not a stream ({type(source).__name__}): pass the "
            "stream to DPOTrainer directly (csd_fast.streaming), or materialise it with "
            "datasets.Dataset.from_generator(lambda: iter(ds), features=ds.features)"
        )
    if isinstance(source, (list, tuple)) and all(isinstance(r, dict) for r in source):
        return RowSource(list(source), "<list>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "load_rows takes a path, a datasets.Dataset or a DatasetDict, "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _load_saved(path, split)
    lower = path.lower()
    if lower.endswith(_PARQUET_EXT):
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow.ArrowInvalid & co: truncated, or not Parquet at all
            raise PreferenceDataError(
                path,
                None,
                None,
                f"not a readable Parquet file ({type(e).__name__}: {str(e)[:160]}); it is "
                "truncated or not Parquet: write it again (e.g. Dataset.to_parquet)",
            ) from e
        return RowSource(
            datasets.Dataset(InMemoryTable(table)), path, content_hash=_file_hash(path)
        )
    if lower.endswith(_JSON_EXT):
        rows, lines = _read_json(path)
        return RowSource(
            _as_dataset(rows), path, lines=lines, content_hash=_file_hash(path), raw=rows
        )
    raise PreferenceDataError(
        path,
        None,
        None,
        "unknown file type: expected .jsonl, .json, .parquet or a save_to_disk folder",
    )


def _pick_split(dd, split: str, name: str):
    if split not in dd:
        raise PreferenceDataError(name, None, None, f"no split {split!r}; splits: {sorted(dd)}")
    return dd[split]


def _load_saved(path: str, split: str) -> RowSource:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise PreferenceDataError(path, None, None, f"not a save_to_disk folder ({e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        return RowSource(_pick_split(loaded, split, path), f"{path}[{split}]")
    return RowSource(loaded, path)


def _read_json(path: str) -> tuple[list[dict], list[int]]:
    """Rows of a JSON Lines file (or a .json file holding one array), with their 1-based lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(
                path, None, None, f"invalid JSON: {e.msg}", line=e.lineno
            ) from e
        rows, lines = [], []
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise PreferenceDataError(
                    path, i, None, f"expected a JSON object, got {type(obj).__name__}"
                )
            rows.append(obj)
        return rows, lines or None  # an array has no meaningful per-row lines
    rows, lines = [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, spacing) are not rows
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(
                path, None, None, f"invalid JSON: {e.msg} (column {e.colno})", line=lineno
            ) from e
        if not isinstance(obj, dict):
            raise PreferenceDataError(
                path, None, None, f"expected a JSON object, got {type(obj).__name__}", line=lineno
            )
        rows.append(obj)
        lines.append(lineno)
    return rows, lines


def _as_dataset(rows: list[dict]):
    import datasets
    import pyarrow as pa

    # from_list takes its columns from the first row only: rows with other keys would lose them
    # (a misspelt 'choosen' would vanish into chosen=None), so such sources stay plain rows
    if not rows or any(r.keys() != rows[0].keys() for r in rows):
        return rows
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        return rows  # mixed types across rows: keep them as parsed, validation names the row


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
