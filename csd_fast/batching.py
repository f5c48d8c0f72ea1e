"""Epoch plans: which pairs form each micro-batch, and how they are laid out.

Two ways to cut an epoch into micro-batches:
* by count (TRL's way): `per_device_train_batch_size` pairs each, order random (seeded by
  `data_seed or seed` and the epoch, so a resumed run replays the same order) or sequential;
* by tokens (`max_tokens_per_batch`): the best-fit-decreasing planner in `csd_fast.planner`
  fills micro-batches up to the budget without splitting a pair (or a CLO example).

The layout is independent of the plan: padded (TRL's collator), packed (`padding_free`) or
prefix-shared (`prefix_sharing`), all producing a `csd_fast.batch.PairBatch`.

Data parallel (`rank_plans`): by count, the single-process plan of global batches of
`world_size * batch_size` pairs is dealt out, block by block, to the ranks (DistributedSampler's
interleave), so N ranks x b pairs see exactly the pairs of 1 rank x N*b; by tokens, the planner
balances its bins across `world_size` ranks itself. Every rank's plan has the same length.
(`batch.py` is the micro-batch contract and padded collation, `packing.py` the packed layouts,
`planner.py` the token-budget bin packing; this module decides which pairs go together.)
`PlanBatches` collates a plan's micro-batches, in DataLoader workers when asked, pinned on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

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


def rank_plans(
    num_examples: int,
    epoch: int,
    opts: BatchingOptions,
    world_size: int,
    costs: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[list[list[int]]]:
    """plan[rank][micro] for `world_size` ranks; world_size 1 is `[epoch_plan(...)]`.

    A rank may get an empty micro-batch when a last global batch has fewer pairs than ranks;
    the loop then runs a zero-weight stand-in so every rank joins the same collectives."""
    if world_size == 1:
        return [epoch_plan(num_examples, epoch, opts, costs, groups)]
    if opts.max_tokens_per_batch:
        from csd_fast.planner import plan_batches

        if costs is None:
            raise ValueError("max_tokens_per_batch needs per-pair token costs")
        epoch_seed = epoch if opts.shuffle else 0
        return plan_batches(
            costs, opts.max_tokens_per_batch, seed=opts.seed, epoch=epoch_seed,
            world_size=world_size, groups=groups,
        )  # fmt: skip
    wide = replace(opts, batch_size=opts.batch_size * world_size)
    blocks = epoch_plan(num_examples, epoch, wide, costs, groups)
    plans: list[list[list[int]]] = [[] for _ in range(world_size)]
    for block in blocks:
        for rank, part in enumerate(_deal(block, world_size, groups)):
            plans[rank].append(part)
    return plans


def stand_in(plans, k: int) -> list[int]:
    """For a rank with no pair in micro-batch k of `plans` (plan[rank][micro]): the first pair of
    another rank's, run at zero weight so that every rank joins the same collectives."""
    return next(plan[k][:1] for plan in plans if plan[k])


def _deal(block: list[int], world_size: int, groups: np.ndarray | None) -> list[list[int]]:
    """Split one global batch over the ranks: interleaved pairs, or whole CLO groups."""
    if groups is None:
        return [block[r::world_size] for r in range(world_size)]
    units: dict[int, list[int]] = {}
    for i in block:
        units.setdefault(int(groups[i]), []).append(i)
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for unit in units.values():  # each group to the rank with the fewest pairs so far
        min(parts, key=len).extend(unit)
    return parts


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
        pad_to_multiple_of=opts.pad_to_multiple_of,
    )


class PlanBatches:
    """The collated micro-batches of a plan, indexable like a map-style Dataset.

    `examples(idx)` returns the example dicts of one micro-batch (with any cached reference
    values); `collate` lays them out. Iterate with `iterate(device, workers, pin_memory)`."""

    def __init__(self, plan: list[list[int]], examples: Callable, collate: Callable):
        self.plan, self.examples, self.collate = plan, examples, collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> PairBatch:
        return self.collate(self.examples(self.plan[k]))

    def iterate(
        self,
        device: torch.device,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> Iterator[PairBatch]:
        """Micro-batches on `device`, in plan order. With workers, collation runs ahead in
        DataLoader processes (prefetch_factor batches each) and host tensors are pinned so the
        copy to the GPU is asynchronous; without, batches are built on demand as before."""
        if not workers:
            for k in range(len(self)):
                yield self[k].to(device)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self,
            batch_size=None,  # items are whole micro-batches already
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory and device.type == "cuda",
            prefetch_factor=prefetch_factor,
        )
        for batch in loader:
            yield batch.to(device)
