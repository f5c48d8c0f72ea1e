"""Data: loading TRL-format preference sources, validation and tokenization."""
