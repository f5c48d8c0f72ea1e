"""The data half of the method: `csd sample | score | translate` (pairs live in csd_fast.pairs).

    from csd_fast.sampling import read_samples
    samples = read_samples("runs/samples")        # a datasets.Dataset, one row per sample

Nothing in the training engine imports this package: vLLM stays optional for training, and
training optional for sampling. Each stage writes atomic Parquet shards plus a manifest
(`csd_fast.sampling.store`) and resumes after a crash where it stopped.
"""

from __future__ import annotations

from csd_fast.sampling.store import read_manifest, read_samples, read_table

__all__ = ["read_manifest", "read_samples", "read_table"]
