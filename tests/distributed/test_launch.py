"""`csd train --nproc 2` end to end: torchrun, FSDP2 on gloo, a sharded checkpoint, the final
consolidated model; then `csd export` of that checkpoint gives the same weights.

Run: python -m pytest tests/distributed/test_launch.py -q    (~30 s: one torchrun launch)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import scenarios
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_csd_train_nproc_launches_torchrun_and_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = scenarios.tiny_tokenizer()
    scenarios.tiny_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in scenarios.ROWS))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "csd_fast", "train", "--nproc", "2", "--model_name_or_path",
           str(tmp_path / "model"), "--dataset_name", str(data), "--output_dir", str(out),
           "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "2",
           "--save_strategy", "steps", "--bf16", "false", "--use_cpu", "true",
           "--gradient_checkpointing", "false", "--report_to", "none", "--padding_free", "true",
           "--disable_tqdm", "true", "--logging_steps", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CSD_DIST_TIMEOUT": "60"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "checkpoint-2" / "dcp" / ".metadata").exists()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in (out / "checkpoint-2").iterdir()
    }
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1  # only rank 0 writes the metrics file
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    moved = [n for n, p in final.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert moved  # trained weights, not the initial ones

    from csd_fast.__main__ import main

    assert main(["export", str(out / "checkpoint-2"), str(tmp_path / "exported")]) == 0
    got = load_file(tmp_path / "exported" / "model.safetensors")
    want = load_file(out / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
