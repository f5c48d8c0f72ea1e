"""`csd sample` / `csd translate` on the transformers backend: --shard i/N, data parallel, resume
refusals, markdown through a real model. (The vLLM engine is tested in test_pipeline.py.)

    python -m pytest -q tests/sampling/test_commands.py
"""

from __future__ import annotations

import json

import pytest

from csd_fast.sampling import read_samples
from csd_fast.sampling.sample import main as sample
from csd_fast.sampling.store import ManifestMismatch
from tests.sampling.models import build_policy, write_prompts


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return build_policy(tmp_path_factory.mktemp("cmd") / "policy")


def _args(policy, prompts, out, *extra):
    return [
        "--model",
        str(policy),
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        "--num-samples",
        "2",
        "--max-tokens",
        "3",
        "--backend",
        "hf",
        "--profile",
        "cpu",
        "--shard-size",
        "2",
        *extra,
    ]


def test_shard_i_of_n_over_a_count_that_does_not_divide(policy, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 7)  # 4 shards of 2, 2, 2, 1 prompts over N=3
    out = tmp_path / "s"
    for i in range(3):
        assert sample(_args(policy, prompts, out, "--shard", f"{i}/3")) == 0
        assert (out / (f"settings.shard-{i}-of-3.yaml")).exists()
    rows = read_samples(out).to_list()
    ids = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(ids) == len(set(ids)) == 7 * 2
    assert sorted({r["prompt"] for r in rows}) == sorted(
        json.loads(line)["prompt"] for line in open(prompts)
    )
    # rerun of a finished task: nothing redone; other settings: refused, naming the setting
    assert sample(_args(policy, prompts, out, "--shard", "1/3")) == 0
    with pytest.raises(ManifestMismatch) as e:
        sample(_args(policy, prompts, out, "--temperature", "0.5"))
    assert "settings.temperature: manifest has 1.0, this command 0.5" in e.value.message


@pytest.mark.slow
def test_data_parallel_workers_split_the_shards(policy, tmp_path):
    """Two engine processes (one per 'device'), each its own static share; one full set."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "dp"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(repo))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "csd_fast",
            "sample",
            *_args(policy, prompts, out, "--data-parallel", "2", "--overwrite"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0:" in p.stdout and "rank 1:" in p.stdout
    assert "[rank 0]" in p.stdout + p.stderr and "[rank 1]" in p.stdout + p.stderr
    rows = read_samples(out).to_list()
    assert len({(r["prompt_id"], r["sample_index"]) for r in rows}) == len(rows) == 10


def test_translate_keeps_ids_groups_and_markdown(policy, tmp_path):
    from csd_fast.sampling.translate import main as translate

    doc = "## Step `one`\n\n```py\nprint('keep')\n```\n- a dog\n"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 5, "prompt": doc, "response": "It is red."}) + "\n")
    out = tmp_path / "tr"
    assert (
        translate(
            [
                "--model",
                str(policy),
                "--input",
                str(src),
                "--output",
                str(out),
                "--languages",
                "de,da",
                "--fields",
                "prompt,response",
                "--backend",
                "hf",
                "--profile",
                "cpu",
                "--max-tokens",
                "3",
            ]
        )
        == 0
    )
    rows = read_samples(out).to_list()
    assert [(r["id"], r["group"], r["lang"]) for r in rows] == [
        ("5", "5", "en"),
        ("5", "5", "de"),
        ("5", "5", "da"),
    ]
    assert rows[0]["prompt"] == doc and rows[0]["response"] == "It is red."
    for r in rows[1:]:
        text = r["prompt"]
        assert text.startswith("## ") and "`one`" in text and text.endswith("\n")
        assert "```py\nprint('keep')\n```\n- " in text
        assert r["response"] and r["response"] != "It is red."
    # the output is a prompt set: csd sample reads it through its manifest
    from csd_fast.sampling.inputs import load_prompts

    assert [(p.id, p.lang) for p in load_prompts(out)] == [("5", "en"), ("5", "de"), ("5", "da")]


def test_translate_drops_empty_translations_and_says_so(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csd_fast.sampling.translate import main as translate

    # a translator with nothing to say: a zero final norm makes every logit 0, so greedy decoding
    # takes token 0, <pad>, a special token that decodes to ""
    mute = build_policy(tmp_path / "mute")
    model = AutoModelForCausalLM.from_pretrained(mute)
    assert AutoTokenizer.from_pretrained(mute).convert_ids_to_tokens(0) == "<pad>"
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(mute)
    src = write_prompts(tmp_path / "in.jsonl", 3, langs=("en",))
    out = tmp_path / "tr"
    argv = ["--model", str(mute), "--input", str(src), "--output", str(out), "--languages", "da",
            "--backend", "hf", "--profile", "cpu", "--max-tokens", "3"]  # fmt: skip
    assert translate(argv) == 0
    rows = read_samples(out).to_list()
    assert [r["lang"] for r in rows] == ["en"] * 3  # the sources kept, no empty Danish prompt
    assert "dropped 3 translation(s) that came back empty" in capsys.readouterr().out
