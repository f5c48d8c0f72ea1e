"""auto_find_batch_size under torchrun: an out-of-memory on one rank restarts the job smaller.

    python -m pytest tests/distributed/test_auto_batch_size.py -q     (one torchrun, ~1 min)

Rank 1 of 2 raises CUDA's out-of-memory error at batch 2 (tests/distributed/scenarios.py);
torchrun (`--max-restarts 2`) ends both workers and starts them again; the restart reads the
recorded size (1) and trains from step 0: the same history and weights as one process with the
global batch of 2. A launch that is not a restart ignores the record; `csd train --nproc`
gives torchrun its restarts when the option is on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import scenarios
import torch
from test_fsdp import PADDING_KEYS, assert_same_run

from csd_fast.distributed import batch_size

WORKER = Path(__file__).with_name("worker.py")


@pytest.mark.slow
def test_out_of_memory_on_one_rank_restarts_the_job_with_a_smaller_batch(tmp_path):
    env = {**os.environ, "CSD_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "2",
           "--nproc_per_node", "2", str(WORKER), str(tmp_path), "oom"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "rank 1: out of memory with per_device_train_batch_size=2" in log
    assert "restart 1 after an out-of-memory: per_device_train_batch_size=1" in log
    record = json.loads((tmp_path / "oom" / batch_size.RECORD).read_text())
    assert record == {"requested": 2, "found": 1, "world_size": 2, "failed_with": 2}
    got = torch.load(tmp_path / "oom.pt", weights_only=False)
    # the global batch found (2 ranks x 1) on one process
    one = scenarios.build_trainer("padded", 1, tmp_path / "one", per_device_train_batch_size=2)
    one.train()
    assert_same_run(got, scenarios.history(one), scenarios.weights(one), PADDING_KEYS)


def test_only_a_restart_reads_the_record(tmp_path, monkeypatch):
    (tmp_path / batch_size.RECORD).write_text(
        json.dumps({"requested": 8, "found": 7, "world_size": 2, "failed_with": 8})
    )

    def trainer(size=8, world=2):
        args = SimpleNamespace(output_dir=str(tmp_path), per_device_train_batch_size=size)
        return SimpleNamespace(args=args, dist=SimpleNamespace(world_size=world, is_main=False))

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    fresh = trainer()
    assert not batch_size.resume_after_restart(fresh)
    assert fresh.args.per_device_train_batch_size == 8
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    for other in (trainer(size=16), trainer(world=4)):  # made for another run: not this one's
        assert not batch_size.resume_after_restart(other)
    restarted = trainer()
    assert batch_size.resume_after_restart(restarted)
    assert restarted.args.per_device_train_batch_size == 7


def test_csd_train_nproc_gives_torchrun_restarts_for_the_option():
    from csd_fast.cli import _restarts
    from csd_fast.distributed.launch import AUTO_BATCH_RESTARTS, torchrun_command

    base = ["--fused", "--output_dir", "out"]  # the built-in demo
    assert _restarts([*base, "--auto_find_batch_size"]) == AUTO_BATCH_RESTARTS
    assert _restarts([*base, "--auto_find_batch_size", "false"]) == 0
    assert _restarts(base) == 0
    cmd = torchrun_command(2, base, AUTO_BATCH_RESTARTS)
    assert cmd[cmd.index("--max-restarts") + 1] == str(AUTO_BATCH_RESTARTS)
    assert "--max-restarts" not in torchrun_command(2, base)
