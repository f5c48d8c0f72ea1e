"""A sweep's outputs: `sweep.csv`, `sweep.png`, the printed table, and its SLURM job files.

    python -m csd_fast sweep --config r.yaml --grid beta=0.05,0.1 --report_only   # table again

One CSV row per run: its settings, status, steps, final and best eval metrics, the final train
loss, mean tokens/s, wall time (all attempts) and the output directory; read from each run's
`metrics.jsonl` and `sweep_run.json`. The SLURM files are an array job (one task per grid
point, each `csd sweep ... --run_index $SLURM_ARRAY_TASK_ID`), a prepare job that fills the
data cache and reference store first, a report job, and `submit.sh` chaining the three.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import sys
from pathlib import Path

EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")


def _records(run_dir: Path) -> list[dict]:
    from csd_fast.reporting import read_metrics

    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return []


def run_row(run, grid_keys: list[str]) -> dict:
    st = run.status()
    recs = _records(run.dir)
    evals = [r for r in recs if isinstance(r.get("eval_loss"), int | float)]
    train = [r for r in recs if "loss" in r and "train_runtime" not in r]
    row = {"run": run.name, **{k: run.settings.get(k, "") for k in grid_keys}}
    row["status"] = st.get("status", "pending")
    row["steps"] = max((r.get("step", 0) for r in recs), default=0)
    final = evals[-1] if evals else {}
    for k in EVAL_KEYS:
        row[f"final_{k}"] = final.get(k, "")
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else {}
    row["best_eval_loss"] = best.get("eval_loss", "")
    row["best_eval_step"] = best.get("step", "")
    row["final_train_loss"] = train[-1]["loss"] if train else ""
    rates = [r["tokens_per_second"] for r in train if isinstance(r.get("tokens_per_second"), float)]
    row["tokens_per_s"] = sum(rates) / len(rates) if rates else ""
    row["wall_s"] = round(st.get("wall_s", 0.0), 2)
    row["attempts"] = st.get("attempts", 0)
    row["output_dir"] = str(run.dir)
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "output_dir"] if rows else []
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def plot(root: Path, runs) -> Path | None:
    """Eval loss (left) and eval reward accuracy (right) of every run against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("eval_loss", "eval_rewards/accuracies"), strict=True):
        for run in runs:
            pts = [(r["step"], r[key]) for r in _records(run.dir) if isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=run.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = root / "sweep.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(root: Path, runs, grid_keys: list[str]) -> list[dict]:
    rows = [run_row(r, grid_keys) for r in runs]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    tmp = root / ".sweep.csv.tmp"
    tmp.write_text(buf.getvalue())
    tmp.replace(root / "sweep.csv")
    png = plot(root, runs)
    print(table(rows))
    failed = [r["run"] for r in rows if r["status"] != "done"]
    print(
        f"[csd sweep] {len(rows) - len(failed)}/{len(rows)} runs done; {root / 'sweep.csv'}"
        + (f"; {png}" if png else "")
        + (f"; not done: {', '.join(failed)}" if failed else "")
    )
    return rows


# ------------------------------------------------------------------------------- SLURM
def _sbatch(name: str, root: Path, args, body: str, array: str | None = None) -> str:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --time={args.slurm_time}",
        f"#SBATCH --output={root / 'slurm' / ('%x-%A_%a.out' if array else '%x-%j.out')}",
    ]
    if array:
        lines += [f"#SBATCH --array={array}", "#SBATCH --gpus-per-task=1"]
    for opt in ("partition", "account"):
        if getattr(args, f"slurm_{opt}"):
            lines.append(f"#SBATCH --{opt}={getattr(args, f'slurm_{opt}')}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}", body, ""]
    return "\n".join(lines)


def write_slurm(root: Path, runs, sweep_argv: list[str], args) -> list[Path]:
    """prepare.sbatch -> sweep.sbatch (array) -> report.sbatch, chained by submit.sh."""
    (root / "slurm").mkdir(parents=True, exist_ok=True)
    cmd = shlex.join([sys.executable, "-m", "csd_fast", "sweep", *sweep_argv])
    limit = f"%{args.slurm_max_parallel}" if args.slurm_max_parallel else ""
    files = {
        "prepare.sbatch": _sbatch("csd-sweep-prepare", root, args, f"{cmd} --prepare"),
        "sweep.sbatch": _sbatch("csd-sweep", root, args,
                                f'{cmd} --run_index "$SLURM_ARRAY_TASK_ID"',
                                array=f"0-{len(runs) - 1}{limit}"),
        "report.sbatch": _sbatch("csd-sweep-report", root, args, f"{cmd} --report_only"),
        "submit.sh": "\n".join([
            "#!/bin/bash", "# submit the prepare job, the array after it, the report at the end",
            "set -euo pipefail", f"cd {shlex.quote(str(root))}",
            "prep=$(sbatch --parsable prepare.sbatch)",
            'runs=$(sbatch --parsable --dependency=afterok:"$prep" sweep.sbatch)',
            'sbatch --dependency=afterany:"$runs" report.sbatch',
            'echo "prepare $prep, runs $runs"', ""]),
    }  # fmt: skip
    out = []
    for name, text in files.items():
        path = root / name
        path.write_text(text)
        path.chmod(0o755)
        out.append(path)
    return out
