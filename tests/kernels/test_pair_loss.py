"""Tests of csd_fast.kernels.pair_loss against csd_fast.losses.preference_loss evaluated in fp64.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/kernels/conftest.py); fp32 results
are held to assert_close defaults against the fp64 truth.

    python -m pytest tests/kernels/test_pair_loss.py -q
"""

from __future__ import annotations

import pytest
import torch
from csd_fast.kernels import pair_loss as pl
from csd_fast.kernels.pair_loss import SUPPORTED, count_distinct, fused_pair_loss, segment_sum

from csd_fast.losses import LossParams, PairLogps, preference_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(pl.triton is None, reason="no triton")),
]


def slice_sums(x, offsets):
    """Segment sums by explicit slicing: the independent truth for segment_sum."""
    bounds = offsets.tolist()
    return torch.stack([x[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def make_batch(P, seed=0, empty=True):
    """Random per-token log-probs in 2P sequences of 0..40 tokens (one empty when `empty`)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (2 * P,), generator=g)
    if empty:
        lengths[P + 1] = 0  # a rejected completion truncated away: its length clamps to 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    N = int(offsets[-1])
    token_logps = -torch.rand(N, generator=g, dtype=torch.float64) * 3  # (N,)
    sums = slice_sums(token_logps, offsets)
    # references near the policy, so βΔ lands on both sides of the hinge and the sigmoid's middle
    ref_c = sums[:P] + torch.randn(P, generator=g, dtype=torch.float64) * 8
    ref_r = sums[P:] + torch.randn(P, generator=g, dtype=torch.float64) * 8
    return token_logps, offsets, ref_c, ref_r


def truth(token_logps, offsets, ref_c, ref_r, loss_type, **kw):
    """fp64 loss and d loss / d token_logps from csd_fast.losses."""
    P = ref_c.numel()
    x = token_logps.detach().double().requires_grad_()
    sums = slice_sums(x, offsets)
    lengths = offsets[1:] - offsets[:-1]
    params = LossParams(
        loss_type=(loss_type,),
        beta=kw.get("beta", 0.1),
        label_smoothing=kw.get("label_smoothing", 0.0),
        clo_lambda=kw.get("clo_lambda", 0.5),
    )
    logps = PairLogps(sums[:P], sums[P:], ref_c, ref_r, lengths[:P], lengths[P:],
                      sft_mask=kw.get("sft_mask"), group_ids=kw.get("group_ids"))  # fmt: skip
    loss = preference_loss(params, logps)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, sums[:P].detach(), sums[P:].detach()


CASES = {
    "sigmoid": {"beta": 0.1},
    "sigmoid-smoothing": {"beta": 0.2, "label_smoothing": 0.15},  # TRL 1.16's sigmoid ignores ε
    "hinge": {"beta": 0.3},
    "ipo": {"beta": 0.1},
    "robust": {"beta": 0.2, "label_smoothing": 0.1},
    "sigmoid_norm": {"beta": 2.0},
    "sft": {},
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", list(CASES))
def test_loss_and_grad_match_fp64(loss_type, impl):
    P = 7
    token_logps, offsets, ref_c, ref_r = make_batch(P, seed=len(loss_type))
    kw = CASES[loss_type]
    loss_type = loss_type.split("-")[0]
    want, want_grad, want_c, want_r = truth(token_logps, offsets, ref_c, ref_r, loss_type, **kw)
    x = token_logps.float().to(DEVICE).requires_grad_()
    loss, chosen, rejected = fused_pair_loss(
        x, offsets.to(DEVICE), ref_c.float().to(DEVICE), ref_r.float().to(DEVICE),
        loss_type=loss_type, impl=impl, **kw,
    )  # fmt: skip
    assert loss.shape == () and chosen.shape == rejected.shape == (P,)
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(loss.detach().cpu(), want.float())
    torch.testing.assert_close(chosen.cpu(), want_c.float())
    torch.testing.assert_close(rejected.cpu(), want_r.float())
    (grad,) = torch.autograd.grad(loss * 1.5, x)  # a non-unit incoming gradient
    torch.testing.assert_close(grad.cpu(), 1.5 * want_grad.float())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("clo_lambda", [0.5, 0.0])
def test_clo_matches_fp64(impl, with_groups, clo_lambda):
    # 3 CLO examples x (English pair, target pair); only target pairs feed the NLL
    P = 6
    token_logps, offsets, ref_c, ref_r = make_batch(P, seed=11, empty=False)
    kw = dict(
        beta=0.1,
        clo_lambda=clo_lambda,
        sft_mask=torch.tensor([False, True] * 3),
        group_ids=torch.tensor([4, 4, 9, 9, 2, 2]) if with_groups else None,
    )
    want, want_grad, _, _ = truth(token_logps, offsets, ref_c, ref_r, "clo", **kw)
    x = token_logps.float().to(DEVICE).requires_grad_()
    dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss, _, _ = fused_pair_loss(
        x, offsets.to(DEVICE), ref_c.float().to(DEVICE), ref_r.float().to(DEVICE),
        loss_type="clo", impl=impl, **dev,
    )  # fmt: skip
    torch.testing.assert_close(loss.detach().cpu(), want.float())
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad.cpu(), want_grad.float())
    # the gradient is constant within a sequence and zero on English chosen tokens when λ = 1
    seq = torch.repeat_interleave(torch.arange(2 * P), offsets[1:] - offsets[:-1])
    first = grad.cpu()[offsets[:-1]]
    torch.testing.assert_close(grad.cpu(), first[seq])


def test_sft_over_masked_pairs_by_hand():
    """sft = -(sum of masked chosen tokens) / (their count); worked: -(-1 - 2 - 3) / 3 = 2."""
    token_logps = torch.tensor([-1.0, -2.0, -3.0, -9.0, -5.0, -5.0])
    offsets = torch.tensor([0, 3, 4, 5, 6])  # chosen (3 tokens), chosen (1), rejected, rejected
    ref = torch.zeros(2)
    for impl in ("torch", "triton"):
        if impl == "triton" and pl.triton is None:
            continue
        loss, chosen, _ = fused_pair_loss(
            token_logps.to(DEVICE), offsets.to(DEVICE), ref.to(DEVICE), ref.to(DEVICE),
            loss_type="sft", sft_mask=torch.tensor([True, False], device=DEVICE), impl=impl,
        )  # fmt: skip
        assert loss.item() == pytest.approx(2.0)
        assert chosen.tolist() == [-6.0, -9.0]


def test_unsupported_and_bad_inputs_raise():
    token_logps, offsets, ref_c, ref_r = make_batch(3)
    with pytest.raises(ValueError, match="csd_fast.losses"):
        fused_pair_loss(token_logps, offsets, ref_c, ref_r, loss_type="exo_pair")
    assert "discopop" not in SUPPORTED
    with pytest.raises(ValueError, match="seq_offsets"):
        fused_pair_loss(token_logps, offsets[:-1], ref_c, ref_r)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_pair_loss(token_logps, offsets, ref_c, ref_r, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="impl"):
        fused_pair_loss(token_logps, offsets, ref_c, ref_r, impl="cuda")


def test_segment_sum_exact_with_empty_segments_and_grad():
    g = torch.Generator().manual_seed(2)
    offsets = torch.tensor([0, 0, 5, 5, 6, 300, 300])  # empty first, middle and last segments
    x = torch.randn(300, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    got = segment_sum(x, offsets.to(DEVICE))
    torch.testing.assert_close(got.cpu(), slice_sums(x.detach().cpu(), offsets))
    weights = torch.arange(6.0, dtype=torch.float64, device=DEVICE)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    seq = torch.repeat_interleave(torch.arange(6), offsets[1:] - offsets[:-1])
    torch.testing.assert_close(grad.cpu(), weights.cpu()[seq])
    # the same bits on every call (a sequential sum per segment, no atomics)
    assert torch.equal(segment_sum(x.detach(), offsets.to(DEVICE)), got.detach())


def test_count_distinct():
    ids = torch.tensor([9, 4, 4, 2, 9, 9], device=DEVICE)
    assert int(count_distinct(ids)) == 3
    assert int(count_distinct(ids[:0])) == 0
