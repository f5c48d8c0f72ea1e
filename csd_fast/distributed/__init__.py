"""Data-parallel training on PyTorch's own stack: FSDP2, DCP checkpoints, torchrun, SLURM.

    env.py            process group from torchrun's environment (NCCL / RCCL / gloo)
    fsdp.py           fully_shard per decoder layer + untied head + PairScorer root
    checkpoint.py     sharded DCP checkpoints, consolidated HF export (`csd export`)
    sharded_table.py  precomputed reference log-probs scored across ranks
    launch.py         `csd train --nproc N` (torchrun) and `csd export`
    memory.py         `csd train --plan`: per-device memory estimate

Nothing here runs on one process: a single-process run never creates a process group.
"""
