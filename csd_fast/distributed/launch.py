"""Launch helpers: `csd train --nproc N` (torchrun on this node) and `csd export CKPT OUT`.

    csd train --nproc 8 --model_name_or_path M --dataset_name d.jsonl --output_dir out
      == python -m torch.distributed.run --standalone --nproc_per_node 8 -m csd_fast train ...
    csd export out/checkpoint-500 out/hf          # consolidated HF safetensors (from_pretrained)
    csd export out/checkpoint-500 out/hf --dtype bfloat16
    csd export out/checkpoint-500 out/hf --base_model M   # a 1-process LoRA checkpoint, merged

Several nodes: run torchrun yourself with a c10d rendezvous (examples/slurm/*.sbatch), since the
node count and the rendezvous host come from the scheduler.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def pop_option(argv: list[str], names: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """(value of `--name V` / `--name=V`, argv without it)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, inline = arg.partition("=")
        if key in names:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise SystemExit(f"{key} needs a value")
        else:
            rest.append(arg)
        i += 1
    return value, rest


# auto_find_batch_size under torchrun retries by restarting the job (distributed/batch_size.py):
# each restart takes 0.9x the size, so 8 reach 0.43x of the requested batch
AUTO_BATCH_RESTARTS = 8


def torchrun_command(nproc: int, train_argv: list[str], restarts: int = 0) -> list[str]:
    extra = ["--max-restarts", str(restarts)] if restarts else []
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", *extra,
        "--nproc_per_node", str(nproc), "-m", "csd_fast", "train", *train_argv,
    ]  # fmt: skip


def launch_if_asked(argv: list[str], restarts_for=None) -> tuple[int | None, list[str]]:
    """`--nproc N` outside torchrun: run the same command under torchrun, return its exit code.
    `restarts_for(argv)`: how many restarts torchrun may make (auto_find_batch_size's).

    Returns (None, argv without --nproc) when there is nothing to launch (no option, N == 1,
    or already inside torchrun, where the option is a no-op)."""
    value, rest = pop_option(argv, ("--nproc", "--nproc_per_node", "--nproc-per-node"))
    if value is None:
        return None, rest
    nproc = int(value)
    if nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1 or "LOCAL_RANK" in os.environ:
        return None, rest
    restarts = restarts_for(rest) if restarts_for else 0
    return subprocess.call(torchrun_command(nproc, rest, restarts)), rest


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="csd export",
        description="Write a training checkpoint (sharded DCP or HF layout) as a consolidated "
        "Hugging Face model directory (safetensors) that from_pretrained and vLLM load.",
    )
    parser.add_argument("checkpoint", help="a checkpoint-<step> directory")
    parser.add_argument("out", help="output directory (written atomically)")
    parser.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    parser.add_argument(
        "--base_model",
        "--base-model",
        default=None,
        help="the base model of a single-process LoRA checkpoint, when the adapter does not "
        "record it (its adapters are merged into these weights)",
    )
    ns = parser.parse_args(argv)
    from csd_fast.distributed.checkpoint import export_checkpoint

    try:
        out = export_checkpoint(ns.checkpoint, ns.out, dtype=ns.dtype, base_model=ns.base_model)
    except (OSError, NotImplementedError, ValueError) as e:  # OSError: an unreadable model
        print(f"csd export: {e}", file=sys.stderr)
        return 2
    print(f"[csd export] {ns.checkpoint} -> {out}")
    return 0
