"""`csd cache`: look into a reference store (`ref_cache_dir`) from the shell.

    csd cache ls DIR                 # a line per table: id, split, rows, shards, size, model, data
    csd cache inspect DIR [ID...]    # fingerprint components, labels, shards, value ranges
    csd cache verify DIR [ID...]     # check every shard's checksum; exit 1 if any is bad
    csd cache rm DIR ID... | --all | --incomplete

An ID may be given by any unique prefix. Only store tables (`ref-*` directories with a manifest)
are ever removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path

import numpy as np

from csd_fast.refstore import TABLE_PREFIX, RefStore, list_tables, verify_table


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _select(root: Path, ids: list[str]) -> list[tuple[Path, dict]]:
    tables = list_tables(root)
    if not ids:
        return tables
    out = []
    for want in ids:
        want = want.removeprefix(TABLE_PREFIX)
        hits = [t for t in tables if t[0].name[len(TABLE_PREFIX) :].startswith(want)]
        if len(hits) != 1:
            raise SystemExit(f"csd cache: {want!r} matches {len(hits)} tables in {root}")
        out.append(hits[0])
    return out


def _present(d: Path, m: dict) -> int:
    return sum(1 for s in range(m["num_shards"]) if (d / f"shard-{s:05d}.safetensors").exists())


def cmd_ls(root: Path, _ids) -> int:
    tables = list_tables(root)
    if not tables:
        print(f"{root}: no reference tables")
        return 0
    print(f"{'id':<22} {'split':<6} {'rows':>8} {'shards':>9} {'size':>10}  model / data")
    for d, m in tables:
        shards = f"{_present(d, m)}/{m['num_shards']}" + ("" if m.get("complete") else "*")
        labels = m.get("labels", {})
        print(f"{d.name[len(TABLE_PREFIX):]:<22} {labels.get('split', '?'):<6} "
              f"{m['num_rows']:>8} {shards:>9} {_human(_size(d)):>10}  "
              f"{labels.get('model', '?')} / {labels.get('data', '?')}")  # fmt: skip
    print("(* = incomplete: a precompute was interrupted or is running)")
    return 0


def cmd_inspect(root: Path, ids) -> int:
    for d, m in _select(root, ids):
        created = dt.datetime.fromtimestamp(m.get("created", 0), dt.timezone.utc)
        print(f"table {m['id']}  ({d})")
        print(f"  created {created:%Y-%m-%d %H:%M:%S} UTC; complete: {m.get('complete')}")
        print(f"  {m['num_rows']} rows in {m['num_shards']} shards of {m['shard_rows']}; "
              f"{_human(_size(d))}")  # fmt: skip
        for k, v in m.get("labels", {}).items():
            print(f"  label {k:<10} {v}")
        for k, v in m.get("components", {}).items():
            print(f"  {k:<16} {v}")
        store = RefStore(root, m["components"], m["num_rows"], shard_rows=m["shard_rows"])
        try:
            cols = store.load_columns()
        except Exception as e:  # an incomplete or damaged table: say so, show the rest
            print(f"  values: unavailable ({e})")
        else:
            for c in ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens"):
                v = cols[c].astype(np.float64)
                print(f"  {c:<22} mean {v.mean():10.3f}  min {v.min():10.3f}  max {v.max():10.3f}")
    return 0


def cmd_verify(root: Path, ids) -> int:
    bad_tables = 0
    for d, m in _select(root, ids):
        problems = verify_table(d)
        name = d.name[len(TABLE_PREFIX) :]
        if problems:
            bad_tables += 1
            for shard, why in sorted(problems.items()):
                print(f"{name}: shard {shard}: {why}")
        else:
            print(f"{name}: ok ({m['num_shards']} shards)")
    return 1 if bad_tables else 0


def cmd_rm(root: Path, ids, everything: bool = False, incomplete: bool = False) -> int:
    if not ids and not everything and not incomplete:
        raise SystemExit("csd cache rm: name tables to remove (ID...), or --all / --incomplete")
    chosen = _select(root, ids) if ids else list_tables(root)
    if incomplete:
        chosen = [(d, m) for d, m in chosen if not m.get("complete")]
    for d, _ in chosen:
        shutil.rmtree(d)
        print(f"removed {d}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csd cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("ls", "inspect", "verify", "rm"))
    parser.add_argument("dir", help="the store: a ref_cache_dir")
    parser.add_argument("ids", nargs="*", help="table ids (unique prefixes); default: all")
    parser.add_argument("--all", action="store_true", help="rm: every table")
    parser.add_argument("--incomplete", action="store_true", help="rm: interrupted tables only")
    a = parser.parse_args(argv)
    root = Path(a.dir)
    if not root.is_dir():
        print(f"csd cache: {root} is not a directory", file=sys.stderr)
        return 2
    if a.command == "rm":
        return cmd_rm(root, a.ids, a.all, a.incomplete)
    return {"ls": cmd_ls, "inspect": cmd_inspect, "verify": cmd_verify}[a.command](root, a.ids)


if __name__ == "__main__":
    sys.exit(main())
