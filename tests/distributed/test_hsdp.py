"""HSDP and no_shard with FSDP2 on CPU: 4 gloo ranks launched as 2 nodes x 2 == 1 rank x 4b.

    python -m pytest tests/distributed/test_hsdp.py -q     (one 4-rank launch, ~1-2 min)

Two torchrun agents on this host, node ranks 0 and 1, make a real 2-node job (LOCAL_WORLD_SIZE
2, WORLD_SIZE 4), so `fsdp="hybrid_shard"` finds its nodes the way it does on a cluster. Each
scenario of `scenarios.HSDP_SCENARIOS` is compared, whole logged history and final weights,
with the same scenario on one process with four times the per-device batch; the recorded
mesh proves which layout ran. The hybrid run's step-3 checkpoint resumes on one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import scenarios
import torch
from test_fsdp import PADDING_KEYS, RESUMED_SKIP, assert_same_run

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    env = {**os.environ, "CSD_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(WORKER),
                str(out),
                "hsdp",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    logs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (stdout, stderr) in zip(agents, logs, strict=True):
        assert agent.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return out


HSDP = ["Replicate", "Shard"]


@pytest.mark.parametrize(
    "name, mesh",
    [("hybrid", ((2, 2), HSDP)), ("no_shard", ((4, 1), HSDP)), ("accelerate", ((2, 2), HSDP)),
     ("deepspeed", ((4,), ["Shard"]))],
)  # fmt: skip
def test_four_ranks_match_one_rank_with_four_times_the_batch(four_ranks, tmp_path, name, mesh):
    got = torch.load(four_ranks / f"{name}.pt", weights_only=False)
    assert got["mesh"] == mesh
    trainer = scenarios.build_trainer(name, 1, tmp_path)
    trainer.train()
    skip = PADDING_KEYS if name == "no_shard" else PADDING_KEYS - {"num_tokens"}
    assert_same_run(got, scenarios.history(trainer), scenarios.weights(trainer), skip)
    if name == "hybrid":
        assert any("eval_loss" in h for h in got["history"])


def test_hybrid_checkpoint_resumes_on_one_process(four_ranks, tmp_path):
    want = torch.load(four_ranks / "hybrid.pt", weights_only=False)
    resumed = scenarios.build_trainer("hybrid", 1, tmp_path)
    resumed.train(resume_from_checkpoint=str(four_ranks / "hybrid" / "checkpoint-3"))
    got = {"history": scenarios.history(resumed), "weights": scenarios.weights(resumed)}
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)
