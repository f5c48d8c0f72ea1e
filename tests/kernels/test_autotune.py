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


@pytest.mark.parametrize("fp32", [False, True], ids=["half", "fp32"])
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("tgt", ["sm80", "sm90", "gfx90a", "hip", "interpreter", "other"])
def test_configs_are_valid_tl_dot_tiles(table, tgt, fp32):
    configs = TABLES[table](tgt, fp32=fp32)
    assert configs
    for cfg in configs:
        for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H"):
            block = cfg.kwargs[key]
            assert block >= 16 and block & (block - 1) == 0, (tgt, cfg)  # tl.dot: pow2 >= 16
        assert cfg.num_warps in (1, 2, 4, 8, 16)


@pytest.mark.parametrize("fp32", [False, True], ids=["half", "fp32"])
@pytest.mark.parametrize("table", list(TABLES))
def test_gfx90a_configs_fit_lds(table, fp32):
    """MI250X: 64 KiB LDS per CU and wavefront 64 (num_warps=8 is 512 lanes, the maximum)."""
    for cfg in TABLES[table]("gfx90a", fp32=fp32):
        assert autotune.lds_bytes(cfg) <= autotune.GFX90A_LDS_BYTES, cfg
        assert cfg.num_warps <= 8 and cfg.num_stages <= 2, cfg


def test_target_is_interpreter_under_triton_interpret():
    if not autotune.is_interpreter():
        pytest.skip("runs on a GPU")
    assert autotune.target() == "interpreter"
    assert autotune.upcast_for_dot(torch.bfloat16) and not autotune.upcast_for_dot(torch.float32)
    assert autotune.dot_precision(torch.float32) == "ieee"
    assert autotune.dot_precision(torch.bfloat16) is None


@pytest.mark.parametrize("programs", [8, 4 * 132, 4 * 110])  # interpreter, H100 SXM, MI250X GCD
@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_forward_split_fills_the_device(programs, block_n, monkeypatch):
    """Whatever the device size and the config's BLOCK_N: row blocks x splits reach the program
    count unless the vocabulary runs out of columns; no split without need; fewer rows, more
    splits; a wider BLOCK_N (fewer row blocks) never gets fewer splits."""
    monkeypatch.setattr(autotune, "num_programs_hint", lambda: programs)
    V = 32003
    most = autotune.logprob_split_v(1, V, 1)  # the most splits this vocabulary allows here
    previous = None
    for N in (1, 5, 47, 300, 2048, 1 << 16):
        split = autotune.logprob_split_v(N, V, block_n)
        row_blocks = -(-N // block_n)
        assert 1 <= split <= V
        if row_blocks >= programs:
            assert split == 1, (N, split)
        else:
            assert split * row_blocks >= programs or split == most, (N, split)
        if previous is not None:
            assert split <= previous
        previous = split
        assert autotune.logprob_split_v(N, V, 2 * block_n) >= split


def test_split_stays_within_the_vocabulary(monkeypatch):
    monkeypatch.setattr(autotune, "num_programs_hint", lambda: 10_000)
    for V in (17, 100, 1031, 32003):
        split = autotune.logprob_split_v(1, V, 64)
        assert split < V or V < 64  # each split keeps many columns: the combine stays cheap
        assert split >= 1


@pytest.mark.parametrize("block_n", [16, 64])
def test_dh_split_planes_stay_within_budget(block_n, monkeypatch):
    monkeypatch.setattr(autotune, "num_programs_hint", lambda: 4 * 132)
    N, V, H = 5, 32003, 64
    unlimited = autotune.logprob_bwd_split_v(N, V, H, block_n, budget_bytes=1 << 40)
    assert unlimited == autotune.logprob_split_v(N, V, block_n)
    for planes in (1, 2, 3):
        budget = planes * N * H * 4
        split = autotune.logprob_bwd_split_v(N, V, H, block_n, budget_bytes=budget)
        assert split == min(planes, unlimited)
    assert autotune.logprob_bwd_split_v(N, V, H, block_n, budget_bytes=1) == 1
