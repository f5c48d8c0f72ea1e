"""`auto_find_batch_size` under torchrun: an out-of-memory restarts the job with 0.9x the batch.

    torchrun --max-restarts 8 --nproc_per_node 8 -m csd_fast train --auto_find_batch_size ...
    csd train --nproc 8 --auto_find_batch_size ...     # passes --max-restarts itself

One process retries in place (trl_compat.batch_size_search). Several cannot: a rank that runs
out of memory in the middle of FSDP's collectives leaves the others waiting in the next one,
and no rank can leave a collective safely to agree on a smaller size. So the rank that ran out
records the next size, `int(0.9 * size)`, in `output_dir/auto_batch_size.json` (atomically; any
rank may, with the same content, with the job's round: env.DistEnv.round) and fails; torchrun
ends every worker and, given restarts, starts them again. In the next round, and only that one,
the workers take the recorded size (if it was made for the same requested size and world size)
and start the run over from step 0 in the same output_dir, replacing the failed attempt's logs:
what transformers' in-process retry does. A run that has written checkpoints, or was resumed, is
never started over (its checkpoints would go): its out-of-memory ends the job with the size to
resume at. Tested: tests/distributed/test_auto_batch_size.py (a simulated out-of-memory on one
of two ranks, a torchrun restart, the same run as one process with the found global batch).
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "auto_batch_size.json"


def read_record(output_dir) -> dict | None:
    path = Path(output_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fresh_record(output_dir, env, requested: int) -> dict | None:
    """The record the previous round wrote for this run (same requested size, same world), or
    None: a record of any older round (a later restart for another cause) is not this one's."""
    record = read_record(output_dir)
    if record is None or env.round == 0:
        return None
    mine = (record.get("requested"), record.get("world_size"), record.get("round"))
    return record if mine == (requested, env.world_size, env.round - 1) else None


def resume_after_restart(trainer) -> bool:
    """On the round right after an out-of-memory: take the recorded size (True), else False."""
    args = trainer.args
    trainer.requested_batch_size = args.per_device_train_batch_size
    record = fresh_record(args.output_dir, trainer.dist, args.per_device_train_batch_size)
    if record is None:
        return False
    args.per_device_train_batch_size = int(record["found"])
    if trainer.dist.is_main:
        print(f"[csd-fast] restart {trainer.dist.round} after an out-of-memory: "
              f"per_device_train_batch_size={record['found']} (auto_find_batch_size, from "
              f"{Path(args.output_dir) / RECORD}); the run starts over", flush=True)  # fmt: skip
    return True


def record_smaller_size(trainer, error: BaseException, resumed: bool) -> None:
    """After this rank ran out of memory: write the next size (or say why the job cannot
    restart smaller), then the caller re-raises so torchrun ends the job."""
    from csd_fast.checkpoint import list_checkpoints
    from csd_fast.rundir import write_text_atomically

    args = trainer.args
    size = args.per_device_train_batch_size
    world = trainer.dist.world_size
    smaller = int(size * 0.9)
    if (args.accelerator_config or {}).get("split_batches"):
        smaller -= smaller % world  # the global batch must still split over the ranks
    if smaller == 0:
        raise RuntimeError("No executable batch size found, reached zero.") from error
    kept = list_checkpoints(args.output_dir)
    if resumed or kept:  # a restart starts over: never at the cost of the run's checkpoints
        raise RuntimeError(
            f"out of memory with per_device_train_batch_size={size} after checkpoints were "
            f"written ({', '.join(p.name for p in kept) or 'resumed run'}): auto_find_batch_size "
            f"does not start such a run over. Resume it with per_device_train_batch_size="
            f"{smaller} and resume_with_changes=True"
        ) from error
    record = {"requested": trainer.requested_batch_size, "found": smaller, "world_size": world,
              "failed_with": size, "round": trainer.dist.round}  # fmt: skip
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.output_dir) / RECORD, json.dumps(record) + "\n")
    print(f"[csd-fast] rank {trainer.dist.rank}: out of memory with per_device_train_batch_size"
          f"={size}: the job must start again with {smaller} (auto_find_batch_size; torchrun "
          "does when launched with --max-restarts)", flush=True)  # fmt: skip
