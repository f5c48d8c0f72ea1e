"""Tests of csd_fast.kernels.autotune: the per-target config tables and split heuristics.

python -m pytest tests/kernels/test_autotune.py -q
"""

from __future__ import annotations

import pytest
import torch
from csd_fast.kernels import autotune

triton = pytest.importorskip("triton")
TABLES = {
    "fwd": autotune.logprob_fwd_configs,
    "dh": autotune.logprob_bwd_dh_configs,
    "dw": autotune.logprob_bwd_dw_configs,
}


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("tgt", ["sm80", "sm90", "gfx90a", "hip", "interpreter", "other"])
def test_configs_are_valid_tl_dot_tiles(table, tgt):
    configs = TABLES[table](tgt)
    assert configs
    for cfg in configs:
        for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H"):
            block = cfg.kwargs[key]
            assert block >= 16 and block & (block - 1) == 0, (tgt, cfg)  # tl.dot: pow2 >= 16
        assert cfg.num_warps in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("table", list(TABLES))
def test_gfx90a_configs_fit_lds(table):
    """MI250X: 64 KiB LDS per CU and wavefront 64 (num_warps=8 is 512 lanes, the maximum)."""
    for cfg in TABLES[table]("gfx90a"):
        assert autotune.lds_bytes(cfg) <= autotune.GFX90A_LDS_BYTES, cfg
        assert cfg.num_warps <= 8 and cfg.num_stages <= 2, cfg


def test_target_is_interpreter_under_triton_interpret():
    if not autotune.is_interpreter():
        pytest.skip("runs on a GPU")
    assert autotune.target() == "interpreter"
    assert autotune.upcast_for_dot(torch.bfloat16) and not autotune.upcast_for_dot(torch.float32)
    assert autotune.dot_precision(torch.float32) == "ieee"
    assert autotune.dot_precision(torch.bfloat16) is None


def test_split_heuristics():
    # many row blocks fill the device alone: no split; tiny N: split, but only over >= 64 columns
    assert autotune.logprob_split_v(4096, 1031) == 1
    assert autotune.logprob_split_v(5, 1031) > 1
    assert autotune.logprob_split_v(5, 100) == 2
    # the dH partial planes (split, N, H) fp32 stay within the budget
    assert autotune.logprob_bwd_split_v(5, 1031, 16, budget_bytes=5 * 16 * 4 * 3) == 3
    assert autotune.logprob_bwd_split_v(5, 1031, 16, budget_bytes=1) == 1
