"""Tests of csd_fast.kernels.linear_pair_loss: the head fused with the pair loss, against fp64.

Truth: the eager head in fp64 (fused_linear_logprob_ref), explicit slice sums and
csd_fast.losses.preference_loss, differentiated by autograd. fp32 results use assert_close
defaults; bf16 follows the house rule err <= 2 * err(plain torch bf16) + atol. Chunk budgets are
set small so chunks hold several pairs, one pair, or less than one pair (the recompute path).

    python -m pytest tests/kernels/test_linear_pair_loss.py -q
"""

from __future__ import annotations

import pytest
import torch
from csd_fast.kernels import linear_pair_loss as lpl
from csd_fast.kernels.linear_pair_loss import fused_linear_pair_loss
from csd_fast.kernels.logprob import fused_linear_logprob, fused_linear_logprob_ref

from csd_fast.losses import LossParams, PairLogps, preference_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
NO_TRITON = pytest.mark.skipif(lpl.triton is None, reason="no triton")
IMPLS = ["torch", pytest.param("triton", marks=NO_TRITON)]
HEADS = {"plain": {}, "gemma": {"softcap": 2.5, "temperature": 0.7},
         "cohere": {"logit_scale": 0.5, "bias": True}}  # fmt: skip


def make(P, H, V, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2 * P,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    N = int(offsets[-1])
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.25
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0] = labels[N // 2] = -100  # ignore_index holes inside sequences
    ref_c, ref_r = -torch.rand(P, generator=g) * 20, -torch.rand(P, generator=g) * 20
    cast = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), labels=labels.to(DEVICE),
                offsets=offsets.to(DEVICE), ref_c=ref_c.to(DEVICE),
                ref_r=ref_r.to(DEVICE))  # fmt: skip


def reference(case, loss_kw, head, dtype=torch.float64, sft_mask=None, group_ids=None):
    """Loss and gradients with every step in `dtype` through the engine's losses."""
    leaves = [None if case[k] is None else case[k].detach().to(dtype).requires_grad_()
              for k in ("hidden", "weight", "bias")]  # fmt: skip
    if dtype == torch.float64:
        logps = fused_linear_logprob_ref(leaves[0], leaves[1], case["labels"], bias=leaves[2],
                                         **head)  # fmt: skip
    else:  # plain torch at the input dtype: the eager head
        logps = fused_linear_logprob(leaves[0], leaves[1], case["labels"], bias=leaves[2],
                                     impl="eager", **head)  # fmt: skip
    bounds = case["offsets"].tolist()
    sums = torch.stack([logps[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    P = case["ref_c"].numel()
    lengths = case["offsets"].diff()
    pl = PairLogps(sums[:P], sums[P:], case["ref_c"].to(sums.dtype), case["ref_r"].to(sums.dtype),
                   lengths[:P], lengths[P:], sft_mask=sft_mask, group_ids=group_ids)  # fmt: skip
    loss = preference_loss(LossParams(**loss_kw), pl)
    live = [x for x in leaves if x is not None]
    return loss, torch.autograd.grad(1.7 * loss, live), sums


def ours(case, loss_kw, head, impl, chunk_elements, **extra):
    kw = dict(loss_kw, loss_type=loss_kw["loss_type"][0])
    out = fused_linear_pair_loss(
        case["hidden"], case["weight"], case["labels"], case["offsets"], case["ref_c"],
        case["ref_r"], bias=case["bias"], impl=impl, chunk_elements=chunk_elements, **head,
        **kw, **extra,
    )  # fmt: skip
    live = [case[k] for k in ("hidden", "weight", "bias") if case[k] is not None]
    return out, torch.autograd.grad(1.7 * out.loss, live)


def check(name, got, base, truth, dtype):
    truth = truth.detach().double().cpu()
    got = got.detach().double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, truth, msg=name, rtol=1.3e-6, atol=1e-5)
        return
    err = (got - truth).abs()
    bound = 2 * (base.detach().double().cpu() - truth).abs().max().item() + ATOL[dtype]
    assert err.max().item() <= bound, (
        f"{name}: max err {err.max().item():.3g} (mean {err.mean().item():.3g}, flat index "
        f"{err.argmax().item()}) > bound {bound:.3g}"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk", [None, 40 * 61, 5 * 61], ids=["one", "pairs", "recompute"])
def test_matches_fp64_fp32(impl, head, chunk):
    opts = dict(HEADS[head])
    case = make(5, 24, 61, torch.float32, seed=1, bias=opts.pop("bias", False))
    loss_kw = {"loss_type": ("sigmoid",), "beta": 0.3}
    want, want_g, want_sums = reference(case, loss_kw, opts)
    out, got_g = ours(case, loss_kw, opts, impl, chunk)
    check("loss", out.loss, None, want, torch.float32)
    check("chosen", out.chosen_logps, None, want_sums[:5], torch.float32)
    check("rejected", out.rejected_logps, None, want_sums[5:], torch.float32)
    for name, g, t in zip(("dh", "dw", "db"), got_g, want_g, strict=False):
        check(name, g, None, t, torch.float32)
    assert torch.all(got_g[0][case["labels"] == -100] == 0)  # ignored tokens take no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "loss_kw",
    [{"loss_type": ("ipo",), "beta": 0.1}, {"loss_type": ("robust",), "label_smoothing": 0.1},
     {"loss_type": ("hinge",), "beta": 0.05}, {"loss_type": ("sigmoid_norm",), "beta": 2.0},
     {"loss_type": ("sft",)}],
    ids=lambda kw: kw["loss_type"][0],
)  # fmt: skip
def test_every_loss_type(impl, loss_kw):
    case = make(4, 16, 37, torch.float32, seed=2)
    want, want_g, _ = reference(case, loss_kw, {})
    out, got_g = ours(case, loss_kw, {}, impl, 12 * 37)
    check("loss", out.loss, None, want, torch.float32)
    for name, g, t in zip(("dh", "dw"), got_g, want_g, strict=True):
        check(name, g, None, t, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_clo_with_groups_across_chunks(impl):
    """CLO's G and the NLL's token count are batch-wide: chunks must not renormalise them."""
    case = make(6, 16, 29, torch.float32, seed=3)
    sft_mask = torch.tensor([False, True] * 3, device=DEVICE)
    group_ids = torch.tensor([4, 4, 9, 9, 2, 2], device=DEVICE)
    loss_kw = {"loss_type": ("clo",), "beta": 0.1, "clo_lambda": 0.4}
    want, want_g, _ = reference(case, loss_kw, {}, sft_mask=sft_mask, group_ids=group_ids)
    out, got_g = ours(case, loss_kw, {}, impl, 10 * 29, sft_mask=sft_mask, group_ids=group_ids)
    check("loss", out.loss, None, want, torch.float32)
    for name, g, t in zip(("dh", "dw"), got_g, want_g, strict=True):
        check(name, g, None, t, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance_rule(impl, dtype):
    opts = {"softcap": 2.5, "temperature": 0.7}
    case = make(5, 32, 67, dtype, seed=4)
    loss_kw = {"loss_type": ("sigmoid",), "beta": 0.3}
    want, want_g, _ = reference(case, loss_kw, opts)
    base, base_g, _ = reference(case, loss_kw, opts, dtype=dtype)
    out, got_g = ours(case, loss_kw, opts, impl, 20 * 67)
    check("loss", out.loss, base, want, dtype)
    for name, g, b, t in zip(("dh", "dw"), got_g, base_g, want_g, strict=True):
        assert g.dtype == dtype
        check(name, g, b, t, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_gradients_under_a_loss_scale(impl):
    """fp16 training multiplies the loss by a GradScaler's scale (2**16 at the start) before
    backward: the scaled fp16 gradients, unscaled, stay within the fp16 rule, not inf."""
    scale = 2.0**16
    case = make(5, 32, 67, torch.float16, seed=5)
    loss_kw = {"loss_type": ("sigmoid",), "beta": 0.1}
    want, want_g, _ = reference(case, loss_kw, {})
    base, base_g, _ = reference(case, loss_kw, {}, dtype=torch.float16)
    out = fused_linear_pair_loss(
        case["hidden"], case["weight"], case["labels"], case["offsets"], case["ref_c"],
        case["ref_r"], impl=impl, chunk_elements=20 * 67, loss_type="sigmoid", beta=0.1,
    )  # fmt: skip
    got_g = torch.autograd.grad(1.7 * scale * out.loss, [case["hidden"], case["weight"]])
    for name, g, b, t in zip(("dh", "dw"), got_g, base_g, want_g, strict=True):
        assert torch.isfinite(g).all(), name
        check(name, g.double() / scale, b, t, torch.float16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", [{"softcap": 3.0, "logit_scale": 0.8}, {"logit_scale": 0.8}],
                         ids=["softcap", "plain"])  # fmt: skip
def test_stats_and_token_logps_match_the_head(impl, head):
    case = make(4, 16, 53, torch.float32, seed=5, bias=True)
    out, _ = ours(case, {"loss_type": ("sigmoid",)}, head, impl, 9 * 53, return_stats=True)
    h64, w64, b64 = (case[k].detach().double() for k in ("hidden", "weight", "bias"))
    logps, st = fused_linear_logprob_ref(h64, w64, case["labels"], bias=b64, return_stats=True,
                                         **head)  # fmt: skip
    torch.testing.assert_close(out.token_logps, logps.float())
    torch.testing.assert_close(out.stats.entropy, st.entropy.float())
    torch.testing.assert_close(out.stats.mean_logit, st.mean_logit.float())
    assert out.stats.is_top1.tolist() == st.is_top1.tolist()


def test_frozen_head_returns_no_weight_grad():
    case = make(3, 16, 31, torch.float32, seed=6)
    case["weight"].requires_grad_(False)
    out = fused_linear_pair_loss(case["hidden"], case["weight"], case["labels"], case["offsets"],
                                 case["ref_c"], case["ref_r"], impl="torch")  # fmt: skip
    out.loss.backward()
    assert case["weight"].grad is None and case["hidden"].grad is not None


def test_chunks_keep_pairs_whole_within_budget():
    offsets = [0, 3, 5, 12, 13, 20, 22, 23, 30]  # P = 4: chosen 3, 2, 7, 1; rejected 7, 2, 1, 7
    chunks = lpl._chunks(offsets, 4, 10, 100)
    assert chunks[0][0] == 0 and chunks[-1][1] == 4
    assert all(a < b for a, b in chunks) and all(
        x[1] == y[0] for x, y in zip(chunks, chunks[1:], strict=False)
    )
    tokens = [offsets[i + 1] - offsets[i] + offsets[5 + i] - offsets[4 + i] for i in range(4)]
    for a, b in chunks:  # within budget, unless a single pair alone exceeds it
        assert sum(tokens[a:b]) * 10 <= 100 or b - a == 1
    with pytest.raises(ValueError, match="loss_type"):
        lpl.PairHeadParams(loss_type="exo_pair")


@pytest.mark.parametrize("impl", IMPLS)
def test_label_probability_below_fp32_range(impl):
    # a label ~200 nats under its row's mass: exp underflows to 0 in fp32, the log-prob must not
    case = make(3, 16, 37, torch.float32, seed=8)
    with torch.no_grad():  # row 1 (row 0 is an ignored token) points against weight row 5
        sign = torch.ones(16, device=DEVICE)
        case["hidden"][1] = 4.0 * sign
        case["weight"][5] -= 3.0 * sign
    case["labels"][1] = 5
    loss_kw = {"loss_type": ("sigmoid",), "beta": 0.3}
    want, want_g, want_sums = reference(case, loss_kw, {})
    out, got_g = ours(case, loss_kw, {}, impl, None)
    h64, w64 = case["hidden"][1:2].detach().double(), case["weight"].detach().double()
    logp1 = fused_linear_logprob_ref(h64, w64, case["labels"][1:2])
    assert logp1.item() < -120  # the case is what it claims: e^-120 is 0 in fp32
    torch.testing.assert_close(out.token_logps[1:2], logp1.float())
    check("chosen", out.chosen_logps, None, want_sums[:3], torch.float32)
    check("loss", out.loss, None, want, torch.float32)
    for name, g, t in zip(("dh", "dw"), got_g, want_g, strict=False):
        check(name, g, None, t, torch.float32)


def test_one_backward_per_forward():
    # the gradients are handed over (scaled in place) by the first backward: a second must fail
    case = make(2, 8, 19, torch.float32, seed=9)
    out = fused_linear_pair_loss(case["hidden"], case["weight"], case["labels"], case["offsets"],
                                 case["ref_c"], case["ref_r"], impl="torch")  # fmt: skip
    (2.0 * out.loss).backward(retain_graph=True)
    first = case["weight"].grad.clone()
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.loss.backward()
    assert torch.equal(case["weight"].grad, first)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_row_scaled_gradients_equal_the_explicit_tile(scale):
    # the CPU path's dH, dW, db (row scale on the operands) == GEMMs of the explicit d tile
    g = torch.Generator().manual_seed(10)
    n, H, V = 7, 5, 23
    z, h, w = torch.randn(n, V, generator=g), torch.randn(n, H, generator=g), torch.randn(V, H)
    labels = torch.randint(0, V, (n,), generator=g)
    grad = torch.randn(n, generator=g)
    grad[2] = 0.0  # an ignored row
    p = lpl.PairHeadParams(logit_scale=scale, temperature=0.8)
    d = torch.zeros(n, V)
    d[torch.arange(n), labels] = 1.0
    d = grad[:, None] * scale / 0.8 * (d - torch.softmax(z * scale / 0.8, 1))  # the explicit d
    tiles = [z.clone(), z.clone()]
    norms = [lpl._tile_stats_torch(t, labels, p)[0] for t in tiles]
    lpl._tile_grad_torch(tiles[0], labels, norms[0], grad, p)
    torch.testing.assert_close(tiles[0], d)
    dh, dw, db = torch.empty(n, H), torch.full((V, H), 7.0), torch.zeros(V)
    lpl._head_grads_torch(tiles[1], h, w, labels, grad, norms[1], p, dh, dw, 0.0, db)
    torch.testing.assert_close(dh, d @ w)
    torch.testing.assert_close(dw, d.T @ h)  # beta=0: the 7s are ignored
    torch.testing.assert_close(db, d.sum(0))


def test_policy_equal_to_reference_scores_bit_equal_logps():
    # step 0 of DPO: the reference head (chunked) and the fused head + loss must agree bit for
    # bit, or rewards are rounding noise and rewards/accuracies a coin toss instead of 0
    case = make(4, 16, 53, torch.float32, seed=11)
    out = fused_linear_pair_loss(case["hidden"], case["weight"], case["labels"], case["offsets"],
                                 case["ref_c"], case["ref_r"], impl="torch")  # fmt: skip
    with torch.no_grad():
        ref = fused_linear_logprob(case["hidden"], case["weight"], case["labels"], impl="chunked")
    assert torch.equal(out.token_logps, ref)
