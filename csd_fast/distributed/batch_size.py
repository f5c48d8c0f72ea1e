"""`auto_find_batch_size` under torchrun: an out-of-memory restarts the job with 0.9x the batch.

    torchrun --max-restarts 8 --nproc_per_node 8 -m csd_fast train --auto_find_batch_size ...
    csd train --nproc 8 --auto_find_batch_size ...     # passes --max-restarts itself

One process retries in place (trl_compat.batch_size_search). Several cannot: a rank that runs
out of memory in the middle of FSDP's collectives leaves the others waiting in the next one,
and no rank can leave a collective safely to agree on a smaller size. So the rank that ran out
records the next size, `int(0.9 * size)`, in `output_dir/auto_batch_size.json` (atomically; any
rank may, with the same content) and fails; torchrun ends every worker and, given restarts,
starts them again. A restarted worker (TORCHELASTIC_RESTART_COUNT > 0) reads the record, takes
its size if it was made for the same requested size and world size, and starts the run over
from step 0 in the same output_dir, replacing the failed attempt's results: what transformers'
in-process retry does. A launch that is not a restart ignores the record. A resume from the
run's checkpoints keeps the size found, as on one process (trl_compat.resumed_batch_size).
Tested: tests/distributed/test_auto_batch_size.py (a simulated out-of-memory on one of two
ranks, a torchrun restart, the same run as one process with the found global batch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORD = "auto_batch_size.json"


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def read_record(output_dir) -> dict | None:
    path = Path(output_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resume_after_restart(trainer) -> bool:
    """On a torchrun restart after an out-of-memory: the recorded size (True), else False."""
    args = trainer.args
    record = read_record(args.output_dir)
    trainer.requested_batch_size = args.per_device_train_batch_size
    if restart_count() == 0 or record is None:
        return False
    if (record.get("requested"), record.get("world_size")) != (
        args.per_device_train_batch_size,
        trainer.dist.world_size,
    ):
        return False
    args.per_device_train_batch_size = int(record["found"])
    if trainer.dist.is_main:
        print(f"[csd-fast] restart {restart_count()} after an out-of-memory: "
              f"per_device_train_batch_size={record['found']} (auto_find_batch_size, from "
              f"{Path(args.output_dir) / RECORD}); the run starts over", flush=True)  # fmt: skip
    return True


def record_smaller_size(trainer, error: BaseException) -> None:
    """After this rank ran out of memory: write the next size (or fail at zero), then the
    caller re-raises so torchrun ends the job and restarts it."""
    from csd_fast.rundir import write_text_atomically

    args = trainer.args
    size = args.per_device_train_batch_size
    smaller = int(size * 0.9)
    if smaller == 0:
        raise RuntimeError("No executable batch size found, reached zero.") from error
    record = {"requested": trainer.requested_batch_size, "found": smaller,
              "world_size": trainer.dist.world_size, "failed_with": size}  # fmt: skip
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.output_dir) / RECORD, json.dumps(record) + "\n")
    print(f"[csd-fast] rank {trainer.dist.rank}: out of memory with per_device_train_batch_size"
          f"={size}: the job must start again with {smaller} (auto_find_batch_size; torchrun "
          "does when launched with --max-restarts)", flush=True)  # fmt: skip
