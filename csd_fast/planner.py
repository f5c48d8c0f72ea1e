"""Token-budget micro-batches: best-fit-decreasing bin packing of pairs, balanced across ranks.

    from csd_fast.planner import plan_batches, padding_efficiency
    plan = plan_batches(costs, 16384, seed=0, epoch=0, world_size=8)  # plan[rank][step] = indices
    python -m pytest tests/test_planner.py -q

A pair's cost is the tokens it occupies in its layout (prompt+chosen+prompt+rejected packed,
prompt+chosen+rejected prefix-shared; `csd_fast.batching.pair_costs`). Pairs are never split and a
CLO `group` (both pairs of one example) is one unit. Steps:

1. best-fit decreasing: units by cost, largest first (ties: lower index first); each goes to the
   open bin with the least room that still fits it (ties: the older bin), else opens a bin;
2. world_size > 1: bins are split (the one with most units first) until every rank can get the same
   number; if no bin can be split, bins are repeated from the cheapest, like DistributedSampler;
3. bins sorted by tokens (heaviest first) form rounds of world_size similar bins; inside a round the
   heaviest bin goes to the rank with the fewest tokens so far, so ranks wait on each other
   neither per step nor per epoch;
4. the epoch shuffles the rounds (numpy generator seeded by (seed, epoch)): the bins themselves
   are the same every epoch, their order is not.

Steps 1-3 also exist in C++ (`csrc/planner.cpp`, module `csd_fast._planner`, built by setup.py
when a compiler is present), which returns flat arrays; the shuffle stays numpy's and the nested
lists are built once, in C++. Both find "least room that fits" the same way (the least room
value >= cost held by an open bin, then the lowest bin id among those), so they return identical
plans (tests/test_planner.py); ~34x faster on 1M pairs (bench/ops_planner.py).
"""

from __future__ import annotations

import heapq
import warnings

import numpy as np

try:
    from csd_fast import _planner as _native
except ImportError:  # no compiler at install time: the Python loop below is the planner
    _native = None

IMPLS = ("auto", "python", "native")


def native_available() -> bool:
    return _native is not None


def _bfd_python(costs: np.ndarray, budget: int) -> np.ndarray:
    """Bin id of each unit, `costs` already in processing order (decreasing)."""
    size = 1
    while size < budget + 1:
        size *= 2
    count = [0] * (2 * size)  # count[node]: non-empty room buckets under node
    heaps: dict[int, list[int]] = {}  # room -> min-heap of bin ids with that room

    def update(room: int, delta: int) -> None:
        i = room + size
        while i:
            count[i] += delta
            i >>= 1

    def first_at_least(lo: int) -> int:
        i = lo + size
        if count[i]:
            return lo
        while i > 1:  # climb until a right sibling holds a bucket
            if not i & 1 and count[i + 1]:
                i += 1
                break
            i >>= 1
        else:
            return -1
        while i < size:  # then descend to its leftmost bucket
            i = 2 * i if count[2 * i] else 2 * i + 1
        return i - size

    out = np.empty(len(costs), dtype=np.int64)
    num_bins = 0
    for u, cost in enumerate(costs.tolist()):
        room = first_at_least(cost)
        if room < 0:
            b, room = num_bins, budget
            num_bins += 1
        else:
            heap = heaps[room]
            b = heapq.heappop(heap)
            if not heap:
                update(room, -1)
        out[u] = b
        room -= cost
        heap = heaps.setdefault(room, [])
        if not heap:
            update(room, 1)
        heapq.heappush(heap, b)
    return out


def _bfd_bins(unit_costs: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (unit ids grouped by bin, bin offsets), bins in opening order."""
    key = budget - unit_costs  # largest first, ties by index; 16-bit keys get numpy's radix sort
    key = key.astype(np.uint16) if budget < 2**16 else key
    order = np.argsort(key, kind="stable")
    sorted_costs = np.ascontiguousarray(unit_costs[order], dtype=np.int64)
    bin_of = _bfd_python(sorted_costs, int(budget))
    by_bin = np.argsort(bin_of, kind="stable")  # keeps processing order inside a bin
    offsets = np.zeros(int(bin_of.max(initial=-1)) + 2, dtype=np.int64)
    np.cumsum(np.bincount(bin_of), out=offsets[1:])
    return order[by_bin], offsets


def _units(costs: np.ndarray, groups: np.ndarray | None):
    """(unit costs, pairs bin by unit, unit offsets): one unit per pair, or per CLO group.

    Unit u holds pairs[offsets[u]:offsets[u + 1]] (index order); units are ordered by their
    first pair. Without groups the last two are None (unit u is pair u).
    """
    if groups is None:
        return costs, None, None
    groups = np.asarray(groups)
    if groups.shape != costs.shape:
        raise ValueError(f"groups has shape {groups.shape}, costs {costs.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")  # units by first pair
    unit = rank[inverse]
    members = np.argsort(unit, kind="stable")
    offsets = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(np.bincount(unit), out=offsets[1:])
    return np.bincount(unit, weights=costs).astype(np.int64), members, offsets


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def _plan_native(unit_costs, budget, seed, epoch, world_size, members, member_offsets):
    """plan_batches with steps 1-3 in C++ (flat arrays) and the lists built once, in C++ too."""
    unit_ids, start, end, assigned, repeated = _native.plan(unit_costs, budget, world_size)
    unit_ids, start, end, assigned = (
        np.frombuffer(b, dtype=np.int64) for b in (unit_ids, start, end, assigned)
    )
    if repeated:
        num_bins = len(start) - repeated
        warnings.warn(
            f"{num_bins} micro-batches cannot be split over {world_size} ranks: repeating "
            f"{repeated} of them this epoch",
            stacklevel=3,
        )
    values = unit_ids
    if members is not None:  # units to their pairs; bin bounds move from units to pairs
        sizes = member_offsets[unit_ids + 1] - member_offsets[unit_ids]
        values = members[_ranges(member_offsets[unit_ids], sizes)].astype(np.int64)
        cum = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=cum[1:])
        start, end = cum[start], cum[end]
    rounds = assigned.reshape(-1, world_size)
    rng = np.random.default_rng([seed, epoch])
    seq = rounds[rng.permutation(len(rounds))].T.ravel()  # bins in output order, rank by rank
    bins = _native.lists(values, start[seq], end[seq])
    steps = len(rounds)
    return [bins[r * steps : (r + 1) * steps] for r in range(world_size)]


def _equalise(bins: list[list[int]], world_size: int) -> list[list[int]]:
    """Make len(bins) a multiple of world_size: split the fullest-in-units bins, else repeat."""
    while len(bins) % world_size:
        b = max(range(len(bins)), key=lambda i: (len(bins[i]), -i))
        if len(bins[b]) < 2:
            break
        half = len(bins[b]) // 2
        bins.append(bins[b][half:])
        bins[b] = bins[b][:half]
    if len(bins) % world_size:
        missing = world_size - len(bins) % world_size
        warnings.warn(
            f"{len(bins)} micro-batches cannot be split over {world_size} ranks: repeating "
            f"{missing} of them this epoch",
            stacklevel=3,
        )
        bins += [bins[i % len(bins)] for i in range(missing)]
    return bins


def plan_batches(
    costs: np.ndarray,
    budget: int,
    *,
    seed: int,
    epoch: int,
    world_size: int = 1,
    groups: np.ndarray | None = None,
    impl: str = "auto",
) -> list[list[list[int]]]:
    """Per rank, the micro-batches (lists of pair indices) of one epoch; see the module docstring.

    `impl` picks the best-fit-decreasing core: "native" (C++), "python" or "auto" (native when
    built). Every rank gets the same number of micro-batches; each holds at most `budget` tokens.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if world_size < 1 or budget < 1:
        raise ValueError(f"need world_size >= 1 and budget >= 1, got {world_size}, {budget}")
    costs = np.asarray(costs, dtype=np.int64)
    if costs.ndim != 1:
        raise ValueError(f"costs must be 1-D, got shape {costs.shape}")
    if (costs < 0).any():
        raise ValueError(f"pair {int(np.argmax(costs < 0))} has a negative cost")
    unit_costs, members, member_offsets = _units(costs, groups)
    over = np.flatnonzero(unit_costs > budget)
    if len(over):
        u = int(over[0])
        if members is None:
            what = f"pair {u}"
        else:
            what = f"group of pairs {members[member_offsets[u] : member_offsets[u + 1]].tolist()}"
        raise ValueError(
            f"{what} costs {int(unit_costs[u])} tokens, more than max_tokens_per_batch={budget}"
        )
    if impl == "native" or (impl == "auto" and _native is not None):
        if _native is None:
            raise ImportError(
                "csd_fast._planner is not built (python setup.py build_ext --inplace)"
            )
        unit_costs = np.ascontiguousarray(unit_costs, dtype=np.int64)
        return _plan_native(
            unit_costs, int(budget), seed, epoch, world_size, members, member_offsets
        )
    flat, offsets = _bfd_bins(unit_costs, budget)
    flat_list = flat.tolist()
    ends = offsets.tolist()
    bins = [flat_list[ends[k] : ends[k + 1]] for k in range(len(ends) - 1)]
    if world_size > 1 and bins and len(bins) % world_size:
        bins = _equalise(bins, world_size)  # splits between units: a group stays whole
        tokens = [int(unit_costs[b].sum()) for b in bins]
    else:
        tokens = np.add.reduceat(unit_costs[flat], offsets[:-1]).tolist() if bins else []
    if members is not None:  # units back to pairs, a group's pairs in index order
        groups_of = np.split(members, member_offsets[1:-1])
        bins = [[i for u in b for i in groups_of[u].tolist()] for b in bins]
    heavy_first = sorted(range(len(bins)), key=lambda i: (-tokens[i], i))
    load = [0] * world_size
    assigned = []
    for k in range(0, len(bins), world_size):
        # the round's heaviest bin to the lightest rank so far, the next to the next, ...
        ranks = sorted(range(world_size), key=lambda r: (load[r], r))
        step = [0] * world_size
        for r, b in zip(ranks, heavy_first[k : k + world_size], strict=True):
            step[r] = b
            load[r] += tokens[b]
        assigned.append(step)
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    rng = np.random.default_rng([seed, epoch])
    for k in rng.permutation(len(assigned)).tolist():
        for r, b in enumerate(assigned[k]):
            plan[r].append(bins[b])
    return plan


def padding_efficiency(costs: np.ndarray, plan: list[list[list[int]]], budget: int) -> float:
    """Real tokens / capacity (micro-batches x budget) of a plan: 1.0 means no padding at all."""
    costs = np.asarray(costs, dtype=np.int64)
    n_bins = sum(len(rank) for rank in plan)
    used = sum(int(costs[b].sum()) for rank in plan for b in rank)
    return used / (n_bins * budget) if n_bins else 1.0
