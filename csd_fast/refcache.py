"""Reference log-probs computed once: in memory for a run, on disk across runs and sweeps.

`precompute_ref_log_probs=True` scores every pair with the reference model before training and
keeps `(ref_chosen_logps, ref_rejected_logps)` per dataset row, so no reference forward runs
during training (and, without PEFT, no reference copy stays in memory).

With `ref_cache_dir` the table is also written to disk under a fingerprint of everything that
determines it: the reference weights, the tokenized pairs, truncation and the log-prob options.
A sweep over beta, loss type or learning rate with the same reference and data computes the
table once; a changed model or dataset gets a new file, never a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

CACHE_VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes) of the reference.

    FSDP-sharded tensors are gathered whole first (every rank, in the same sorted order), so
    the hash is the same on every rank and equal to the unsharded model's."""
    from csd_fast.distributed.fsdp import full_tensor

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = full_tensor(t.detach())
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pairs_fingerprint(examples: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(np.asarray(ex[key], dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(str(ex.get("row", "")).encode())
    return h.hexdigest()


def cache_key(model_fp: str, data_fp: str, options: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "m": model_fp, "d": data_fp, **options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class RefLogpTable:
    """Reference log-probs per dataset row: `table[row] -> (chosen, rejected)`."""

    def __init__(self, rows: np.ndarray, chosen: np.ndarray, rejected: np.ndarray):
        self.rows, self.chosen, self.rejected = rows, chosen, rejected
        self._index = {int(r): i for i, r in enumerate(rows)}

    def __contains__(self, row: int) -> bool:
        return int(row) in self._index

    def __getitem__(self, row: int) -> tuple[float, float]:
        i = self._index[int(row)]
        return float(self.chosen[i]), float(self.rejected[i])

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, rows=self.rows, chosen=self.chosen, rejected=self.rejected)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RefLogpTable:
        with np.load(path) as z:
            return cls(z["rows"], z["chosen"], z["rejected"])


def compute_table(
    examples: Sequence[dict],
    batches: list[list[int]],
    collate: Callable,
    score: Callable,
    device: torch.device,
) -> RefLogpTable:
    """Score `examples` in the given micro-batches with `score(batch) -> (chosen, rejected)`."""
    rows, chosen, rejected = [], [], []
    for idx in batches:
        group = [examples[i] for i in idx]
        c, r = score(collate(group).to(device))
        rows.extend(int(ex.get("row", i)) for ex, i in zip(group, idx, strict=True))
        chosen.extend(c.float().cpu().tolist())
        rejected.extend(r.float().cpu().tolist())
    return RefLogpTable(
        np.asarray(rows, dtype=np.int64),
        np.asarray(chosen, dtype=np.float32),
        np.asarray(rejected, dtype=np.float32),
    )


def cached_table(
    cache_dir: str | Path | None,
    key_parts: Callable[[], tuple[str, str, dict]],
    build: Callable[[], RefLogpTable],
) -> tuple[RefLogpTable, str]:
    """Load the table for this fingerprint from `cache_dir`, or build and store it.

    Returns the table and 'hit', 'miss' or 'memory' (no cache_dir) for the log.
    """
    if cache_dir is None:
        return build(), "memory"
    model_fp, data_fp, options = key_parts()
    path = Path(cache_dir) / f"ref_logps-{cache_key(model_fp, data_fp, options)}.npz"
    if path.exists():
        from csd_fast.errors import corrupt_file

        with corrupt_file(path, fix="delete it (it is recomputed on the next run)"):
            return RefLogpTable.load(path), "hit"
    table = build()
    table.save(path)
    return table, "miss"
