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
    """Where this process stands in the job; `world_size == 1` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (gloo needs CPU tensors on CPU runs; NCCL device tensors)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order (a list of one on a single process)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
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
    if not dist.is_initialized():
        kwargs = {"device_id": device} if accel else {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart:
            # torchrun's agent keeps its store across restarts: a restarted worker could read
            # the previous round's peer addresses (gloo then connects to a dead rank), so each
            # round gets keys of its own
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=_timeout()))
            kwargs.update(store=dist.PrefixStore(f"csd_restart_{restart}", store), rank=rank,
                          world_size=world)  # fmt: skip
        dist.init_process_group(backend=backend, timeout=_timeout(), **kwargs)
    if dist.get_world_size() != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()}")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def current_env() -> DistEnv:
    """The environment of an already initialised group (or the single-process one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistEnv()
    rank, world, local = dist.get_rank(), dist.get_world_size(), torchrun_world()[2]
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return DistEnv(rank, world, local, device, dist.get_backend())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
