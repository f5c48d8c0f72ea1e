"""auto_find_batch_size under torchrun: an out-of-memory on one rank restarts the job smaller.

    python -m pytest tests/distributed/test_auto_batch_size.py -q     (one torchrun, ~1 min)

Rank 1 of 2 raises CUDA's out-of-memory error at batch 2, at step 2 (after step 1 was logged;
tests/distributed/scenarios.py); torchrun (`--max-restarts 2`) ends both workers and starts
them again; the next round reads the recorded size (1), replaces the failed attempt's log and
trains from step 0: the same history and weights as one process with the global batch of 2.
Only the round right after the failure reads the record; a run with checkpoints is never
started over; `csd train --nproc` gives torchrun its restarts when the option is on.
"""

from __future__ import annotations

import json
import os
import shutil
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
    assert record == {"requested": 2, "found": 1, "world_size": 2, "failed_with": 2, "round": 0}
    got = torch.load(tmp_path / "oom.pt", weights_only=False)
    # the global batch found (2 ranks x 1) on one process
    one = scenarios.build_trainer("padded", 1, tmp_path / "one", per_device_train_batch_size=2)
    one.train()
    assert_same_run(got, scenarios.history(one), scenarios.weights(one), PADDING_KEYS)


def fake_trainer(out, size=8, world=2, round=1):
    args = SimpleNamespace(output_dir=str(out), per_device_train_batch_size=size,
                           accelerator_config=None)  # fmt: skip
    dist = SimpleNamespace(world_size=world, is_main=False, rank=1, round=round)
    return SimpleNamespace(args=args, dist=dist, requested_batch_size=size)


def test_only_the_next_round_reads_the_record(tmp_path):
    (tmp_path / batch_size.RECORD).write_text(json.dumps(
        {"requested": 8, "found": 7, "world_size": 2, "failed_with": 8, "round": 2}))  # fmt: skip
    for other in (fake_trainer(tmp_path, round=0), fake_trainer(tmp_path, round=2),
                  fake_trainer(tmp_path, round=4), fake_trainer(tmp_path, size=16, round=3),
                  fake_trainer(tmp_path, world=4, round=3)):  # fmt: skip
        assert not batch_size.resume_after_restart(other)  # not the round after, or not ours
        assert other.args.per_device_train_batch_size == other.requested_batch_size
    restarted = fake_trainer(tmp_path, round=3)
    assert batch_size.resume_after_restart(restarted)
    assert restarted.args.per_device_train_batch_size == 7


def test_a_run_with_checkpoints_is_never_started_over(tmp_path):
    from csd_fast.checkpoint import STATE_FILE

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / STATE_FILE).write_text("{}")
    with pytest.raises(RuntimeError, match="Resume it with per_device_train_batch_size=7"):
        batch_size.record_smaller_size(fake_trainer(tmp_path), MemoryError(), resumed=False)
    assert not (tmp_path / batch_size.RECORD).exists()
    shutil.rmtree(tmp_path / "checkpoint-5")
    with pytest.raises(RuntimeError, match="resumed run"):
        batch_size.record_smaller_size(fake_trainer(tmp_path), MemoryError(), resumed=True)
    split = fake_trainer(tmp_path, size=9, world=4)
    split.args.accelerator_config = {"split_batches": True}
    batch_size.record_smaller_size(split, MemoryError(), resumed=False)  # 8: a multiple of 4
    assert json.loads((tmp_path / batch_size.RECORD).read_text())["found"] == 8


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
