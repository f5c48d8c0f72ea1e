"""`python -m bench`: run the benchmarks, plot them, compare runs (repo root, never installed).

    python -m bench --quick                      # CPU, <= 5 min on 2 cores: all ops + one e2e
    python -m bench --preset gpu                 # real shapes on a GPU
    python -m bench --quick --only fused_linear_logprob --providers eager,ours
    python -m bench --only fused_linear_logprob --shape N=1024,H=256,V=8192 --dry-run
    python -m bench plot [--device SLUG]         # PNGs into bench/results/
    python -m bench compare [--strict]           # > 10% regressions vs the previous run

Every `bench/ops_*.py` and `bench/e2e_*.py` module is a benchmark (see bench/common.py for the
protocol): a new op or scenario is one new file. Rows append to $BENCH_RESULTS_DIR (default
bench/results/)/<device>.csv; the run ends with the goal ratios read off its own rows.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

from bench import common

# the CPU preset's repeat counts keep it under 5 minutes on 2 cores
REPEATS = {"quick": (1, 3), "gpu": (3, 10), "smoke": (0, 1)}


def modules() -> list:
    """The benchmark modules: ops first, then end-to-end scenarios, by file name."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]))
    names = [n for n in names if n.startswith("ops_")] + [n for n in names if n.startswith("e2e_")]
    return [importlib.import_module(f"bench.{n}") for n in names]


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals as ratios of this run's rows (peers measured in the same run)."""

    def val(name, provider, mode, metric, shape=None):
        for r in rows:
            key = (r["op_or_scenario"], r["provider"], r["mode"], r["metric"])
            if key == (name, provider, mode, metric) and shape in (None, r["shape"]):
                return float(r["p50"])
        return None

    out = []
    shapes = [r["shape"] for r in rows if r["op_or_scenario"] == "fused_linear_logprob"]
    for shape in dict.fromkeys(shapes):
        for mode in ("fwd", "fwd+bwd"):
            e = val("fused_linear_logprob", "eager", mode, "peak_mem", shape)
            o = val("fused_linear_logprob", "ours", mode, "peak_mem", shape)
            if e and o:
                out.append(f"loss-head memory ours/eager {mode} {shape}: {o / e:.1%} (goal <= 25%)")
    for scen in dict.fromkeys(r["op_or_scenario"] for r in rows if r["mode"] == "train"):
        trl = val(scen, "trl", "train", "pairs_per_s")
        for r in rows:
            if r["op_or_scenario"] == scen and r["metric"] == "pairs_per_s" and trl:
                if r["provider"] != "trl":
                    ratio = float(r["p50"]) / trl
                    out.append(
                        f"{scen} {r['provider']} / trl pairs/s: {ratio:.2f}x (goal >= 3x CPU)"
                    )
    # the sampling harness (#9): overhead over bare vLLM, packed vs padded reward scoring
    for name, ours, base, metric, goal in (
        ("sample", "harness", "bare", "samples_per_s", ">= 0.95x"),
        ("reward_score", "packed", "padded", "tokens_per_s", ">= 2x"),
    ):
        for shape in dict.fromkeys(r["shape"] for r in rows if r["op_or_scenario"] == name):
            a = val(name, ours, rows_mode(rows, name), metric, shape)
            b = val(name, base, rows_mode(rows, name), metric, shape)
            if a and b:
                out.append(f"{name} {ours}/{base} {metric} {shape}: {a / b:.2f}x (goal {goal})")
    return out


def rows_mode(rows: list[dict], name: str) -> str | None:
    return next((r["mode"] for r in rows if r["op_or_scenario"] == name), None)


def run(args) -> int:
    preset = "quick" if args.quick else args.preset
    device = args.device or ("cuda" if preset == "gpu" else "cpu")
    warmup, reps = REPEATS.get(preset, REPEATS["quick"])
    warmup, reps = args.warmup if args.warmup is not None else warmup, args.reps or reps
    only_mods = set(args.only.split(",")) if args.only else None
    only_prov = set(args.providers.split(",")) if args.providers else None
    t0 = time.perf_counter()
    rows: list[dict] = []
    for mod in modules():
        if only_mods and mod.NAME not in only_mods:
            continue
        print(f"[{mod.NAME}] preset={preset} device={device}", flush=True)
        shapes = [common.parse_shape(s) for s in args.shape] if args.shape else None
        rows += common.run_bench(mod, preset, device, warmup, reps, only_prov, shapes)
    rows = common.finish_rows(rows, device)
    if not rows:
        print("no rows measured")
        return 1
    path = Path(args.results_dir or common.results_dir()) / f"{rows[0]['device']}.csv"
    if not args.dry_run:
        common.append_rows(rows, path)
    print(f"{len(rows)} rows -> {path if not args.dry_run else '(dry run)'} "
          f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    for line in goals(rows):
        print("  " + line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from bench.plot import main as plot_main

        return plot_main(argv[1:])
    if argv[:1] == ["compare"]:
        from bench.compare import main as compare_main

        return compare_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU preset (<= 5 min on 2 cores)")
    p.add_argument("--preset", default="quick", help="quick | gpu | smoke (a preset in modules)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: by preset)")
    p.add_argument("--only", default=None, help="comma-separated op_or_scenario names")
    p.add_argument("--providers", default=None, help="comma-separated provider names")
    p.add_argument("--shape", action="append", help="replace the preset's shapes: N=512,H=64,V=999")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--results-dir", default=None, help="default $BENCH_RESULTS_DIR or bench/results"
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print, write no rows")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
