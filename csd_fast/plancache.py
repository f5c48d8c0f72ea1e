"""Token-budget epoch plans kept on disk, so the runs of a sweep plan each epoch once.

    plan = cached_epoch_plan(cache_dir, len(pairs), epoch, opts, costs, groups)

A plan is a pure function of (the pair costs, the CLO groups, the batching options, the epoch),
so the file is keyed by a digest of exactly those: another beta or learning rate reads the same
plan, another seed, budget, layout or data set gets its own. Count-based plans are a seeded
permutation (cheaper than a file read) and are never stored. Files are written atomically; an
unreadable one is planned again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from csd_fast.batching import BatchingOptions, epoch_plan

logger = logging.getLogger(__name__)


def plan_key(num_examples: int, epoch: int, opts: BatchingOptions, costs, groups) -> str:
    h = hashlib.sha256(json.dumps([1, num_examples, epoch, dataclasses.asdict(opts)]).encode())
    for a in (costs, groups):
        h.update(b"|" if a is None else np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def cached_epoch_plan(
    cache_dir: str | os.PathLike | None,
    num_examples: int,
    epoch: int,
    opts: BatchingOptions,
    costs: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[list[int]]:
    """`batching.epoch_plan`, read from / written to `cache_dir` for token-budget plans."""
    if cache_dir is None or not opts.max_tokens_per_batch:
        return epoch_plan(num_examples, epoch, opts, costs, groups)
    path = Path(cache_dir) / f"plan-{plan_key(num_examples, epoch, opts, costs, groups)}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                flat, offsets = z["flat"].tolist(), z["offsets"].tolist()
            return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        except Exception as e:  # truncated by a full disk, another version, ...
            logger.warning("%s: unreadable plan (%s), planning again", path, e)
    plan = epoch_plan(num_examples, epoch, opts, costs, groups)
    offsets = np.cumsum([0] + [len(b) for b in plan], dtype=np.int64)
    flat = np.fromiter((i for b in plan for i in b), np.int64, int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, flat=flat, offsets=offsets)
    os.replace(tmp, path)
    return plan
