"""FlexAttention for the packed layouts equals the padded layout; the dense fallback says why.

    python -m pytest tests/test_attention_flex.py -q

CPU runs flex uncompiled (CSD_FAST_FLEX=eager) and forward-only (torch 2.13 has no CPU backward
for it): the same mask_mod / score_mod / BlockMask the compiled GPU kernel reads, checked on tiny
models with sliding windows, Gemma-2's softcap and GQA. On a GPU the gradients are checked too
(the compiled kernel, natively, in `python -m bench gpu-check`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attention import assert_same_step, dpo_step, examples, make_model, seq_logps

from csd_fast import attention
from csd_fast.batch import collate_padded
from csd_fast.packing import collate_packed

pytest.importorskip("torch.nn.attention.flex_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_flex_packed_and_prefix_equal_padded(name, monkeypatch):
    monkeypatch.setenv("CSD_FAST_FLEX", "eager" if DEVICE == "cpu" else "auto")
    model = make_model(name, seed=4).to(DEVICE)
    ex = examples(seed=11)
    padded = collate_padded(ex, 0, max_length=12).to(DEVICE)
    with torch.no_grad():
        want_logps = seq_logps(model, padded)
    want = dpo_step(model, padded) if DEVICE != "cpu" else None
    attention.enable_packed_attention(model)
    calls = []
    flex = attention._flex_attention
    monkeypatch.setattr(attention, "_flex_attention", lambda *a: calls.append(a[-1]) or flex(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no dense fallback may run
        for sharing in (False, True):
            b = collate_packed(ex, 0, max_length=12, prefix_sharing=sharing, row_capacity=24)
            b = b.to(DEVICE)
            with torch.no_grad():
                torch.testing.assert_close(seq_logps(model, b), want_logps)
            if want is not None:  # the backward too, where flex has one
                assert_same_step(dpo_step(model, b), want)
    assert calls


def test_flex_block_mask_matches_dense_mask():
    """The BlockMask's mask_mod and the dense mask agree on every (query, key), window included."""
    from torch.nn.attention.flex_attention import create_mask

    ex = examples(seed=5, n=6)
    b = collate_packed(ex, 0, prefix_sharing=True, row_capacity=40)
    seg, branch = b.model_kwargs["csd_segment_ids"], b.model_kwargs["csd_branch_ids"]
    pos = b.model_kwargs["position_ids"]
    R, T = seg.shape
    for window in (None, 3):
        dense = attention.packed_mask(seg.clone(), branch, pos, window)  # (R, 1, T, T)
        block = attention.flex_block_mask(seg.clone(), branch, pos, window)
        full = create_mask(block.mask_mod, R, 1, T, T, device="cpu")
        assert torch.equal(full, dense)
        assert block.shape[-2:] == (T, T)


@pytest.mark.parametrize(
    "setting, why", [("0", "CSD_FAST_FLEX=0"), ("auto", "opt-in|no backward"),
                     ("eager", "no backward on CPU")],
)  # fmt: skip
def test_dense_fallback_warns_naming_why(setting, why, monkeypatch):
    monkeypatch.setenv("CSD_FAST_FLEX", setting)
    model = make_model("llama", seed=5)
    attention.enable_packed_attention(model)
    b = collate_packed(examples(seed=2), 0, max_length=12)
    if setting != "0" and DEVICE != "cpu":
        pytest.skip("on a GPU flex runs")
    with pytest.warns(RuntimeWarning, match=f"dense .*flash-attn.*({why})"):
        dpo_step(model, b)


def test_dense_sliding_window_mask_has_no_wide_transient():
    """The window test compares positions without a T x T int64 difference: peak extra memory
    stays near the bool mask itself."""
    T = 2048
    seg = torch.zeros(1, T, dtype=torch.long)
    branch = torch.zeros(1, T, dtype=torch.int8)
    pos = torch.arange(T)[None]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mask = attention.packed_mask(seg, branch, pos, sliding_window=64)
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest <= 2 * T * T  # bool T x T is T*T bytes; an int64 difference would be 8 T*T
    assert mask[0, 0, 100, 37] and not mask[0, 0, 100, 36] and not mask[0, 0, 100, 101]
