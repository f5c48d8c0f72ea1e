"""`csd sweep`: real `csd train` subprocesses on a tiny saved model sharing one reference store.

Run: python -m pytest tests/pipeline/test_sweep.py -q   (about a minute and a half on 2 cores)
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_helpers import tiny_tokenizer
from test_trainer import ROWS, tiny_model

from csd_fast.pipeline.sweep import expand, main, parse_grid, run_name
from csd_fast.reporting import read_metrics


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in (("train", ROWS), ("eval", ROWS[:4])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dict(model_name_or_path=str(root / "model"), dataset_name=str(root / "train.jsonl"),
                  eval_dataset_name=str(root / "eval.jsonl"), max_steps=2, logging_steps=1,
                  eval_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, bf16=False,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="steps",
                  save_steps=1, seed=0)  # fmt: skip
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _logs(root: Path) -> str:
    return "".join(p.read_text() for p in sorted(root.glob("*/train.log")))


def _reference_builds(root: Path) -> list[str]:
    return [ln for ln in _logs(root).splitlines() if "reference log-probs" in ln and " built" in ln]


def test_grid_names_and_flags():
    grid = parse_grid(["beta=0.05,0.1", "learning-rate=5e-7,1e-6", "loss_type=sigmoid sft,ipo"])
    runs = expand(grid, Path("/x"))
    assert len(runs) == 8 and runs[0].name == "beta=0.05,learning_rate=5e-7,loss_type=sigmoid_sft"
    assert runs[0].dir == Path("/x") / runs[0].name
    assert len({r.name for r in runs}) == 8
    assert len(run_name({"a": "x" * 300})) <= 100
    for bad in (["nope=1"], ["beta"], ["output_dir=a,b"], ["ref_cache_dir=a"]):
        with pytest.raises(SystemExit):
            parse_grid(bad)


@pytest.mark.slow
def test_sweep_shares_the_reference_survives_a_failure_and_reruns_nothing(recipe, tmp_path, capsys):
    root = tmp_path / "sweep"
    # exo_pair without label_smoothing is refused by DPOConfig: that run fails on purpose
    argv = ["--config", str(recipe), "--output_dir", str(root), "--gpus", "", "--in_process",
            "--grid", "loss_type=sigmoid,exo_pair,ipo"]  # fmt: skip
    assert main(argv) == 1  # one run failed
    out = capsys.readouterr().out
    assert "loss_type=exo_pair: failed" in out
    rows = {r["run"]: r for r in csv.DictReader((root / "sweep.csv").open())}
    assert {k: r["status"] for k, r in rows.items()} == {
        "loss_type=sigmoid": "done",
        "loss_type=exo_pair": "failed",
        "loss_type=ipo": "done",
    }
    assert rows["loss_type=ipo"]["final_eval_loss"] and rows["loss_type=ipo"]["steps"] == "2"
    assert float(rows["loss_type=sigmoid"]["tokens_per_s"]) > 0
    assert (root / "sweep.png").stat().st_size > 0
    assert "final_eval_loss" in out and "loss_type=ipo" in out  # the printed table
    # the reference (train + eval tables) was computed once, by the first run
    assert len(_reference_builds(root)) == 2
    assert " built" in (root / "loss_type=sigmoid" / "train.log").read_text()
    assert "1/1 shards reused" in (root / "loss_type=ipo" / "train.log").read_text()
    assert "label_smoothing" in (root / "loss_type=exo_pair" / "train.log").read_text()
    # a re-run: finished runs do no work, the failed one is tried again
    before = (root / "loss_type=ipo" / "train.log").read_text()
    assert main(argv) == 1
    assert "loss_type=ipo: finished earlier, skipped" in capsys.readouterr().out
    assert (root / "loss_type=ipo" / "train.log").read_text() == before
    status = json.loads((root / "loss_type=exo_pair" / "sweep_run.json").read_text())
    assert status["attempts"] == 2 and status["status"] == "failed"


@pytest.mark.slow
def test_parallel_runs_are_pinned_one_per_device(recipe, tmp_path, monkeypatch, capsys):
    """Two "devices": both runs start at once as subprocesses, each pinned to its own."""
    root = tmp_path / "par"
    argv = ["--config", str(recipe), "--output_dir", str(root), "--gpus", "3,5",
            "--grid", "beta=0.1,0.2"]  # fmt: skip
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    rc = main(argv)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout + _logs(root)[-3000:]
    devices = {}
    for run in ("beta=0.1", "beta=0.2"):
        st = json.loads((root / run / "sweep_run.json").read_text())
        devices[run] = st["device"]
        log = (root / run / "train.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={st['device']}" in log
    assert sorted(devices.values()) == ["3", "5"]
    assert "on CUDA_VISIBLE_DEVICES=3" in stdout and "on CUDA_VISIBLE_DEVICES=5" in stdout
    # started together: one computed the tables under the store's lock, the other read them
    assert len(_reference_builds(root)) == 2


# The sweep's process kills itself (SIGKILL, nothing flushed) right after its first run has
# published checkpoint-2: a deterministic point, where polling from outside raced a fast machine.
_KILL_AFTER_CHECKPOINT_2 = """
import os, signal, sys
from pathlib import Path
import csd_fast.checkpoint as ckpt
save = ckpt.save_checkpoint
def save_then_die(path, **kw):
    out = save(path, **kw)
    if Path(path).name == "checkpoint-2":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
ckpt.save_checkpoint = save_then_die
from csd_fast.__main__ import main
sys.exit(main(["sweep", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_sweep_resumes_after_kill_9(recipe, tmp_path):
    root = tmp_path / "kill"
    argv = ["--config", str(recipe), "--output_dir", str(root), "--gpus", "", "--in_process",
            "--grid", "beta=0.1,0.3", "--max_steps", "4"]  # fmt: skip
    # --in_process: the run trains inside the sweep's process, so the kill takes both
    cmd = [sys.executable, "-c", _KILL_AFTER_CHECKPOINT_2, *argv]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    first = root / "beta=0.1"
    assert (first / "checkpoint-2").is_dir() and not (first / "final").exists()
    assert json.loads((first / "sweep_run.json").read_text())["status"] == "running"
    assert main(argv) == 0
    st = json.loads((first / "sweep_run.json").read_text())
    assert st["status"] == "done" and st["resumed"] and st["attempts"] == 2
    steps = [r["step"] for r in read_metrics(first) if "loss" in r and "train_runtime" not in r]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing doubled
    assert json.loads((root / "beta=0.3" / "sweep_run.json").read_text())["attempts"] == 1


def test_slurm_files_render_and_parse(recipe, tmp_path):
    root = tmp_path / "sl"
    argv = ["--config", str(recipe), "--output_dir", str(root), "--grid", "beta=0.05,0.1,0.2",
            "--grid", "learning_rate=5e-7,1e-6", "--slurm", "--slurm_partition", "gpu",
            "--slurm_max_parallel", "4"]  # fmt: skip
    assert main(argv) == 0
    array = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5%4" in array and "#SBATCH --partition=gpu" in array
    assert '--run_index "$SLURM_ARRAY_TASK_ID"' in array and "--slurm" not in array
    assert "--prepare" in (root / "prepare.sbatch").read_text()
    submit = (root / "submit.sh").read_text()
    assert "--dependency=afterok:" in submit and "--dependency=afterany:" in submit
    for name in ("sweep.sbatch", "prepare.sbatch", "report.sbatch", "submit.sh"):
        check = subprocess.run(["bash", "-n", str(root / name)], capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stderr)
    assert not any(root.glob("beta=*"))  # nothing ran


def test_csd_train_sweep_flag_is_csd_sweep(monkeypatch):
    import csd_fast.pipeline.sweep as sweep
    from csd_fast.cli import main as train_main

    seen = []
    monkeypatch.setattr(sweep, "main", lambda argv: seen.append(argv) or 0)
    assert train_main(["--config", "r.yaml", "--sweep", "beta=0.1,0.2", "--max_steps", "3"]) == 0
    assert seen == [["--config", "r.yaml", "--grid", "beta=0.1,0.2", "--max_steps", "3"]]
