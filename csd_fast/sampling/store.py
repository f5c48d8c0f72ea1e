"""Atomic, resumable Parquet shards plus `manifest.json`: the on-disk format of every stage.

    store = ShardStore(out_dir, "samples", settings, fingerprint, num_units=len(prompts),
                       shard_size=64, overwrite=False)          # refuses a differing manifest
    for j in store.todo(worker=(0, 1)):                           # shards not finished yet
        start, stop = store.units(j)
        store.write(j, rows)                                       # temp, fsync, rename, manifest
    read_samples(out_dir)                                          # -> datasets.Dataset

The input (prompts, samples) is cut into fixed shards of `shard_size` units; shard j always holds
units [j * shard_size, (j + 1) * shard_size), whatever the number of processes, so a run resumed
with another `--shard` split or device count still writes each unit once. Worker w of W takes the
shards j with j % W == w: every shard has exactly one owner, also when W does not divide them.

A shard is written to a temporary file in the same folder, fsynced and renamed into place; its
record (row count, unit range, sha256) then goes to `shards/<name>.json` the same way, and finally
`manifest.json` is rebuilt from the records under an flock (several processes, array tasks, share
one output folder). A kill -9 at any point leaves either no shard or a whole one: on the next run
a shard counts as finished only if its record exists and the file's checksum matches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from csd_fast.rundir import fsync_dir as _fsync_dir
from csd_fast.rundir import write_text_atomically as atomic_write_text

FORMAT = "csd-fast/shards"
VERSION = 1
MANIFEST = "manifest.json"


class ManifestMismatch(SystemExit):
    """The output folder was written with other settings or another model (exit code 2)."""

    def __init__(self, message: str):
        import sys

        print(message, file=sys.stderr)
        self.message = message
        super().__init__(2)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_shard_spec(text: str | None) -> tuple[int, int]:
    """`--shard i/N` -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/N (e.g. 3/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < N")
    return i, n


def worker_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """The shards a worker owns: j % num_workers == worker (each shard exactly once)."""
    return list(range(worker, num_shards, num_workers))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}{key}"
            if key not in old:
                out.append(f"{name}: not in the manifest, this command has {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: manifest has {old[key]!r}, this command has none")
            else:
                out += _diff(old[key], new[key], name + ".")
        return out
    return (
        [] if old == new else [f"{prefix.rstrip('.')}: manifest has {old!r}, this command {new!r}"]
    )


class ShardStore:
    """One stage's output folder: `<kind>-NNNNN.parquet` shards, records and the manifest."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        kind: str,
        settings: dict,
        fingerprint: dict,
        *,
        num_units: int,
        shard_size: int,
        overwrite: bool = False,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.dir = Path(out_dir)
        self.kind = kind
        self.num_units = num_units
        self.shard_size = shard_size
        self.num_shards = -(-num_units // shard_size)
        # JSON round trip: the header compares as it will read back (tuples -> lists, ...)
        self.header = json.loads(
            json.dumps(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "kind": kind,
                    "settings": settings,
                    "fingerprint": fingerprint,
                    "num_units": num_units,
                    "shard_size": shard_size,
                    "num_shards": self.num_shards,
                },
                default=str,
            )
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "shards").mkdir(exist_ok=True)
        with self._lock():
            if overwrite:
                self._clear()
            self._check_or_create()

    # ------------------------------------------------------------------ layout
    def name(self, j: int) -> str:
        return f"{self.kind}-{j:05d}.parquet"

    def units(self, j: int) -> tuple[int, int]:
        return j * self.shard_size, min((j + 1) * self.shard_size, self.num_units)

    def _record_path(self, j: int) -> Path:
        return self.dir / "shards" / f"{self.name(j)}.json"

    @contextlib.contextmanager
    def _lock(self):
        with open(self.dir / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _clear(self) -> None:
        for p in self.dir.glob(f"{self.kind}-*.parquet"):
            p.unlink()
        shutil.rmtree(self.dir / "shards", ignore_errors=True)
        (self.dir / "shards").mkdir()
        (self.dir / MANIFEST).unlink(missing_ok=True)

    def _check_or_create(self) -> None:
        path = self.dir / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            old_header = {k: old.get(k) for k in self.header}
            diffs = _diff(old_header, self.header)
            if diffs:
                raise ManifestMismatch(
                    f"{path}: this folder holds {old.get('kind')} made differently:\n  "
                    + "\n  ".join(diffs)
                    + "\nuse the same settings to resume, or --overwrite to start over"
                )
            return
        if any(self.dir.glob(f"{self.kind}-*.parquet")):
            raise ManifestMismatch(
                f"{self.dir}: shards without a manifest.json; --overwrite to start over"
            )
        self._write_manifest()

    # ------------------------------------------------------------------ state
    def record(self, j: int) -> dict | None:
        try:
            return json.loads(self._record_path(j).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, j: int, verify: bool = True) -> bool:
        rec = self.record(j)
        if rec is None:
            return False
        path = self.dir / rec["file"]
        if not path.exists() or path.stat().st_size != rec["bytes"]:
            return False
        return not verify or file_sha256(path) == rec["sha256"]

    def todo(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        return [
            j for j in worker_shards(self.num_shards, worker, num_workers) if not self.is_done(j)
        ]

    def done_shards(self) -> list[int]:
        return [j for j in range(self.num_shards) if self.record(j) is not None]

    # ------------------------------------------------------------------ writing
    def write(self, j: int, table) -> dict:
        """Write shard j (a pyarrow Table) atomically, then its record, then the manifest."""
        import pyarrow.parquet as pq

        path = self.dir / self.name(j)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        start, stop = self.units(j)
        rec = {
            "index": j,
            "file": path.name,
            "units": [start, stop],
            "rows": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(self._record_path(j), json.dumps(rec, indent=1))
        with self._lock():
            self._write_manifest()
        return rec

    def _write_manifest(self) -> None:
        shards = [r for j in range(self.num_shards) if (r := self.record(j)) is not None]
        manifest = dict(self.header, shards=shards, complete=len(shards) == self.num_shards)
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))

    def finalize(self) -> dict:
        with self._lock():
            self._write_manifest()
        return read_manifest(self.dir)


def read_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{out_dir}: no {MANIFEST} (not a csd sample/score/translate output)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a csd-fast shard manifest (format {manifest.get('format')!r})"
        )
    return manifest


def read_table(out_dir: str | os.PathLike, *, allow_partial: bool = False, verify: bool = True):
    """All shards of an output folder as one pyarrow Table, in unit order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    shards = sorted(manifest["shards"], key=lambda r: r["index"])
    missing = sorted(set(range(manifest["num_shards"])) - {r["index"] for r in shards})
    if missing and not allow_partial:
        raise ValueError(
            f"{out_dir}: {len(missing)} of {manifest['num_shards']} shards not written yet "
            f"(first: {missing[:5]}); rerun the same command to finish, or allow_partial=True"
        )
    tables = []
    for rec in shards:
        path = out_dir / rec["file"]
        if verify and file_sha256(path) != rec["sha256"]:
            raise ValueError(f"{path}: checksum differs from {MANIFEST}; the shard is damaged")
        tables.append(pq.read_table(path))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def read_samples(out_dir: str | os.PathLike, *, allow_partial: bool = False, verify: bool = True):
    """The rows of a `csd sample`, `csd score` or `csd translate` output as a `datasets.Dataset`."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(
        InMemoryTable(read_table(out_dir, allow_partial=allow_partial, verify=verify))
    )
