"""Where logged metrics go: `metrics.jsonl`, TensorBoard / W&B when asked for, and a PNG at the end.

Other `report_to` names (mlflow, comet_ml, trackio, ...) are transformers' own integration
callbacks, added to the trainer's callbacks as transformers adds them.

`metrics.jsonl` holds one JSON object per logging step: `step`, `epoch`, train metrics under TRL's
names (`loss`, `rewards/accuracies`, ...) and eval metrics with TRL's `eval_` prefix. On resume
the file is rewritten from the checkpoint's log history, so it always describes one consistent
run. A torn last line (the process was killed mid-write) is dropped with a warning; a broken line
elsewhere is an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


# sinks MetricsWriter writes itself; every other `report_to` name is a transformers integration
OWN_SINKS = ("tensorboard", "wandb")


def integration_callbacks(report_to: list[str]) -> list:
    """transformers' reporting callbacks (MLflow, Comet, trackio, SwanLab, ClearML, ...) for the
    `report_to` names csd-fast does not write itself; they receive the same events and logs."""
    names = [t for t in report_to if t not in OWN_SINKS]
    if not names:
        return []
    from transformers.integrations import get_reporting_integration_callbacks

    return [cls() for cls in get_reporting_integration_callbacks(names)]


class MetricsWriter:
    """Append-only JSONL of logged metrics plus optional TensorBoard / W&B sinks."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str] | str | None,
        run_name=None,
        logging_dir: str | Path | None = None,
    ):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        targets = report_to if isinstance(report_to, list) else [report_to or "none"]
        targets = [t for t in targets if t not in (None, "none")]
        if "all" in targets:
            targets = ["tensorboard", "wandb"]
        self._tb = None
        self._wandb = None
        for t in targets:
            if t == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:  # asked for explicitly: tell, don't drop
                    raise ImportError(
                        "report_to='tensorboard' needs `pip install tensorboard`"
                    ) from e
                self._tb = SummaryWriter(log_dir=str(logging_dir or Path(output_dir) / "runs"))
            elif t == "wandb":
                try:
                    import wandb
                except ImportError as e:
                    raise ImportError("report_to='wandb' needs `pip install wandb`") from e
                self._wandb = wandb.init(name=run_name, dir=str(output_dir), reinit=True)
            # any other name is one of transformers' integrations: `integration_callbacks`

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (resume from a checkpoint at `step`)."""
        if not self.path.exists():
            return
        keep = [json.dumps(r) for r in parse_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, self.path)

    def restore(self, history: list[dict]) -> None:
        """Rewrite the file as exactly these records (a checkpoint's log history), atomically.

        What the run had written when the checkpoint was saved, whatever came after it (lines
        of the killed run, a torn line, a summary line at the same step) or went missing.
        """
        lines = []
        for h in history:
            record = {"step": h.get("step", 0)}
            record.update({k: _jsonable(v) for k, v in h.items() if k != "step"})
            lines.append(json.dumps(record) + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def write(self, step: int, logs: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in logs.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def parse_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line is dropped (module docstring)."""
    from csd_fast.errors import CorruptFileError

    lines = Path(path).read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # killed mid-write: the line was never complete
                warnings.warn(f"{path}: dropping a torn last line (line {i + 1})", stacklevel=2)
                continue
            raise CorruptFileError(
                path, f"line {i + 1} is not JSON", "delete that line (or the file) and rerun"
            ) from None
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return parse_metrics(path)


def plot_curves(output_dir: str | Path, filename: str = "curves.png") -> Path | None:
    """Loss and reward curves (train and eval) from metrics.jsonl; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(output_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("loss", ["loss", "eval_loss"]),
        ("rewards", ["rewards/chosen", "rewards/rejected", "eval_rewards/margins"]),
        ("reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
    ]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output_dir) / filename
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
