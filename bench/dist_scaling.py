"""Data-parallel scaling of `csd train` under FSDP2: tokens/s per rank at 1 and N ranks.

    python -m bench.dist_scaling                  # CPU: 1 and 2 ranks (gloo), tiny model
    python -m bench.dist_scaling --nproc 8 --model 1b --device cuda    # a GPU node (NCCL/RCCL)

Weak scaling: every rank keeps the same micro-batch (B pairs), so N ranks train N times the
pairs per step. Each world size runs in its own torchrun launch (`--worker` below) with the model
and rows of bench/e2e_dpo.py; step times come from on_step_end and the warm-up steps are dropped.
Rows (long format, bench/README.md): `tokens_per_s_per_rank` per world size and
`scaling_efficiency` = tokens/s of N ranks / (N x tokens/s of 1 rank). On CPU each rank gets one
thread (OMP_NUM_THREADS=1) at every world size, so the ratio measures communication and
sharding overhead, not thread counts; on a shared 2-core VM it is a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

NAME = "fsdp_scaling"


def worker(out: str, shape: dict, steps: int, warmup: int, device: str) -> None:
    from transformers import TrainerCallback

    from bench.e2e_dpo import _assets
    from csd_fast import DPOConfig, DPOTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_dir, rows = _assets(shape, shape["B"] * world * (steps + warmup))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=shape["B"],
        max_steps=steps + warmup, learning_rate=1e-6, logging_steps=10**6, save_strategy="no",
        report_to="none", gradient_checkpointing=False, bf16=device == "cuda",
        use_cpu=device == "cpu", padding_free=True, fused=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = DPOTrainer(str(model_dir), args=args, train_dataset=rows, callbacks=[Clock()])
    prompt, chosen, rejected = trainer.train_pairs.lengths()
    per_pair = 2 * prompt + chosen + rejected  # packed: the prompt once per sequence
    plan = trainer._plan(trainer.train_pairs, "train", 0)
    tokens = int(sum(per_pair[i] for idx in plan[warmup:] for i in idx))
    trainer.train()
    seconds = stamps[-1] - stamps[warmup - 1]
    result = {"world": world, "tokens": tokens, "seconds": seconds}
    gathered = trainer.dist.all_gather_objects(result)
    if trainer.dist.is_main:
        Path(out).write_text(json.dumps(gathered))


def launch(world: int, shape: dict, steps: int, warmup: int, device: str) -> list[dict]:
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), "-m", "bench.dist_scaling", "--worker", str(out), "--shape",
           common.shape_str(shape), "--steps", str(steps), "--warmup", str(warmup),
           "--device", device]  # fmt: skip
    proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"world={world} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dist_scaling")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--shape", default="model=tiny,B=4,P=64,C=32")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print, do not append to the CSV")
    ns = p.parse_args(argv)
    shape = common.parse_shape(ns.shape)
    if ns.worker:
        worker(ns.worker, shape, ns.steps, ns.warmup, ns.device)
        return 0
    per_rank = {}
    for world in sorted({1, ns.nproc}):
        ranks = launch(world, shape, ns.steps, ns.warmup, ns.device)
        per_rank[world] = [r["tokens"] / r["seconds"] for r in ranks]
    env = common.environment()
    device = common.device_slug(ns.device)
    rows = []
    for world, rates in per_rank.items():
        p50, p20, p80 = common.quantiles(rates)
        rows.append({"provider": f"csd-fsdp-{world}", "metric": "tokens_per_s_per_rank",
                     "unit": "tokens/s", "p50": f"{p50:.6g}", "p20": f"{p20:.6g}",
                     "p80": f"{p80:.6g}"})  # fmt: skip
    single = per_rank[1][0]
    eff = sum(per_rank[ns.nproc]) / (ns.nproc * single)
    rows.append(
        {
            "provider": f"csd-fsdp-{ns.nproc}",
            "metric": "scaling_efficiency",
            "unit": "ratio",
            "p50": f"{eff:.4g}",
            "p20": f"{eff:.4g}",
            "p80": f"{eff:.4g}",
        }
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in rows:
        r.update(op_or_scenario=NAME, mode="train", shape=common.shape_str(shape), device=device,
                 timestamp=stamp, **env)  # fmt: skip
        print(f"{r['provider']:>12} {r['metric']:<22} {r['p50']:>10} {r['unit']}")
    if not ns.no_write:
        common.append_rows(rows, common.results_dir() / f"{device}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
