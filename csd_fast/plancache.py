"""Token-budget epoch plans kept on disk, so the runs of a sweep plan each epoch once.

    plans = cached_rank_plans(cache_dir, len(pairs), epoch, opts, world_size, costs, groups)

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

from csd_fast.batching import BatchingOptions, rank_plans

logger = logging.getLogger(__name__)


def plan_key(num_examples: int, epoch: int, opts: BatchingOptions, world_size: int, costs,
             groups) -> str:  # fmt: skip
    blob = json.dumps([2, num_examples, epoch, world_size, dataclasses.asdict(opts)])
    h = hashlib.sha256(blob.encode())
    for a in (costs, groups):
        h.update(b"|" if a is None else np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def cached_rank_plans(
    cache_dir: str | os.PathLike | None,
    num_examples: int,
    epoch: int,
    opts: BatchingOptions,
    world_size: int = 1,
    costs: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[list[list[int]]]:
    """`batching.rank_plans` (plan[rank][micro]), read from / written to `cache_dir` for
    token-budget plans."""
    if cache_dir is None or not opts.max_tokens_per_batch:
        return rank_plans(num_examples, epoch, opts, world_size, costs, groups)
    key = plan_key(num_examples, epoch, opts, world_size, costs, groups)
    path = Path(cache_dir) / f"plan-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                flat, offsets, ranks = (z[k].tolist() for k in ("flat", "offsets", "ranks"))
            micro = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            return [micro[a:b] for a, b in zip(ranks[:-1], ranks[1:], strict=True)]
        except Exception as e:  # truncated by a full disk, another version, ...
            logger.warning("%s: unreadable plan (%s), planning again", path, e)
    plans = rank_plans(num_examples, epoch, opts, world_size, costs, groups)
    micro = [b for plan in plans for b in plan]
    offsets = np.cumsum([0] + [len(b) for b in micro], dtype=np.int64)
    ranks = np.cumsum([0] + [len(p) for p in plans], dtype=np.int64)
    flat = np.fromiter((i for b in micro for i in b), np.int64, int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, flat=flat, offsets=offsets, ranks=ranks)
    os.replace(tmp, path)
    return plans
