"""The one error type of the data pipeline: every message names the file, the row and the field.

    >>> raise PreferenceDataError("data/train.jsonl", 17, "chosen", "empty completion", line=18)
    PreferenceDataError: data/train.jsonl, row 17 (line 18), field 'chosen': empty completion

Rows are 0-based dataset indices (what `dataset[i]` and `TokenizedPairs[i]["row"]` use); for JSONL
sources the 1-based line number is given too, because that is what an editor shows.
"""

from __future__ import annotations


class PreferenceDataError(ValueError):
    """A preference row (or a whole source) that cannot be used, with where and why."""

    def __init__(
        self,
        source: str,
        row: int | None,
        field: str | None,
        reason: str,
        *,
        line: int | None = None,
        kind: str = "invalid",
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        self.line = line
        self.kind = kind  # short category used for the skip counts, e.g. "empty_completion"
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.source]
        if self.row is not None:
            parts.append(f"row {self.row}" + (f" (line {self.line})" if self.line else ""))
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts) + f": {self.reason}"

    def __reduce__(self):  # keep the attributes when pickled (dataloader workers, multiprocessing)
        return (
            _rebuild,
            (self.source, self.row, self.field, self.reason, self.line, self.kind),
        )


def _rebuild(source, row, field, reason, line, kind) -> PreferenceDataError:
    return PreferenceDataError(source, row, field, reason, line=line, kind=kind)
