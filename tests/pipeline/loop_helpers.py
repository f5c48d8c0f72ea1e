"""Shared by the `csd loop` tests: start the CLI, SIGKILL it at a chosen moment, read outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# a `csd train` recipe small enough for a loop on 2 cores; checkpoint-2 is a kill point
TINY_TRAIN = {
    "loss_type": ["sigmoid"], "beta": 0.1, "learning_rate": 2e-3, "lr_scheduler_type": "cosine",
    "warmup_steps": 1, "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 48,
    "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "eval_strategy": "no",
    "bf16": False, "gradient_checkpointing": False, "report_to": "none", "disable_tqdm": True,
    "seed": 0, "dataset_cache_dir": None,
}  # fmt: skip


def loop_cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "csd_fast", "loop", "--config", str(config)]


def run_loop(config: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(loop_cli(config), capture_output=True, text=True, timeout=timeout)


def run_until_killed(config: Path, ready) -> str:
    """Start the loop, SIGKILL it once ready() is true; the killed run's output."""
    log = config.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(loop_cli(config), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the loop ended before the kill point:\n{log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def step_state(run: Path, key: str) -> str | None:
    """A step's state in the loop manifest (None before the manifest or the step exists)."""
    try:
        return json.loads((run / "loop.json").read_text())["steps"].get(key, {}).get("state")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def outputs(run: Path, rounds: int = 2) -> dict:
    """What a finished loop produced: pairs, final weights, eval tables."""
    out = {}
    for r in range(1, rounds + 1):
        out[f"pairs{r}"] = (run / f"round-{r}/pairs/pairs.jsonl").read_text()
        out[f"model{r}"] = (run / f"round-{r}/train/final/model.safetensors").read_bytes()
        out[f"eval{r}"] = json.loads((run / f"round-{r}/eval/eval.json").read_text())
    return out
