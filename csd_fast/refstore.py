"""The on-disk reference store: one table per fingerprint, in safetensors shards plus a manifest.

    <root>/ref-<id>/manifest.json            fingerprint components, labels, shard row ranges,
                                             per-shard sha256 and byte size once complete
    <root>/ref-<id>/shard-00000.safetensors  rows [0, S) of the tokenized set, one column each
    <root>/ref-<id>/shard-00001.safetensors  rows [S, 2S) ...

`<id>` is a digest of the fingerprint components (`csd_fast.refcache.fingerprint_components`),
so a changed model, tokenizer, data, truncation, dtype, device, head or layout is another table,
never a stale one; `closest_table` names what differs from the nearest existing table.

Every shard is written on its own (tmp file, fsync, rename), so an interrupted precompute keeps
its finished shards and a rerun scores only the rest. A shard carries its own header metadata
(table id, shard index, row range, sha256 of its tensors), so a shard is checked even before the
manifest lists it; once every shard is there the manifest records each file's sha256 and size,
and a truncated or corrupted shard is found by its checksum and rebuilt alone.

Several writers: shard ownership is `pending[rank::world_size]` (`RefStore.shards_for_rank`), so
each FSDP rank writes only its share, and the manifest is written by rank 0. A single process
(world_size 1) also holds an advisory `flock` on the table while building, so runs of a local
sweep that start together compute the table once (the others wait, then read it).

Inspect from the shell with `csd cache ls|inspect|verify|rm DIR` (csd_fast/cache_cli.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csd_fast.rundir import write_bytes_atomically

STORE_VERSION = 1
MANIFEST = "manifest.json"
TABLE_PREFIX = "ref-"
# Per dataset row: plain summed log-probs, the sums past the shorter completion of the pair (the
# LD-DPO tail, so any ld_alpha is `sum - (1 - alpha) * tail`), and the scored token counts (the
# length-normalised losses' |c|, |r|, checked against each batch so a table never silently
# scores other sequences).
FLOAT_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_tail_logps",
    "ref_rejected_tail_logps",
)
INT_COLUMNS = ("chosen_tokens", "rejected_tokens")
COLUMNS = ("rows", *FLOAT_COLUMNS, *INT_COLUMNS)
# Optional: the LD-weighted sums summed exactly as the policy's (same ops, same order) for the
# ld_alpha the shard was built with (its header says which), so a run with that alpha sees its
# reference bit for bit; any other alpha is served from the tails.
LD_COLUMNS = ("ref_chosen_ld_logps", "ref_rejected_ld_logps")
COLUMN_DTYPES = {"rows": np.int64, **dict.fromkeys((*FLOAT_COLUMNS, *LD_COLUMNS), np.float32)}
COLUMN_DTYPES |= dict.fromkeys(INT_COLUMNS, np.int32)


class StoreError(RuntimeError):
    """A reference table that cannot be used as asked (strict mode, a foreign directory, ...)."""


def table_id(components: dict) -> str:
    blob = json.dumps({"v": STORE_VERSION, **components}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tensors_digest(columns: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(columns):
        a = np.ascontiguousarray(columns[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_header(data: bytes) -> dict:
    """The JSON header of a safetensors blob (raises ValueError when truncated or garbled)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"header claims {n} bytes, file has {len(data) - 8}")
    return json.loads(data[8 : 8 + n])


def read_manifest(table_dir: Path) -> dict | None:
    path = Path(table_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def list_tables(root: str | Path) -> list[tuple[Path, dict]]:
    """(table dir, manifest) of every table under `root`, oldest first."""
    root = Path(root)
    out = []
    for d in sorted(root.glob(f"{TABLE_PREFIX}*")) if root.is_dir() else []:
        m = read_manifest(d)
        if m is not None:
            out.append((d, m))
    return sorted(out, key=lambda t: t[1].get("created", 0))


def differing_components(a: dict, b: dict) -> list[str]:
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def closest_table(root: str | Path, components: dict, split: str | None) -> tuple[str, list[str]]:
    """(id, differing component names) of the existing table nearest to `components`.

    Tables of the same split (train / eval) are preferred, so a new model is reported as
    'model' rather than as a different data set. ('', []) when the root holds no table.
    """
    best: tuple[int, int, str, list[str]] | None = None
    for d, m in list_tables(root):
        diff = differing_components(m.get("components", {}), components)
        if not diff:
            continue
        rank = (0 if m.get("labels", {}).get("split") == split else 1, len(diff))
        if best is None or rank < best[:2]:
            best = (*rank, d.name[len(TABLE_PREFIX) :], diff)
    return (best[2], best[3]) if best else ("", [])


@dataclass
class StoreReport:
    """What opening / building a table did, for the log and for tests."""

    table_id: str
    num_shards: int = 0
    reused: int = 0
    built: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)  # shard -> why it was rebuilt
    differs_from: str = ""  # closest existing table when this one was new
    differing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"table {self.table_id}: {self.reused}/{self.num_shards} shards reused"]
        if self.built:
            parts.append(f"{len(self.built)} built")
        for shard, why in sorted(self.bad.items()):
            parts.append(f"shard {shard} rebuilt ({why})")
        if self.differs_from:
            parts.append(f"new table; nearest {self.differs_from} differs in "
                         f"{', '.join(self.differing)}")  # fmt: skip
        return "; ".join(parts)


class RefStore:
    """One fingerprinted table under `root`; see the module docstring for the layout."""

    def __init__(
        self,
        root: str | Path,
        components: dict,
        num_rows: int,
        *,
        labels: dict | None = None,
        shard_rows: int = 4096,
        rank: int = 0,
        world_size: int = 1,
    ):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.root = Path(root)
        self.components = dict(components)
        self.id = table_id(self.components)
        self.dir = self.root / f"{TABLE_PREFIX}{self.id}"
        self.labels = dict(labels or {})
        self.rank, self.world_size = rank, world_size
        self.num_rows = int(num_rows)
        existing = read_manifest(self.dir)
        if existing is not None:
            if existing.get("components") != self.components:
                raise StoreError(f"{self.dir}: manifest components differ from its id")
            if existing["num_rows"] != self.num_rows:
                raise StoreError(
                    f"{self.dir}: table has {existing['num_rows']} rows, data {self.num_rows}"
                )
            shard_rows = existing["shard_rows"]  # a resumed table keeps its own shard size
        self.shard_rows = int(shard_rows)
        self.manifest = existing

    # ------------------------------------------------------------------------- layout
    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_rows // self.shard_rows))

    def shard_span(self, shard: int) -> tuple[int, int]:
        lo = shard * self.shard_rows
        return lo, min(lo + self.shard_rows, self.num_rows)

    def shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:05d}.safetensors"

    def exists(self) -> bool:
        return self.manifest is not None

    def is_complete(self) -> bool:
        return bool(self.manifest and self.manifest.get("complete"))

    def ensure_manifest(self) -> None:
        """The first manifest (no checksums yet), written by rank 0 when the table is new."""
        if self.manifest is not None or self.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(complete=False, shards=[])

    def _write_manifest(self, complete: bool, shards: list[dict]) -> None:
        created = (self.manifest or {}).get("created", time.time())
        self.manifest = {
            "version": STORE_VERSION,
            "id": self.id,
            "components": self.components,
            "labels": self.labels,
            "num_rows": self.num_rows,
            "shard_rows": self.shard_rows,
            "num_shards": self.num_shards,
            "columns": list(COLUMNS),
            "complete": complete,
            "created": created,
            "updated": time.time(),
            "shards": shards,
        }
        write_bytes_atomically(self.dir / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    # ------------------------------------------------------------------------- checks
    def check_shard(self, shard: int, against_manifest: bool = True) -> str | None:
        """None when the shard file is whole and belongs here; else why it is not.

        The manifest's file checksum is checked when it lists the shard (and
        `against_manifest`), the header's tensor checksum always.
        """
        path = self.shard_path(shard)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return "missing"
        listed = {s["index"]: s for s in (self.manifest or {}).get("shards", [])}.get(shard)
        if (
            against_manifest
            and listed is not None
            and (
                len(data) != listed["bytes"] or hashlib.sha256(data).hexdigest() != listed["sha256"]
            )
        ):
            return f"checksum mismatch ({len(data)} bytes, manifest {listed['bytes']})"
        try:
            meta = _read_header(data).get("__metadata__", {})
            columns = _decode(data)
        except Exception as e:  # truncated / garbled safetensors
            return f"unreadable: {e}"
        lo, hi = self.shard_span(shard)
        if meta.get("table") != self.id or int(meta.get("shard", -1)) != shard:
            return "belongs to another table"
        if (int(meta.get("lo", -1)), int(meta.get("hi", -1))) != (lo, hi):
            return f"row range {meta.get('lo')}:{meta.get('hi')}, expected {lo}:{hi}"
        if meta.get("sha256") != _tensors_digest(columns):
            return "checksum mismatch (tensor data)"
        if any(len(columns.get(c, ())) != hi - lo for c in COLUMNS):
            return "wrong number of rows"
        return None

    def pending(self) -> tuple[list[int], dict[int, str]]:
        """(shards still to score, reason per shard that exists but is bad)."""
        todo, bad = [], {}
        for shard in range(self.num_shards):
            why = self.check_shard(shard)
            if why is None:
                continue
            todo.append(shard)
            if why != "missing":
                bad[shard] = why
        return todo, bad

    def shards_for_rank(self, pending: list[int]) -> list[int | None]:
        """This rank's share of `pending`, padded with None so every rank gets as many turns.

        Under FSDP every rank must run the same number of forwards (parameters are gathered
        collectively): a rank given None runs its forwards on a dummy batch and writes nothing.
        """
        turns = -(-len(pending) // self.world_size)
        mine: list[int | None] = list(pending[self.rank :: self.world_size])
        return mine + [None] * (turns - len(mine))

    # ------------------------------------------------------------------------- writes
    def write_shard(
        self, shard: int, columns: dict[str, np.ndarray], ld_alpha: float | None = None
    ) -> None:
        """Write one shard atomically; `columns` holds COLUMNS (+ LD_COLUMNS for `ld_alpha`),
        each with the shard's rows."""
        from safetensors.numpy import save

        lo, hi = self.shard_span(shard)
        arrays = {}
        names = COLUMNS + (LD_COLUMNS if ld_alpha is not None and LD_COLUMNS[0] in columns else ())
        for name in names:
            a = np.ascontiguousarray(np.asarray(columns[name], dtype=COLUMN_DTYPES[name]))
            if a.shape != (hi - lo,):
                raise ValueError(
                    f"shard {shard}: {name} has shape {a.shape}, expected ({hi - lo},)"
                )
            arrays[name] = a
        meta = {"table": self.id, "shard": str(shard), "lo": str(lo), "hi": str(hi),
                "rank": str(self.rank), "sha256": _tensors_digest(arrays)}  # fmt: skip
        if len(names) > len(COLUMNS):
            meta["ld_alpha"] = repr(float(ld_alpha))
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(self.shard_path(shard), save(arrays, metadata=meta))

    def finalize(self) -> bool:
        """Rank 0: when every shard checks out, record their checksums; True when complete."""
        if self.rank != 0:
            return False
        shards = []
        for shard in range(self.num_shards):
            if self.check_shard(shard, against_manifest=False) is not None:
                return False
            data = self.shard_path(shard).read_bytes()
            lo, hi = self.shard_span(shard)
            digest = hashlib.sha256(data).hexdigest()
            shards.append({"index": shard, "rows": [lo, hi], "file": self.shard_path(shard).name,
                           "bytes": len(data), "sha256": digest})  # fmt: skip
        self._write_manifest(complete=True, shards=shards)
        return True

    @contextlib.contextmanager
    def build_lock(self):
        """An advisory exclusive lock on the table (single-process builds; no-op elsewhere)."""
        if self.world_size > 1:
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: concurrent builders only duplicate work
            yield
            return
        with open(self.dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError:  # a file system without flock (some Lustre mounts)
                pass
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def remove_stale_tmp(self) -> int:
        """Delete half-written shard files a killed builder left (call while holding the lock)."""
        stale = list(self.dir.glob(".shard-*.tmp*")) if self.dir.is_dir() else []
        for p in stale:
            with contextlib.suppress(OSError):
                p.unlink()
        return len(stale)

    def reload(self) -> None:
        self.manifest = read_manifest(self.dir)

    # ------------------------------------------------------------------------- reads
    def load_columns(self) -> dict[str, np.ndarray]:
        """All rows, checking every shard; raises StoreError naming a bad one. The LD columns
        come along (with "ld_alpha" as a 0-d array) only when every shard has them, same alpha."""
        parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS + LD_COLUMNS}
        alphas = set()
        for shard in range(self.num_shards):
            why = self.check_shard(shard)
            if why is not None:
                raise StoreError(f"{self.shard_path(shard)}: {why}")
            data = self.shard_path(shard).read_bytes()
            alphas.add(_read_header(data).get("__metadata__", {}).get("ld_alpha"))
            columns = _decode(data)
            for c in COLUMNS + LD_COLUMNS:
                if c in columns:
                    parts[c].append(columns[c])
        out = {c: np.concatenate(parts[c]) for c in COLUMNS}
        if len(alphas) == 1 and None not in alphas:
            out.update({c: np.concatenate(parts[c]) for c in LD_COLUMNS})
            out["ld_alpha"] = np.asarray(float(alphas.pop()))
        return out


def _decode(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def verify_table(table_dir: str | Path) -> dict[int, str]:
    """shard -> problem for every bad or missing shard of a table (empty: all shards check out)."""
    m = read_manifest(table_dir)
    if m is None:
        return {-1: "no readable manifest.json"}
    store = RefStore(Path(table_dir).parent, m["components"], m["num_rows"],
                     labels=m.get("labels"), shard_rows=m["shard_rows"])  # fmt: skip
    if store.dir != Path(table_dir):
        return {-1: f"directory name does not match the manifest id {m['id']}"}
    _, bad = store.pending()
    missing = [s for s in range(store.num_shards) if not store.shard_path(s).exists()]
    return {**bad, **dict.fromkeys(missing, "missing")}
