"""`csd loop`: two rounds end to end, kill -9 in three stages, invalidation, --until/--from, status.

Real parts throughout: the demo's tiny Llama as the policy, a tiny Bradley-Terry reward model,
transformers sampling (the fallback while the vLLM harness is not installed), `csd train`,
`csd eval`. The killed run is a subprocess ended with SIGKILL from outside, at moments chosen by
watching its output folder. Run: python -m pytest tests/pipeline/test_loop.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from csd_fast.pipeline.demo import build_demo_models, write_demo_prompts
from csd_fast.pipeline.loop import Loop, LoopConfig, main

TRAIN = {
    "loss_type": ["sigmoid"], "beta": 0.1, "learning_rate": 2e-3, "lr_scheduler_type": "cosine",
    "warmup_steps": 1, "max_steps": 4, "per_device_train_batch_size": 4, "max_length": 48,
    "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "eval_strategy": "no",
    "bf16": False, "gradient_checkpointing": False, "report_to": "none", "disable_tqdm": True,
    "seed": 0, "dataset_cache_dir": None,
}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    policy, rm = build_demo_models(d)
    prompts, held = write_demo_prompts(d, limit_train=8, limit_eval=4)
    return {"policy": str(policy), "rm": str(rm), "prompts": str(prompts), "eval": str(held)}


def write_config(path: Path, assets: dict, **changes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = path.parent / "train.yaml"
    recipe.write_text(yaml.safe_dump(TRAIN))
    config = {
        "name": "t", "root": str(path.parent / "runs"), "base_model": assets["policy"],
        "reward_model": assets["rm"], "prompts": assets["prompts"], "eval_prompts": assets["eval"],
        "num_samples": 2, "engine": "hf",
        "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 0, "shard_size": 4},
        "train_recipe": str(recipe), "rounds": 2, "reference": "previous",
        "eval": {"num_samples": 1, "max_tokens": 8},
    }  # fmt: skip
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def outputs(run: Path) -> dict:
    """What a finished loop produced: pairs, final weights, eval tables."""
    out = {}
    for r in (1, 2):
        out[f"pairs{r}"] = (run / f"round-{r}/pairs/pairs.jsonl").read_text()
        out[f"model{r}"] = (run / f"round-{r}/train/final/model.safetensors").read_bytes()
        out[f"eval{r}"] = json.loads((run / f"round-{r}/eval/eval.json").read_text())
    return out


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "csd_fast", "loop", "--config", str(config)]


def run_until_killed(config: Path, ready) -> str:
    """Start the loop, SIGKILL it once ready() is true; the killed run's output."""
    log = config.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(_cli(config), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the loop ended before the kill point:\n{log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


@pytest.mark.slow
def test_two_rounds_kill9_in_three_stages_equals_uninterrupted(tmp_path, assets):
    whole = write_config(tmp_path / "a" / "loop.yaml", assets)
    done = subprocess.run(_cli(whole), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    want = outputs(tmp_path / "a" / "runs" / "t")
    assert "round-2" in want["eval2"]["systems"] and "round-1" in want["eval2"]["systems"]
    # round 2 trained from round 1's policy against it as reference (reference: previous)
    saved = yaml.safe_load((tmp_path / "a/runs/t/round-2/train/config.yaml").read_text())
    assert saved["script"]["model_name_or_path"].endswith("round-1/train/final")
    assert saved["script"]["ref_model_name_or_path"] is None  # frozen copy of that policy

    config = write_config(tmp_path / "b" / "loop.yaml", assets)
    run = tmp_path / "b" / "runs" / "t"
    kills = [
        ("round-1/sample", lambda: (run / "round-1/sample/shard-00000.parquet").exists()),
        ("round-1/train", lambda: (run / "round-1/train/checkpoint-2").exists()),
        ("round-2/sample", lambda: (run / "round-2/sample/shard-00000.parquet").exists()),
    ]
    for key, ready in kills:
        run_until_killed(config, ready)
        manifest = json.loads((run / "loop.json").read_text())
        assert manifest["steps"][key]["state"] in ("running", "done")
    final = subprocess.run(_cli(config), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout + final.stderr
    assert outputs(run) == want  # nothing lost, nothing doubled: the same bytes and tables
    steps = json.loads((run / "loop.json").read_text())["steps"]
    assert all(s["state"] == "done" for s in steps.values()) and len(steps) == 10

    # a new beta: round 1's sampling, scores and pairs stay; its training and all after redo
    changed = write_config(tmp_path / "b" / "loop.yaml", assets, train_overrides={"beta": 0.2})
    loop = Loop(LoopConfig.from_yaml(changed))
    stale = {s["key"] for s in loop.plan() if steps[s["key"]]["fingerprint"] != s["fingerprint"]}
    assert stale == {"round-1/train", "round-1/eval"} | {f"round-2/{s}" for s in
                                                           ("sample", "score", "pairs", "train",
                                                            "eval")}  # fmt: skip
    assert "stale" in loop.status() and "round-1  sample     done" in loop.status()


def test_until_from_and_config_errors(tmp_path, assets, capsys):
    config = write_config(tmp_path / "loop.yaml", assets, rounds=1)
    assert main(["--config", str(config), "--until", "pairs"]) == 0
    run = tmp_path / "runs" / "t"
    steps = json.loads((run / "loop.json").read_text())["steps"]
    assert set(steps) == {"round-1/sample", "round-1/score", "round-1/pairs"}
    assert main(["--config", str(config), "--from", "eval"]) == 2  # train is not done yet
    assert "needs round-1/train" in capsys.readouterr().err
    before = (run / "round-1/score/scores-00000.parquet").stat().st_mtime_ns
    assert main(["--config", str(config), "--from", "pairs", "--until", "pairs"]) == 0
    assert (run / "round-1/score/scores-00000.parquet").stat().st_mtime_ns == before
    assert "round-1/pairs: running" in capsys.readouterr().out  # redone, upstream kept
    # a new sampling temperature invalidates everything downstream of sampling, and says why
    changed = write_config(tmp_path / "loop.yaml", assets, rounds=1,
                           sampling={"temperature": 0.5, "max_tokens": 8, "seed": 0,
                                     "shard_size": 4})  # fmt: skip
    assert main(["--config", str(changed), "--until", "sample"]) == 0
    out = capsys.readouterr().out
    assert "round-1/sample: sampling.temperature 1.0 -> 0.5" in out
    assert "round-1/score: an upstream step changed" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "base_model": "m", "reward_model": "r",
                                   "prompts": "p", "beta": 0.1}))  # fmt: skip
    assert main(["--config", str(bad)]) == 2
    assert "unknown option(s) ['beta']" in capsys.readouterr().err
