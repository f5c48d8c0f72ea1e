"""Benchmark of the token-budget packing planner (best-fit-decreasing, 1M pairs): native vs Python.

    python -m bench --only plan_batches --quick

Providers: `python` and `native` (the csd_fast._planner extension, skipped when not built), both
through `csd_fast.planner.plan_batches(costs, max_tokens, seed=, epoch=, world_size=, groups=,
impl=)`. Costs are pair token counts drawn like a chat set (log-normal, median ~600). Mode "plan".
"""

from __future__ import annotations

import inspect

from bench.common import Case, Skip

NAME = "plan_batches"
PROVIDERS = ("python", "native")
MODES = ("plan",)
PRESETS = {
    "smoke": [{"pairs": 1000, "budget": 8192, "world": 1}],
    "quick": [{"pairs": 1_000_000, "budget": 16384, "world": 8}],
    "gpu": [{"pairs": 1_000_000, "budget": 65536, "world": 8}],
}


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    import numpy as np

    try:
        from csd_fast.planner import plan_batches
    except ImportError as e:
        raise Skip(f"csd_fast.planner not importable yet: {e}") from e
    if provider == "native":
        try:
            import csd_fast._planner  # noqa: F401
        except ImportError as e:
            raise Skip(f"native planner not built: {e}") from e
    if "impl" not in inspect.signature(plan_batches).parameters:
        raise Skip("plan_batches has no impl= switch to pick native or python")
    rng = np.random.default_rng(0)
    costs = np.clip(rng.lognormal(6.4, 0.6, shape["pairs"]), 16, shape["budget"]).astype(np.int64)

    def fn():
        return plan_batches(costs, shape["budget"], seed=0, epoch=0,
                            world_size=shape["world"], impl=provider)  # fmt: skip

    return Case(fn, items={"pairs": shape["pairs"]})
