"""Token-budget planner (csd_fast.planner): BFD, groups, ranks, epochs, native == Python.

    python -m pytest tests/test_planner.py -q

The native half runs only when csd_fast._planner is built (`python setup.py build_ext --inplace`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from csd_fast import planner
from csd_fast.planner import padding_efficiency, plan_batches

native = pytest.mark.skipif(not planner.native_available(), reason="csd_fast._planner not built")


def flat(plan):
    return [i for rank in plan for mb in rank for i in mb]


def test_best_fit_decreasing_by_hand():
    # sorted: 7(0) 6(3) 5(1) 4(4) 3(2) 2(5) -> bins {7,3}, {6,4}, {5,2}: 10, 10, 7 of 10
    costs = np.array([7, 5, 3, 6, 4, 2])
    (rank,) = plan_batches(costs, 10, seed=0, epoch=0, impl="python")
    assert sorted(rank) == [[0, 2], [1, 5], [3, 4]]
    assert padding_efficiency(costs, [rank], 10) == pytest.approx(27 / 30)


def test_best_fit_prefers_least_room_then_oldest_bin():
    # 7 -> bin 0 (room 3), 6 -> bin 1 (room 4), 3 -> bin 0: the least room that still fits
    assert planner._bfd_python(np.array([7, 6, 3, 3]), 10).tolist() == [0, 1, 0, 1]
    # 6, 6 leave two bins with room 4: the 4 goes to the older one
    assert planner._bfd_python(np.array([6, 6, 4]), 10).tolist() == [0, 1, 0]


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_pair_once_within_budget(world_size):
    rng = np.random.default_rng(1)
    costs = rng.integers(1, 60, 500)
    plan = plan_batches(costs, 100, seed=5, epoch=2, world_size=world_size, impl="python")
    assert sorted(flat(plan)) == list(range(500))
    assert all(costs[mb].sum() <= 100 for rank in plan for mb in rank)
    assert len({len(rank) for rank in plan}) == 1  # same number of steps on every rank
    assert padding_efficiency(costs, plan, 100) > 0.97


def test_ranks_token_balanced():
    rng = np.random.default_rng(2)
    costs = np.clip(rng.lognormal(5.5, 0.8, 4000), 8, 1024).astype(np.int64)
    plan = plan_batches(costs, 2048, seed=0, epoch=0, world_size=4, impl="python")
    loads = [sum(int(costs[mb].sum()) for mb in rank) for rank in plan]
    assert max(loads) - min(loads) <= 2048  # within one micro-batch of each other
    # per step, the ranks' micro-batches are of similar size (a round of similar bins): only the
    # round of BFD's last, part-filled bins may differ by much
    spreads = sorted(
        max(int(costs[mb].sum()) for mb in step) - min(int(costs[mb].sum()) for mb in step)
        for step in zip(*plan, strict=True)
    )
    assert spreads[-2] <= 16, spreads[-5:]


def test_deterministic_per_seed_and_reshuffled_per_epoch():
    costs = np.random.default_rng(3).integers(1, 50, 300)
    a = plan_batches(costs, 128, seed=7, epoch=0)
    assert a == plan_batches(costs, 128, seed=7, epoch=0)
    b = plan_batches(costs, 128, seed=7, epoch=1)
    assert a != b
    # reshuffled at the bin level: the same micro-batches, in another order
    assert sorted(map(tuple, a[0])) == sorted(map(tuple, b[0]))
    assert plan_batches(costs, 128, seed=8, epoch=0) != a


def test_groups_stay_together():
    costs = np.array([30, 30, 20, 25, 25, 10, 40])
    groups = np.array([0, 0, 1, 2, 2, 3, 4])  # CLO: pairs 0+1 and 3+4 are one example each
    plan = plan_batches(costs, 60, seed=0, epoch=0, groups=groups, world_size=2)
    where = {i: (r, s) for r, rank in enumerate(plan) for s, mb in enumerate(rank) for i in mb}
    assert where[0] == where[1] and where[3] == where[4]
    assert sorted(flat(plan)) == list(range(7))
    with pytest.raises(ValueError, match=r"group of pairs \[0, 1\] costs 60"):
        plan_batches(costs, 59, seed=0, epoch=0, groups=groups)


def test_errors_name_the_pair():
    with pytest.raises(
        ValueError, match="pair 2 costs 11 tokens, more than max_tokens_per_batch=10"
    ):
        plan_batches(np.array([3, 4, 11]), 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="impl"):
        plan_batches(np.array([3]), 10, seed=0, epoch=0, impl="rust")


def test_more_ranks_than_bins_splits_then_repeats():
    plan = plan_batches(np.array([5, 5, 5]), 100, seed=0, epoch=0, world_size=3)
    assert [len(r) for r in plan] == [1, 1, 1] and sorted(flat(plan)) == [0, 1, 2]
    with pytest.warns(UserWarning, match="repeating 1"):
        plan = plan_batches(np.array([5]), 100, seed=0, epoch=0, world_size=2)
    assert plan == [[[0]], [[0]]]


@pytest.mark.parametrize("impl", ["python", pytest.param("native", marks=native)])
def test_empty_input(impl):
    none = np.zeros(0, dtype=np.int64)
    assert plan_batches(none, 10, seed=0, epoch=0, impl=impl) == [[]]
    assert plan_batches(none, 10, seed=0, epoch=0, world_size=3, impl=impl) == [[], [], []]
    assert plan_batches(none, 10, seed=0, epoch=0, groups=none, impl=impl) == [[]]


def _both(costs, budget, **kw):
    """(native plan, python plan), each with the warnings it raised."""
    out = []
    for impl in ("native", "python"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = plan_batches(costs, budget, impl=impl, **kw)
        out.append((plan, [str(w.message) for w in caught]))
    return out


@native
def test_native_matches_python_on_random_inputs():
    rng = np.random.default_rng(4)
    # budgets on both sides of the 64-bit word edges of the native room set, and past 16-bit keys
    edges = [1, 2, 63, 64, 65, 4095, 4096, 4097, 70000]
    for trial in range(90):
        n = int(rng.integers(1, 400))
        budget = edges[trial % len(edges)] if trial % 2 else int(rng.integers(8, 3000))
        hi = max(1, budget // int(rng.integers(1, 8)))
        costs = rng.integers(0 if trial % 5 == 0 else 1, hi + 1, n)  # zero-cost pairs too
        costs[rng.integers(0, n)] = budget  # a pair that fills the budget
        order = np.argsort(-costs, kind="stable")
        sorted_costs = np.ascontiguousarray(costs[order], dtype=np.int64)
        want = planner._bfd_python(sorted_costs, budget)
        got = np.frombuffer(planner._native.bfd(sorted_costs, budget), dtype=np.int64)
        np.testing.assert_array_equal(got, want)
        kw = dict(seed=trial, epoch=trial % 3, world_size=int(rng.integers(1, 9)))
        groups = rng.integers(0, n, n) if trial % 2 else None
        if groups is not None and np.bincount(groups, weights=costs).max() > budget:
            groups = None
        (native_plan, native_warn), (python_plan, python_warn) = _both(
            costs, budget, groups=groups, **kw
        )
        assert native_plan == python_plan, (trial, budget, kw)
        assert native_warn == python_warn


@native
def test_native_matches_python_when_ranks_split_and_repeat():
    # few, big pairs over many ranks: bins are split (several times) and then repeated
    for n, world_size in [(1, 8), (3, 8), (9, 4), (13, 8), (2, 2)]:
        costs = np.full(n, 30)
        costs[::2] = 70
        groups = np.arange(n) // 2
        for g in (None, groups):
            (native_plan, native_warn), (python_plan, python_warn) = _both(
                costs, 200, seed=1, epoch=0, world_size=world_size, groups=g
            )
            assert native_plan == python_plan and native_warn == python_warn
            assert all(isinstance(i, int) for rank in native_plan for mb in rank for i in mb)


@native
def test_native_matches_python_on_a_large_plan():
    costs = np.clip(np.random.default_rng(5).lognormal(6.0, 0.7, 20000), 8, 4096).astype(np.int64)
    groups = np.arange(20000) // 2  # CLO: two pairs per example
    for g in (None, groups):
        (native_plan, _), (python_plan, _) = _both(
            costs, 8192, seed=3, epoch=4, world_size=8, groups=g
        )
        assert native_plan == python_plan


@native
def test_native_rejects_bad_buffers():
    with pytest.raises(ValueError, match="int64"):
        planner._native.bfd(np.array([1, 2], dtype=np.int32), 10)
    with pytest.raises(ValueError, match="outside"):
        planner._native.bfd(np.array([11], dtype=np.int64), 10)
    with pytest.raises(ValueError, match="outside"):
        planner._native.plan(np.array([-1], dtype=np.int64), 10, 2)
    with pytest.raises(ValueError, match="starts <= ends"):
        planner._native.lists(np.arange(3), np.array([0]), np.array([4]))
    got = planner._native.lists(np.arange(5), np.array([0, 2, 1]), np.array([2, 2, 4]))
    assert got == [[0, 1], [], [1, 2, 3]]
