"""`python -m bench compare`: regressions of the latest run against the previous one, same device.

    python -m bench compare                      # every bench/results/*.csv
    python -m bench compare --device nvidia-h100-80gb-hbm3 --threshold 0.10 --strict

A run is the set of rows sharing a timestamp. For each row of the latest run (op, provider, mode,
shape, metric) the previous value is the most recent earlier row with the same key, so a partial
run (`--only`) is compared against whatever last measured the same cases. Only the lower-is-better
metrics are judged (time, peak_mem, train_wall; the rates are derived from time). Changes smaller
than an absolute floor (0.05 ms, 1 MiB) are noise. --strict: exit code 1 on any regression.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import read_rows, results_dir

LOWER_IS_BETTER = {"time", "peak_mem", "train_wall"}
FLOOR = {"ms": 0.05, "MiB": 1.0, "s": 0.01}


def _key(r: dict) -> tuple:
    return (r["op_or_scenario"], r["provider"], r["mode"], r["shape"], r["metric"])


def regressions(rows: list[dict], threshold: float = 0.10) -> list[dict]:
    """-> one dict per regressed metric of the latest run: key fields, old, new, ratio."""
    judged = [r for r in rows if r["metric"] in LOWER_IS_BETTER]
    if not judged:
        return []
    latest = max(r["timestamp"] for r in judged)
    out = []
    for r in judged:
        if r["timestamp"] != latest:
            continue
        prev = [p for p in judged if _key(p) == _key(r) and p["timestamp"] < latest]
        if not prev:
            continue
        old_row = max(prev, key=lambda p: p["timestamp"])
        old, new = float(old_row["p50"]), float(r["p50"])
        if new - old > FLOOR.get(r["unit"], 0.0) and new > old * (1 + threshold):
            out.append({**{k: r[k] for k in ("op_or_scenario", "provider", "mode", "shape",
                                              "metric", "unit")},  # fmt: skip
                        "old": old, "new": new, "ratio": new / old if old else float("inf"),
                        "old_sha": old_row["git_sha"], "new_sha": r["git_sha"]})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compare")
    p.add_argument("--device", default=None, help="a device slug (CSV name); default: all")
    p.add_argument("--threshold", type=float, default=0.10, help="relative regression to report")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything regressed")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    root = Path(args.results_dir or results_dir())
    paths = [root / f"{args.device}.csv"] if args.device else sorted(root.glob("*.csv"))
    found = 0
    for path in paths:
        regs = regressions(read_rows(path), args.threshold)
        print(f"{path.stem}: {len(regs)} regression(s) > {args.threshold:.0%}")
        for g in regs:
            print(f"  {g['op_or_scenario']} {g['provider']} {g['mode']} {g['shape']} "
                  f"{g['metric']}: {g['old']:.4g} -> {g['new']:.4g} {g['unit']} "
                  f"({g['ratio']:.2f}x, {g['old_sha']} -> {g['new_sha']})")  # fmt: skip
        found += len(regs)
    return 1 if found and args.strict else 0
