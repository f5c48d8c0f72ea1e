"""Data: loading TRL-format preference sources, validation and tokenization."""

from __future__ import annotations

from csd_fast.data.clo import clo_pairs_from_translations
from csd_fast.data.errors import PreferenceDataError
from csd_fast.data.formats import (
    ALLOWED_ROLES,
    Format,
    Validated,
    check_row,
    extract_prompt,
    validate_rows,
)
from csd_fast.data.sources import RowSource, load_rows
from csd_fast.data.tokenize import (
    TokenizedPairs,
    default_cache_dir,
    tokenize_pairs,
    tokenizer_fingerprint,
)

__all__ = [
    "ALLOWED_ROLES",
    "Format",
    "PreferenceDataError",
    "RowSource",
    "TokenizedPairs",
    "Validated",
    "check_row",
    "clo_pairs_from_translations",
    "default_cache_dir",
    "extract_prompt",
    "load_rows",
    "tokenize_pairs",
    "tokenizer_fingerprint",
    "validate_rows",
]
