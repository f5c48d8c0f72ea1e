"""torchrun worker of tests/distributed/test_fsdp.py: runs scenarios on every rank, rank 0 saves.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py OUT MODE

MODE `parity`: every scenario of `scenarios.SCENARIOS` for its full length, plus the packed run
stopped at step 3 and resumed on the same two ranks, the packed run resumed on two ranks from
the single-process checkpoint OUT/one_rank/checkpoint-3 (written by the test), plus a
consolidated export of the packed run and the packed run with async checkpoints; results
(history, gathered weights) in OUT/<name>.pt. MODE `hsdp` (4 ranks): the scenarios of
`scenarios.HSDP_SCENARIOS`, each with its FSDP2 mesh. MODE `oom`: auto_find_batch_size after
a simulated out-of-memory on rank 1 (run under torchrun --max-restarts). MODE `kill`: the
packed run, where rank 1 kills itself with SIGKILL as the step-6 checkpoint starts writing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
import torch  # noqa: E402


def save(out: Path, name: str, trainer, **extra) -> None:
    result = {"history": scenarios.history(trainer), "weights": scenarios.weights(trainer)}
    result.update(extra)
    if trainer.dist.is_main:
        torch.save(result, out / f"{name}.pt")


def parity(out: Path) -> None:
    from csd_fast.refcache import model_fingerprint

    for name in scenarios.SCENARIOS:
        trainer = scenarios.build_trainer(name, 2, out / name)
        if name == "padded":  # the reference hash of a sharded model, from every rank
            prints = trainer.dist.all_gather_objects(model_fingerprint(trainer.model))
            zero = (trainer.state.is_world_process_zero, trainer.state.is_local_process_zero)
            flags = trainer.dist.all_gather_objects(zero)  # what reporting callbacks read
            if trainer.dist.is_main:
                torch.save(prints, out / "fingerprints.pt")
                torch.save(flags, out / "process_zero.pt")
        trainer.train()
        save(out, name, trainer)
        if name == "packed":
            trainer.save_model(str(out / "export"))
    # the same packed run, interrupted after its step-3 checkpoint and resumed on two ranks
    first = scenarios.build_trainer("packed", 2, out / "resume2", [scenarios.StopAt(3)])
    first.train()
    resumed = scenarios.build_trainer("packed", 2, out / "resume2")
    resumed.train(resume_from_checkpoint=True)
    save(out, "resume2", resumed)
    # a single-process checkpoint (HF layout + optimizer.pt), written by the test, on two ranks
    from_one = scenarios.build_trainer("packed", 2, out / "from_one")
    from_one.train(resume_from_checkpoint=str(out / "one_rank" / "checkpoint-3"))
    save(out, "from_one", from_one)
    async_run = scenarios.build_trainer("packed_async", 2, out / "async")
    async_run.train()
    save(out, "async", async_run)
    # a stream each rank already split for itself: refused (csd-fast deals the batches)
    import datasets
    from datasets.distributed import split_dataset_by_node

    rank = int(os.environ["RANK"])
    stream = datasets.Dataset.from_list(scenarios.ROWS).to_iterable_dataset()
    split = split_dataset_by_node(stream, rank=rank, world_size=2)
    try:
        scenarios.build_trainer("stream", 2, out / "split", train_dataset=split)
    except ValueError as e:
        if rank == 0:
            (out / "split_stream.txt").write_text(str(e))
    # the reference store the ref_store run wrote, read back by a second two-rank run
    store = str(out / "ref_store" / "refstore")
    hit = scenarios.build_trainer("ref_store", 2, out / "ref_store_hit", ref_cache_dir=store)
    hit.train()
    save(out, "ref_store_hit", hit)


def hsdp(out: Path) -> None:
    """The 4-rank scenarios (2 nodes x 2 ranks); each result also records the FSDP2 mesh."""
    for name in scenarios.HSDP_SCENARIOS:
        trainer = scenarios.build_trainer(name, trainer_world(), out / name)
        weight = next(p for n, p in trainer.scorer.named_parameters() if "layers.0" in n)
        mesh = (tuple(weight.device_mesh.shape), [type(p).__name__ for p in weight.placements])
        trainer.train()
        save(out, name, trainer, mesh=mesh)


def oom(out: Path) -> None:
    """auto_find_batch_size on 2 ranks: rank 1 runs out of memory at batch 2 (torchrun restarts
    the job, which then trains with batch 1 from step 0)."""
    trainer = scenarios.build_trainer("padded", 2, out / "oom", auto_find_batch_size=True,
                                      callbacks=[scenarios.OutOfMemoryOnLastRank()])  # fmt: skip
    trainer.train()
    save(out, "oom", trainer)


def trainer_world() -> int:
    return int(os.environ["WORLD_SIZE"])


def kill(out: Path) -> None:
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def dying_save(state, checkpoint_id):
        if "checkpoint-6" in str(checkpoint_id) and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(state, checkpoint_id=checkpoint_id)

    dcp.save = dying_save
    trainer = scenarios.build_trainer("packed", 2, out / "killed")
    trainer.train()


if __name__ == "__main__":
    target, mode = Path(sys.argv[1]), sys.argv[2]
    target.mkdir(parents=True, exist_ok=True)
    {"parity": parity, "kill": kill, "hsdp": hsdp, "oom": oom}[mode](target)
    from csd_fast.distributed.env import shutdown

    shutdown()
