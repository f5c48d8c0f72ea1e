"""Epoch plans: which pairs form each micro-batch, and how they are laid out.

Two ways to cut an epoch into micro-batches:
* by count (TRL's way): `per_device_train_batch_size` pairs each, order random (seeded by
  `data_seed or seed` and the epoch, so a resumed run replays the same order) or sequential;
* by tokens (`max_tokens_per_batch`): the best-fit-decreasing planner in `csd_fast.planner`
  fills micro-batches up to the budget without splitting a pair (or a CLO example).

The layout is independent of the plan: padded (TRL's collator), packed (`padding_free`) or
prefix-shared (`prefix_sharing`), all producing a `csd_fast.batch.PairBatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from csd_fast.batch import PairBatch, collate_padded


@dataclass(frozen=True)
class BatchingOptions:
    batch_size: int
    max_tokens_per_batch: int | None = None
    layout: str = "padded"  # padded | packed | prefix
    shuffle: bool = True
    seed: int = 42
    drop_last: bool = False
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None


def layout_for(padding_free: bool, prefix_sharing: bool, max_tokens_per_batch=None) -> str:
    """A token budget implies packing: padded rows would spend it on padding."""
    if prefix_sharing:
        return "prefix"
    return "packed" if padding_free or max_tokens_per_batch else "padded"


def pair_costs(
    lengths: tuple[np.ndarray, np.ndarray, np.ndarray], opts: BatchingOptions
) -> np.ndarray:
    """Tokens each pair occupies in a packed row: exactly what `collate_packed` places."""
    from csd_fast.packing import pair_costs as packed_costs

    prompt, chosen, rejected = lengths
    return packed_costs(
        prompt,
        chosen,
        rejected,
        max_length=opts.max_length,
        truncation_mode=opts.truncation_mode,
        prefix_sharing=opts.layout == "prefix",
    )


def epoch_plan(
    num_examples: int,
    epoch: int,
    opts: BatchingOptions,
    costs: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch, deterministic in (seed, epoch)."""
    if opts.max_tokens_per_batch:
        from csd_fast.planner import plan_batches

        if costs is None:
            raise ValueError("max_tokens_per_batch needs per-pair token costs")
        per_rank = plan_batches(
            costs,
            opts.max_tokens_per_batch,
            seed=opts.seed,
            epoch=epoch if opts.shuffle else 0,
            world_size=1,
            groups=groups,
        )
        return per_rank[0]  # both planner paths return lists of Python ints
    if groups is not None:
        return _grouped_plan(groups, epoch, opts)
    if opts.shuffle:
        g = torch.Generator().manual_seed(opts.seed + epoch)
        order = torch.randperm(num_examples, generator=g).tolist()
    else:
        order = list(range(num_examples))
    bs = opts.batch_size
    plan = [order[i : i + bs] for i in range(0, num_examples, bs)]
    if opts.drop_last and plan and len(plan[-1]) < bs:
        plan.pop()
    return plan


def _grouped_plan(groups: np.ndarray, epoch: int, opts: BatchingOptions) -> list[list[int]]:
    """Count-based batches that never split a group (CLO: an example's two pairs train together).

    Groups are shuffled as units (seeded like the ungrouped order) and packed in order into
    micro-batches of at most `batch_size` pairs; a group larger than that gets its own batch.
    """
    if opts.drop_last:
        raise NotImplementedError("dataloader_drop_last with CLO groups: batches vary in size")
    groups = np.asarray(groups)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # pair indices, grouped, in group-id order
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    by_id = np.split(order, bounds)
    members = [by_id[i].tolist() for i in np.argsort(first)]  # groups in first-seen order
    if opts.shuffle:
        g = torch.Generator().manual_seed(opts.seed + epoch)
        members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
    plan: list[list[int]] = []
    for m in members:
        if plan and len(plan[-1]) + len(m) <= opts.batch_size:
            plan[-1].extend(m)
        else:
            plan.append(list(m))
    return plan


def make_collate(opts: BatchingOptions, pad_token_id: int) -> Callable[[Sequence[dict]], PairBatch]:
    """The collate function of a layout, closed over the truncation and padding options."""
    if opts.layout == "padded":
        return lambda examples: collate_padded(
            list(examples),
            pad_token_id,
            max_length=opts.max_length,
            truncation_mode=opts.truncation_mode,
            pad_to_multiple_of=opts.pad_to_multiple_of,
        )
    from csd_fast.packing import collate_packed

    return lambda examples: collate_packed(
        list(examples),
        pad_token_id,
        max_length=opts.max_length,
        truncation_mode=opts.truncation_mode,
        prefix_sharing=opts.layout == "prefix",
    )
