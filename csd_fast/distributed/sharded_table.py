"""`precompute_ref_log_probs` under FSDP: every rank scores its share, the table is gathered once.

Batch k goes to rank k % W. Every rank runs the same number of forwards (FSDP gathers weights
collectively), so ranks with fewer batches repeat their last one and drop its result. One
`all_gather_object` then gives every rank the whole table, in the single-process row order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from csd_fast.distributed.env import DistEnv
from csd_fast.refcache import RefLogpTable


def compute_table_sharded(
    examples: Sequence[dict],
    batches: list[list[int]],
    collate: Callable,
    score: Callable,
    device: torch.device,
    env: DistEnv,
) -> RefLogpTable:
    mine = list(range(env.rank, len(batches), env.world_size))
    rounds = -(-len(batches) // env.world_size)
    results: dict[int, tuple[list[float], list[float]]] = {}
    for r in range(rounds):
        k = mine[r] if r < len(mine) else (mine[-1] if mine else 0)
        group = [examples[i] for i in batches[k]]
        c, rej = score(collate(group).to(device))
        if r < len(mine):
            results[k] = (c.float().cpu().tolist(), rej.float().cpu().tolist())
    merged: dict[int, tuple[list[float], list[float]]] = {}
    for part in env.all_gather_objects(results):
        merged.update(part)
    rows, chosen, rejected = [], [], []
    for k, idx in enumerate(batches):
        c, rej = merged[k]
        rows.extend(int(examples[i].get("row", i)) for i in idx)
        chosen.extend(c)
        rejected.extend(rej)
    return RefLogpTable(
        np.asarray(rows, dtype=np.int64),
        np.asarray(chosen, dtype=np.float32),
        np.asarray(rejected, dtype=np.float32),
    )
