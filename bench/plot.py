"""`python -m bench plot`: PNGs from the results CSVs, written next to them in bench/results/.

    python -m bench plot                         # every device CSV
    python -m bench plot --device cpu-... --out /tmp/plots

Per device, op and mode: `<device>__<op>__<mode>.png`, time (ms) and peak memory (MiB) against the
shape, one line per provider, from each case's latest row. Per device and op:
`<device>__<op>__history.png`, time p50 of every (provider, mode, shape) over the runs (x: runs in
time order, labelled by git sha), error bars p20..p80.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench.common import read_rows, results_dir


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")


def _latest(rows: list[dict]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        k = (r["provider"], r["shape"], r["metric"])
        if k not in out or r["timestamp"] >= out[k]["timestamp"]:
            out[k] = r
    return out


def plot_device(rows: list[dict], device: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in dict.fromkeys(r["op_or_scenario"] for r in rows):
        op_rows = [r for r in rows if r["op_or_scenario"] == op]
        for mode in dict.fromkeys(r["mode"] for r in op_rows):
            latest = _latest([r for r in op_rows if r["mode"] == mode])
            shapes = list(dict.fromkeys(k[1] for k in latest))
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, metric, unit in ((axes[0], "time", "ms"), (axes[1], "peak_mem", "MiB")):
                for prov in dict.fromkeys(k[0] for k in latest):
                    pts = [(i, latest[(prov, s, metric)]) for i, s in enumerate(shapes)
                           if (prov, s, metric) in latest]  # fmt: skip
                    if not pts:
                        continue
                    xs = [i for i, _ in pts]
                    ys = [float(r["p50"]) for _, r in pts]
                    lo = [y - float(r["p20"]) for y, (_, r) in zip(ys, pts, strict=True)]
                    hi = [float(r["p80"]) - y for y, (_, r) in zip(ys, pts, strict=True)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=prov)
                ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=7, ha="right")
                ax.set_ylabel(f"{metric} ({unit})")
                if all(y > 0 for line in ax.lines for y in line.get_ydata()):
                    ax.set_yscale("log")  # shapes span orders of magnitude
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{op} [{mode}] on {device}")
            fig.tight_layout()
            path = out_dir / f"{device}__{_slug(op)}__{_slug(mode)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        # history: one point per run for every case's time
        runs = sorted({r["timestamp"] for r in op_rows})
        if len(runs) < 2:
            continue
        sha = {r["timestamp"]: r["git_sha"] for r in op_rows}
        fig, ax = plt.subplots(figsize=(9, 4.5))
        timed = [r for r in op_rows if r["metric"] == "time"]
        for case in dict.fromkeys((r["provider"], r["mode"], r["shape"]) for r in timed):
            pts = sorted((runs.index(r["timestamp"]), float(r["p50"])) for r in timed
                         if (r["provider"], r["mode"], r["shape"]) == case)  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(case))
        ax.set_xticks(range(len(runs)), [sha[t] for t in runs], rotation=30, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time p50 (ms)")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{op} history on {device}")
        fig.tight_layout()
        path = out_dir / f"{device}__{_slug(op)}__history.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench plot")
    p.add_argument("--device", default=None, help="a device slug (CSV name); default: all")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--out", default=None, help="PNG directory (default: the results dir)")
    args = p.parse_args(argv)
    root = Path(args.results_dir or results_dir())
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{args.device}.csv"] if args.device else sorted(root.glob("*.csv"))
    for path in paths:
        for png in plot_device(read_rows(path), path.stem, out):
            print(png)
    return 0
