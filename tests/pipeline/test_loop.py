"""`csd loop`: two rounds end to end, kill -9 in three stages, invalidation, --until/--from, status.

Real parts throughout: the demo's tiny Llama as the policy, a tiny Bradley-Terry reward model,
the transformers stages (`engine: hf`; the vLLM stages are tests/pipeline/test_loop_vllm.py),
`csd train`, `csd eval`. The killed run is a subprocess ended with SIGKILL from outside, at
moments chosen by watching its output folder. Run: python -m pytest tests/pipeline/test_loop.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csd_fast.pipeline.demo import build_demo_models, write_demo_prompts
from csd_fast.pipeline.loop import Loop, LoopConfig, main
from tests.pipeline.loop_helpers import TINY_TRAIN, loop_cli, outputs, run_until_killed


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    policy, rm = build_demo_models(d)
    prompts, held = write_demo_prompts(d, limit_train=8, limit_eval=4)
    return {"policy": str(policy), "rm": str(rm), "prompts": str(prompts), "eval": str(held)}


def write_config(path: Path, assets: dict, **changes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = path.parent / "train.yaml"
    recipe.write_text(yaml.safe_dump(TINY_TRAIN))
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


@pytest.mark.slow
def test_two_rounds_kill9_in_three_stages_equals_uninterrupted(tmp_path, assets):
    whole = write_config(tmp_path / "a" / "loop.yaml", assets)
    done = subprocess.run(loop_cli(whole), capture_output=True, text=True, timeout=900)
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
    final = subprocess.run(loop_cli(config), capture_output=True, text=True, timeout=900)
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


def test_icr_ranks_each_later_round_with_the_previous_policy(tmp_path, assets):
    icr = {"policy": "english-dpo", "reference": assets["policy"], "beta": 0.1}
    for reference, want_ref in (("previous", "round-1/train/final"), ("base", None)):
        icr_loop = {
            "rounds": 3,
            "pair_strategy": "icr",
            "pair_options": icr,
            "reference": reference,
        }
        config = write_config(tmp_path / reference / "loop.yaml", assets, **icr_loop)
        plan = {s["key"]: s for s in Loop(LoopConfig.from_yaml(config)).plan()}
        assert "ranker" not in plan["round-1/pairs"]["inputs"]  # round 1: pair_options' models
        for r in (2, 3):
            assert plan[f"round-{r}/pairs"]["settings"]["options"] == icr
            ranker = plan[f"round-{r}/pairs"]["inputs"]["ranker"]
            assert ranker["policy"].endswith(f"round-{r - 1}/train/final")
        # round 3's ranker reference: what round 2 trained against
        ref3 = plan["round-3/pairs"]["inputs"]["ranker"]["reference"]
        assert ref3.endswith(want_ref) if want_ref else ref3 == assets["policy"]
        assert plan["round-2/pairs"]["inputs"]["ranker"]["reference"] == assets["policy"]
        # a retrained round 1 reaches round 2's pairs through the ranker
        changed = write_config(tmp_path / reference / "loop.yaml", assets, **icr_loop,
                               train_overrides={"beta": 0.3})  # fmt: skip
        again = {s["key"]: s for s in Loop(LoopConfig.from_yaml(changed)).plan()}
        assert again["round-1/pairs"]["fingerprint"] == plan["round-1/pairs"]["fingerprint"]
        assert again["round-2/pairs"]["fingerprint"] != plan["round-2/pairs"]["fingerprint"]
    # the run folder moved elsewhere: the same fingerprints (models are named by their steps)
    moved = write_config(tmp_path / "base" / "loop.yaml", assets, **icr_loop,
                         root=str(tmp_path / "elsewhere"))  # fmt: skip
    there = {s["key"]: s["fingerprint"] for s in Loop(LoopConfig.from_yaml(moved)).plan()}
    assert there == {k: s["fingerprint"] for k, s in plan.items()}


def test_engine_options_are_checked_and_fingerprinted_when_they_change_outputs(tmp_path, assets):
    def plan(**options):
        config = write_config(tmp_path / "loop.yaml", assets, engine="vllm", engine_options=options)
        return {s["key"]: s for s in Loop(LoopConfig.from_yaml(config)).plan()}

    base = plan(profile="cpu", max_model_len=128)
    assert base["round-1/sample"]["inputs"]["engine_options"]["max_model_len"] == 128
    prints = {k: s["fingerprint"] for k, s in base.items()}
    # how a stage runs on this machine does not redo it ...
    same = plan(profile="cuda", max_model_len=128, env={"VLLM_CPU_KVCACHE_SPACE": 2},
                data_parallel="2")  # fmt: skip
    assert {k: s["fingerprint"] for k, s in same.items()} == prints
    # ... what the engine computes with does: sampling and everything after it
    other = plan(profile="cpu", max_model_len=128, engine_arg={"kv_cache_dtype": "fp8"})
    assert other["round-1/sample"]["fingerprint"] != prints["round-1/sample"]
    assert other["round-2/eval"]["fingerprint"] != prints["round-2/eval"]
    hf = write_config(tmp_path / "loop.yaml", assets, engine="hf")
    assert Loop(LoopConfig.from_yaml(hf)).plan()[0]["fingerprint"] != prints["round-1/sample"]
    with pytest.raises(ValueError, match=r"engine_options: unknown option\(s\) \['dtype'\]"):
        LoopConfig.from_yaml(write_config(tmp_path / "loop.yaml", assets,
                                          engine_options={"dtype": "bfloat16"}))  # fmt: skip


def test_a_second_loop_on_the_same_run_folder_is_refused(tmp_path, assets, capsys):
    config = write_config(tmp_path / "loop.yaml", assets, rounds=1)
    run = tmp_path / "runs" / "t"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from csd_fast.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1], command='csd loop (the other one)').acquire(); "
         "print('held', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--config", str(config), "--until", "sample"]) == 2
        err = capsys.readouterr().err
        assert "being written by" in err and "csd loop (the other one)" in err
        assert not (run / "loop.json").exists()  # nothing was started
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the next loop takes over and says so
    assert main(["--config", str(config), "--until", "sample"]) == 0
    assert "ended without finishing" in capsys.readouterr().out
