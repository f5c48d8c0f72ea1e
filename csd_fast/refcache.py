"""Reference log-probs computed once: in memory for a run, on disk across runs and sweeps.

`precompute_ref_log_probs=True` scores every pair with the reference model before training and
keeps a table per dataset row, so no reference forward runs during training (and, without PEFT,
no reference copy stays in memory). The table holds everything any loss type and the logged
metrics read from the reference (`csd_fast.refstore.COLUMNS`): the summed chosen / rejected
log-probs, the LD-DPO tails (so every `ld_alpha` is served from one table) and the token counts.

With `ref_cache_dir` the table lives in a sharded store (`csd_fast.refstore`) under the digest of
its fingerprint components (`fingerprint_components`): the reference weights, the tokenizer, the
tokenized data, max_length, truncation, the layout, the head, the attention implementation, the
parameter and autocast dtypes and the device type. A sweep over beta, loss type, learning rate or
ld_alpha computes it once; anything else gets a new table, and the log names what differs from
the nearest existing one (`ref_cache_strict=True` raises instead of computing).

    table, report = reference_table(pairs, split="train", root="cache/ref",
                                    components=lambda: {...}, score=score_positions)
    chosen, rejected = table.lookup(rows, ld_alpha=None)     # (P,) fp32 each
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from csd_fast.refstore import (
    COLUMN_DTYPES,
    COLUMNS,
    LD_COLUMNS,
    RefStore,
    StoreError,
    StoreReport,
    closest_table,
)


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


def path_fingerprint(path: str | Path) -> str | None:
    """sha256 of a saved model directory's weights and config, without loading it (None: not a
    local directory). A separate reference given by path is identified this way, so a complete
    table never needs the model in memory."""
    path = Path(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256(b"files")
    files = sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        with open(p, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def pairs_fingerprint(examples: Sequence[dict]) -> str:
    """sha256 of the token ids and row ids of a tokenized set (any sequence of pair dicts; a
    `TokenizedPairs` is hashed from its flat arrays, same digest, no Python loop)."""
    flat = getattr(examples, "flat", None)
    if flat is not None:
        ids = {k: np.asarray(flat[k], dtype=np.int64) for k in ("prompt", "chosen", "rejected")}
        offsets = {k: np.asarray(examples.offsets[k], dtype=np.int64) for k in ids}
        rows = np.asarray(examples.rows, dtype=np.int64)
    else:
        ids, offsets = {}, {}
        for k in ("prompt", "chosen", "rejected"):
            seqs = [np.asarray(ex[f"{k}_ids"], dtype=np.int64) for ex in examples]
            ids[k] = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
            offsets[k] = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        rows = np.asarray([int(ex.get("row", i)) for i, ex in enumerate(examples)], np.int64)
    h = hashlib.sha256(b"pairs-v2")
    for k in ids:
        h.update(ids[k].tobytes())
        h.update(offsets[k].tobytes())
    h.update(rows.tobytes())
    return h.hexdigest()


def fingerprint_components(
    *,
    model: str,
    tokenizer: str,
    data: str,
    max_length: int | None,
    truncation_mode: str,
    layout: str,
    head_impl: str,
    attention: str | None,
    dtype: str,
    autocast: str,
    device: str,
    quantization: str | None = None,
) -> dict[str, str]:
    """Everything that decides a reference table, by name (the names a mismatch reports).
    `quantization`: a bitsandbytes reference's config (csd_fast.quantization.quantization_key);
    absent for a full-precision one, so the ids of existing stores stay as they were."""
    extra = {} if quantization is None else {"quantization": quantization}
    return {
        **extra,
        "model": model,
        "tokenizer": tokenizer,
        "data": data,
        "max_length": str(max_length),
        "truncation": truncation_mode,
        "layout": layout,
        "head_impl": head_impl,
        "attention": str(attention),
        "dtype": dtype,
        "autocast": autocast,
        "device": device,
    }


def device_kind(device: torch.device) -> str:
    """'cpu', 'cuda' or 'rocm' (ROCm builds report cuda devices; their numerics differ)."""
    if device.type == "cuda" and getattr(torch.version, "hip", None):
        return "rocm"
    return device.type


class RefLogpTable:
    """Reference columns per dataset row (`COLUMNS`); `table[row] -> (chosen, rejected)`."""

    def __init__(self, columns: dict[str, np.ndarray]):
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"reference table lacks columns {missing}")
        self.columns = columns
        self.rows = columns["rows"]
        alpha = columns.get("ld_alpha")
        self.ld_alpha = None if alpha is None else float(alpha)  # alpha of the exact LD sums
        self._index = {int(r): i for i, r in enumerate(self.rows)}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, row: int) -> bool:
        return int(row) in self._index

    def positions(self, rows: Sequence[int]) -> np.ndarray:
        try:
            return np.fromiter((self._index[int(r)] for r in rows), np.int64, len(rows))
        except KeyError as e:
            raise KeyError(f"dataset row {e.args[0]} is not in the reference table") from None

    def lookup(self, rows: Sequence[int], ld_alpha: float | None = None) -> tuple[Tensor, Tensor]:
        """(ref_chosen_logps, ref_rejected_logps) of `rows`, fp32; LD-DPO-weighted when
        `ld_alpha` is set (tokens past the shorter completion count ld_alpha times)."""
        i = self.positions(rows)
        c = self.columns["ref_chosen_logps"][i]
        r = self.columns["ref_rejected_logps"][i]
        if ld_alpha is not None and ld_alpha == self.ld_alpha:  # summed as the policy's are
            c, r = self.columns[LD_COLUMNS[0]][i], self.columns[LD_COLUMNS[1]][i]
        elif ld_alpha is not None:
            c = c - np.float32(1.0 - ld_alpha) * self.columns["ref_chosen_tail_logps"][i]
            r = r - np.float32(1.0 - ld_alpha) * self.columns["ref_rejected_tail_logps"][i]
        return torch.from_numpy(np.ascontiguousarray(c)), torch.from_numpy(np.ascontiguousarray(r))

    def __getitem__(self, row: int) -> tuple[float, float]:
        c, r = self.lookup([row])
        return float(c[0]), float(r[0])

    def check_lengths(self, rows: Sequence[int], lengths: Tensor) -> None:
        """`lengths` (2P,) scored tokens of a batch must be the table's: same sequences scored."""
        i = self.positions(rows)
        want = np.concatenate(
            [self.columns["chosen_tokens"][i], self.columns["rejected_tokens"][i]]
        )
        got = lengths.detach().cpu().numpy()
        if not np.array_equal(want, got):
            bad = int(np.flatnonzero(want != got)[0]) % len(i)
            raise StoreError(
                f"reference table scored {want[bad]} tokens for dataset row {rows[bad]}, the batch "
                f"has {got[bad]}: the table belongs to other data or truncation"
            )


@torch.no_grad()
def reference_columns(token_logps: Tensor, batch, ld_alpha: float | None = None) -> dict:
    """Per-pair columns of one scored micro-batch (token_logps (N,) from the reference); with
    `ld_alpha` also the LD-weighted sums, computed exactly as `forward.sequence_forward` does."""
    from csd_fast.batch import segment_sum
    from csd_fast.forward import length_weights

    token_logps = token_logps.float()
    P = batch.num_pairs
    sums = segment_sum(token_logps, batch.seq_offsets)  # (2P,)
    tail = 1.0 - length_weights(batch, 0.0)  # 1 past the shorter completion, else 0
    tails = segment_sum(token_logps * tail, batch.seq_offsets)
    lengths = batch.sequence_lengths()
    extra = {}
    if ld_alpha is not None:
        ld = segment_sum(token_logps * length_weights(batch, ld_alpha), batch.seq_offsets)
        extra = {LD_COLUMNS[0]: ld[:P], LD_COLUMNS[1]: ld[P:]}
    return {
        **extra,
        "rows": batch.pair_ids,
        "ref_chosen_logps": sums[:P],
        "ref_rejected_logps": sums[P:],
        "ref_chosen_tail_logps": tails[:P],
        "ref_rejected_tail_logps": tails[P:],
        "chosen_tokens": lengths[:P],
        "rejected_tokens": lengths[P:],
    }


def concat_columns(parts: list[dict[str, Tensor]]) -> dict[str, np.ndarray]:
    """One array per column from per-batch columns (empty arrays for no batch)."""
    if not parts:
        return {c: np.zeros(0, dtype=COLUMN_DTYPES[c]) for c in COLUMNS}
    return {
        c: torch.cat([p[c].detach().cpu() for p in parts]).numpy().astype(COLUMN_DTYPES[c])
        for c in parts[0]
    }


def reference_table(
    pairs: Sequence[dict],
    *,
    split: str,
    score: Callable[[list[int]], dict[str, np.ndarray]] | None,
    root: str | Path | None = None,
    components: Callable[[], dict] | None = None,
    labels: dict | None = None,
    shard_rows: int = 4096,
    strict: bool = False,
    ld_alpha: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    writer: bool = True,
) -> tuple[RefLogpTable, StoreReport]:
    """The reference table of `pairs`: from the store under `root` if complete, else scored.

    `score(positions)` returns `COLUMNS` for those positions of `pairs` (it batches, runs the
    reference and calls `reference_columns`, with `ld_alpha` when set). With no `root`
    everything is scored in memory;
    with `score=None` only a complete stored table is returned (else StoreError).
    Under FSDP every rank calls this with its `rank`, `world_size` and a `barrier`; each scores
    and writes only its shards, and `score([])` is called on a rank with no shard left so it
    can join the collectives of the others' forwards. Under tensor parallelism the tensor ranks
    of a data rank share its `rank` and score the same shards together; only one of them is
    the `writer` (the others neither lock, write nor publish).
    """
    n = len(pairs)
    if root is None:
        columns = score(list(range(n)))
        if ld_alpha is not None:
            columns["ld_alpha"] = np.asarray(float(ld_alpha))
        return RefLogpTable(columns), StoreReport("memory", 1, built=[0])
    comps = components()
    store = RefStore(root, comps, n, labels={"split": split, **(labels or {})},
                     shard_rows=shard_rows, rank=rank, world_size=world_size)  # fmt: skip
    report = StoreReport(store.id, store.num_shards)
    if score is None:
        if not store.is_complete():
            raise StoreError(f"no complete reference table for {split} in {root}")
        return RefLogpTable(store.load_columns()), report
    if not store.exists():
        report.differs_from, report.differing = closest_table(root, comps, split)
        if strict:
            where = (f"the nearest table {report.differs_from} differs in "
                     f"{', '.join(report.differing)}" if report.differs_from
                     else "the store holds no table")  # fmt: skip
            raise StoreError(f"ref_cache_strict: no reference table for {split} in {root}; {where}")
    sync = barrier or (lambda: None)
    with store.build_lock() if writer else contextlib.nullcontext():
        store.reload()
        if world_size == 1 and writer:
            store.remove_stale_tmp()
        if writer:
            store.ensure_manifest()
        sync()
        store.reload()
        todo, report.bad = store.pending()
        if todo and strict:
            raise StoreError(f"ref_cache_strict: table {store.id} ({split}) lacks shards {todo} "
                             f"({report.bad or 'missing'})")  # fmt: skip
        report.reused = store.num_shards - len(todo)
        sync()  # every rank has seen the same pending list before anyone writes
        for shard in store.shards_for_rank(todo):
            if shard is None:
                score([])
                continue
            lo, hi = store.shard_span(shard)
            columns = score(list(range(lo, hi)))
            if writer:
                store.write_shard(shard, columns, ld_alpha)
            report.built.append(shard)
        sync()
        if rank == 0 and writer and (todo or not store.is_complete()):
            store.finalize()
        sync()
        store.reload()
        table = RefLogpTable(store.load_columns())
    if not np.array_equal(table.rows, _row_ids(pairs)):
        raise StoreError(f"table {store.id}: its rows are not the data's rows in order")
    return table, report


def _row_ids(pairs) -> np.ndarray:
    rows = getattr(pairs, "rows", None)
    if rows is None:
        rows = [int(ex.get("row", i)) for i, ex in enumerate(pairs)]
    return np.asarray(rows, dtype=np.int64)


def describe(report: StoreReport, split: str, n: int) -> str:
    if report.table_id == "memory":
        return f"reference log-probs for {split}: {n} pairs (in memory)"
    return f"reference log-probs for {split}: {n} pairs ({report.describe()})"
