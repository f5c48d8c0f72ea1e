"""Benchmarks: `python -m bench --help`. Run from the repo root; never installed."""
