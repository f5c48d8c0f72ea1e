"""Process-group setup from torchrun's environment, and the few collectives the trainer uses.

    env = init_distributed()        # WORLD_SIZE > 1 (torchrun): init the group, pick the device
    env.rank, env.world_size, env.device, env.is_main
    total = env.all_reduce_sum(tensor)   # identity on one process

One process (no torchrun, or `--nproc_per_node 1`) never creates a process group: the trainer then
runs exactly the single-device code path, so single-process runs stay bit-exact with earlier
versions. Backends: NCCL on CUDA (RCCL under the same name on ROCm, where torch.cuda is HIP), gloo
on CPU. A rank that dies makes the others fail at their next collective within `CSD_DIST_TIMEOUT`
seconds (default 600) instead of hanging forever; torchrun then tears the job down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job; one process (no process group) is the default.

    `rank` / `world_size` place it among the data-parallel ranks (those that see different
    batches). Without tensor parallelism they are the job's; with it (tensor_parallel.py)
    `tp` processes share one data rank, `process_rank` / `process_world` are the job's, and
    the data collectives run over the data-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    round: int = 0  # torchrun restarts so far, as every rank counts them (see _join_round)
    process_rank: int | None = None  # None: `rank` (no tensor parallelism)
    process_world: int | None = None
    mesh: object = None  # the (dp, tp) DeviceMesh under tensor parallelism
    data_group: object = None  # the process group of the data-parallel ranks (None: all)

    @property
    def processes(self) -> int:
        return self.world_size if self.process_world is None else self.process_world

    @property
    def global_rank(self) -> int:
        return self.rank if self.process_rank is None else self.process_rank

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (gloo needs CPU tensors on CPU runs; NCCL device tensors)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.data_group)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """Every data rank's `obj`, in rank order (a list of one on a single process)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.data_group)
        return out

    def all_processes_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every process of the job (tensor peers too), in place: for decisions all
        processes must share (stop now, the same stream), not for data sums."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_processes_gather(self, obj) -> list:
        """Every process's `obj`, in job-rank order."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.processes
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's (or SLURM-launched torchrun's) variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("CSD_DIST_TIMEOUT", "600")))


def init_distributed(use_cpu: bool = False) -> DistEnv:
    """Join (or create) the default process group when torchrun started several processes."""
    rank, world, local = torchrun_world()
    accel = torch.cuda.is_available() and not use_cpu
    if world <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if accel else torch.device("cpu")
        return DistEnv(device=device)
    if accel:
        # one device per process: torchrun's LOCAL_RANK indexes the devices visible to the task
        # (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES as the launcher left them)
        torch.cuda.set_device(local % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    global _ROUND
    if not dist.is_initialized():
        kwargs = {"device_id": device} if accel else {}
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=_timeout()))
        _ROUND = _join_round(store, world)
        kwargs.update(store=dist.PrefixStore(f"csd_round_{_ROUND}", store), rank=rank,
                      world_size=world)  # fmt: skip
        dist.init_process_group(backend=backend, timeout=_timeout(), **kwargs)
    if dist.get_world_size() != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()}")
    return DistEnv(rank, world, local, device, backend, _ROUND)


_ROUND = 0


def _join_round(store, world: int) -> int:
    """Which start of the job this is (0, then one more per torchrun restart), the same on
    every rank. torchrun's agent keeps its store across restarts, so without keys of its own a
    restarted worker could read the dead round's peer addresses (gloo then connects to a dead
    rank); and TORCHELASTIC_RESTART_COUNT cannot tell the round: an agent whose own workers
    did not fail restarts them with its count unchanged. Every rank of a round adds one to a
    counter in that store; rounds never overlap (torchrun stops them all first)."""
    return (int(store.add("csd_fast/rank_arrivals", 1)) - 1) // world


def current_env() -> DistEnv:
    """The environment of an already initialised group (or the single-process one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistEnv()
    rank, world, local = dist.get_rank(), dist.get_world_size(), torchrun_world()[2]
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return DistEnv(rank, world, local, device, dist.get_backend(), _ROUND)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
