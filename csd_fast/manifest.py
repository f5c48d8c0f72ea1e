"""Checkpoint manifests: every file's size and sha256, written last, checked before a resume.

    write_manifest(tmp_dir)                       # last step of a checkpoint write, before rename
    problems = verify_checkpoint(path)            # [] when complete, else what is wrong
    path, skipped = newest_complete(output_dir)   # newest that verifies, + why not the newer

`manifest.json` inside a checkpoint lists every other file below it (any layout: HF
save_pretrained files, optimizer/scheduler state, DCP shard files `__0_0.distcp`, tokenizer
files, nested folders) with its byte size and sha256. It is written after all of them and before
the checkpoint directory is renamed into place, so a checkpoint whose manifest verifies is
exactly what the writer wrote: nothing missing, truncated, or changed since. A checkpoint with no
manifest is incomplete (a pre-manifest csd-fast wrote it, or something removed it).

Writing and verifying read every byte: sha256 runs at ~1-2 GB/s per core with the SHA
extensions of current x86/ARM servers (far less on this 2-core VM), and files are hashed
on up to 8 threads, so an 8B model's checkpoint with AdamW state (~100 GB in a few shards) costs
seconds to a minute, next to the minutes its write takes. Verification results are memoised per
process on the manifest's identity (choosing a checkpoint and then loading it hashes it once);
sizes are checked first for all candidates, which catches truncation without reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large reads)."""
    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    if workers == 1:
        return {p: _sha256(p) for p in paths}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(_sha256, paths), strict=True))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(checkpoint_dir: str | os.PathLike, *, required: tuple[str, ...] = ()) -> dict:
    """Hash every file below `checkpoint_dir` into its manifest.json (fsynced); returns it.

    `required`: names the reader must find (e.g. optimizer.pt); a writer that skipped one fails
    here rather than producing a checkpoint that resumes wrongly.
    """
    root = Path(checkpoint_dir)
    files = {p.relative_to(root).as_posix(): p for p in _files(root)}
    missing = [r for r in required if r not in files]
    if missing:
        raise RuntimeError(f"checkpoint {root} lacks {missing}; not writing its manifest")
    digests = _hash_all(list(files.values()))
    manifest = {
        "version": MANIFEST_VERSION,
        "files": {
            name: {"size": p.stat().st_size, "sha256": digests[p]} for name, p in files.items()
        },
    }
    path = root / MANIFEST
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict | None:
    try:
        data = json.loads((Path(checkpoint_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


_VERIFIED: dict[tuple, list[str]] = {}


def verify_checkpoint(checkpoint_dir: str | os.PathLike, *, sizes_only: bool = False) -> list[str]:
    """What is wrong with a checkpoint: [] when every listed file is present and intact."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    manifest = read_manifest(root)
    if manifest is None:
        state = "unreadable" if (root / MANIFEST).exists() else "missing"
        return [f"{MANIFEST} {state} (the write was interrupted, or an older csd-fast wrote it)"]
    st = (root / MANIFEST).stat()
    key = (os.path.realpath(root), st.st_mtime_ns, st.st_size, st.st_ino)
    if not sizes_only and key in _VERIFIED:
        return list(_VERIFIED[key])
    problems, to_hash = [], []
    for name, meta in sorted(manifest["files"].items()):
        p = root / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, {meta['size']} were written")
        else:
            to_hash.append((name, p, meta["sha256"]))
    if not sizes_only:
        digests = _hash_all([p for _, p, _ in to_hash])
        for name, p, want in to_hash:
            if digests[p] != want:
                problems.append(f"{name} does not match its checksum (changed or corrupt)")
    if not sizes_only:
        _VERIFIED[key] = list(problems)
    return problems


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-<step>` directory of output_dir, oldest first, complete or not."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in out.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def newest_complete(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies or None, [(newer checkpoint skipped, why)])."""
    skipped = []
    for path in reversed(checkpoints(output_dir)):
        problems = verify_checkpoint(path, sizes_only=True) or verify_checkpoint(path)
        if not problems:
            return path, skipped
        skipped.append((path, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")))
    return None, skipped
