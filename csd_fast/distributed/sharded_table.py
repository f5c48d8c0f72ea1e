"""`precompute_ref_log_probs` under FSDP, no store: every rank scores its share, gathered once.

Batch k goes to rank k % W. Every rank runs the same number of forwards (FSDP gathers weights
collectively), so ranks with fewer batches score a stand-in batch and drop its result. One
`all_gather_object` then gives every rank the whole table, in the single-process row order.
(With `ref_cache_dir`, `csd_fast.refcache.reference_table` shards by store shard instead.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from csd_fast.distributed.env import DistEnv
from csd_fast.refcache import RefLogpTable


def compute_table_sharded(
    num_rows: int,
    batch_size: int,
    score: Callable[[list[int]], dict[str, np.ndarray]],
    env: DistEnv,
    ld_alpha: float | None = None,
) -> RefLogpTable:
    """`score(positions)` -> table columns of those positions (one forward per batch_size)."""
    batches = [
        list(range(i, min(i + batch_size, num_rows))) for i in range(0, num_rows, batch_size)
    ]
    mine = list(range(env.rank, len(batches), env.world_size))
    rounds = -(-len(batches) // env.world_size)
    results: dict[int, dict[str, np.ndarray]] = {}
    for r in range(rounds):
        if r < len(mine):
            results[mine[r]] = score(batches[mine[r]])
        else:
            score(batches[-1])  # a stand-in forward: the other ranks' collectives need it
    merged: dict[int, dict[str, np.ndarray]] = {}
    for part in env.all_gather_objects(results):
        merged.update(part)
    parts = [merged[k] for k in range(len(batches))]
    columns = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    if ld_alpha is not None:
        columns["ld_alpha"] = np.asarray(float(ld_alpha))
    return RefLogpTable(columns)
