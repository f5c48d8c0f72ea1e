"""Tests for csd_fast.losses: hand-computed values, f-divergences, label smoothing, CLO, WPO,
validation and fp64 gradcheck. Parity with TRL 1.16's own `_compute_loss` is in
tests/test_losses_trl.py.

Run: `python -m pytest tests/test_losses.py -q`.

The hand-computed case (β = 0.5), ρ = logps - ref_logps:
    pair 0: chosen -3.0 (ref -3.5), rejected -5.0 (ref -4.0), |c| = 2, |r| = 4
            ρ_c = 0.5, ρ_r = -1.0, Δ = 1.5, βΔ = 0.75
    pair 1: chosen -6.0 (ref -5.0), rejected -3.5 (ref -4.5), |c| = 3, |r| = 1
            ρ_c = -1.0, ρ_r = 1.0, Δ = -2.0, βΔ = -1.0
The expected per-pair values below were worked out with Python's `math` in fp64 from the formulas
in each comment (log σ(x) = -log1p(exp(-x))), independently of the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from csd_fast.losses import (
    LOSS_TYPES,
    LossParams,
    PairLogps,
    per_pair_losses,
    preference_loss,
    rewards,
)

F64 = torch.float64


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_pairs(dtype=F64, **extra) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=dtype)
    return PairLogps(
        chosen_logps=t([-3.0, -6.0]),
        rejected_logps=t([-5.0, -3.5]),
        ref_chosen_logps=t([-3.5, -5.0]),
        ref_rejected_logps=t([-4.0, -4.5]),
        chosen_lengths=torch.tensor([2, 3]),
        rejected_lengths=torch.tensor([4, 1]),
        **extra,
    )


# loss_type -> (label_smoothing, expected per-pair losses)
HAND = {
    # -log σ(βΔ): -log σ(0.75) = log1p(e^-0.75), -log σ(-1) = log1p(e^1)
    "sigmoid": (0.0, [0.386871006115, 1.313261687518]),
    # relu(1 - βΔ): 1 - 0.75, 1 + 1
    "hinge": (0.0, [0.25, 2.0]),
    # (ρ_c/|c| - ρ_r/|r| - 1/(2β))²: (0.25 + 0.25 - 1)², (-1/3 - 1 - 1)² = 49/9
    "ipo": (0.0, [0.25, 49 / 9]),
    # σ(x)(log σ(x) - log 0.9) + σ(-x)(log σ(-x) - log 0.1), x = βΔ
    "exo_pair": (0.1, [0.182789981029, 1.129457283208]),
    # -log σ(βρ_c) - ½ log σ(-βρ_c) - ½ log σ(-βρ_r); βρ = (0.25, -0.5), (-0.5, 0.5)
    "nca_pair": (0.0, [1.225947621908, 1.698153968360]),
    # (-0.9 log σ(x) + 0.1 log σ(-x)) / 0.8
    "robust": (0.1, [0.293121006115, 1.438261687518]),
    # -log σ(βρ_c) - log σ(-βρ_r)
    "bco_pair": (0.0, [1.050016404059, 1.948153968360]),
    # (ρ_c - 1)² + (ρ_r + 1)²: (-0.5)² + 0², (-2)² + 2²
    "sppo_hard": (0.0, [0.25, 8.0]),
    # policy chosen-rejected (2.0, -2.5), ref (0.5, -0.5): sorted differences (-2.5+0.5, 2-0.5)
    # = (-2, 1.5); -log σ(β·d) = -log σ(-1), -log σ(0.75)
    "aot": (0.0, [1.313261687518, 0.386871006115]),
    # sort ρ_c = (-1, 0.5), sort ρ_r = (-1, 1): d = (0, -0.5); log 2, -log σ(-0.25)
    "aot_unpaired": (0.0, [math.log(2), 0.825939419879]),
    # 1 - σ(βρ_c) + σ(βρ_r)
    "apo_zero": (0.0, [0.815364167912, 1.244918662404]),
    # σ(βρ_c) + 1 - σ(βΔ)
    "apo_down": (0.0, [0.882997801710, 1.108599247428]),
    # m = σ(x/0.05); (1 - m)(-log σ(x)) + m·e^-x
    "discopop": (0.0, [0.472366526588, 1.313261690414]),
    # -(chosen -3 - 6) / (2 + 3) = 1.8 for every pair
    "sft": (0.0, [1.8, 1.8]),
    # -log σ(β(ρ_c/|c| - ρ_r/|r|)): -log σ(0.25), -log σ(-2/3)
    "sigmoid_norm": (0.0, [0.575939419879, 1.081036753519]),
}


def test_every_loss_type_has_a_hand_case():
    assert set(HAND) | {"clo"} == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_hand_computed(loss_type):
    eps, expected = HAND[loss_type]
    params = LossParams(loss_type=loss_type, beta=0.5, label_smoothing=eps)
    got = per_pair_losses(params, hand_pairs())[loss_type]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-11)
    loss = preference_loss(params, hand_pairs())
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-10)


def test_loss_weights_sigmoid_plus_sft():
    # RPO-style: 1.0 * mean sigmoid + 0.25 * NLL = (0.386871006115 + 1.313261687518)/2 + 0.25 * 1.8
    params = LossParams(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.25], beta=0.5)
    expected = (0.386871006115 + 1.313261687518) / 2 + 0.25 * 1.8
    assert preference_loss(params, hand_pairs()).item() == pytest.approx(expected, rel=1e-10)
    params = LossParams(loss_type=("sigmoid", "sft"), beta=0.5)  # None weights -> 1.0 each
    assert preference_loss(params, hand_pairs()).item() == pytest.approx(
        expected + 0.75 * 1.8, rel=1e-10
    )


def f_score(kind: str, rho: float, alpha: float = 0.5) -> float:
    """f'(π/πref) written from the f-DPO paper, independently of the module."""
    u = math.exp(rho)
    if kind == "reverse_kl":
        return math.log(u)
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return math.log(2 * u / (1 + u))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


@pytest.mark.parametrize(
    "kind,alpha",
    [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.5),
        ("alpha_divergence", 0.25),
        ("alpha_divergence", 1.0),
    ],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm", "robust"])
def test_f_divergences(kind, alpha, loss_type):
    eps = 0.1 if loss_type == "robust" else 0.0
    params = LossParams(
        loss_type=loss_type,
        beta=0.5,
        label_smoothing=eps,
        f_divergence_type=kind,
        f_alpha_divergence_coef=alpha,
    )
    rhos = [(0.5, -1.0, 2, 4), (-1.0, 1.0, 3, 1)]
    expected = []
    for rc, rr, lc, lr in rhos:
        fk = "reverse_kl" if kind == "alpha_divergence" and alpha == 1.0 else kind
        sc, sr = f_score(fk, rc, alpha), f_score(fk, rr, alpha)
        x = 0.5 * (sc - sr)
        expected.append(
            {
                "sigmoid": -logsig(x),
                "hinge": max(0.0, 1 - x),
                "ipo": (sc / lc - sr / lr - 1.0) ** 2,
                "sigmoid_norm": -logsig(0.5 * (sc / lc - sr / lr)),
                "robust": (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps),
            }[loss_type]
        )
    got = per_pair_losses(params, hand_pairs())[loss_type]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-11)
    # rewards are always β·ρ, whatever the divergence
    r_c, r_r = rewards(params, hand_pairs())
    torch.testing.assert_close(r_c, torch.tensor([0.25, -0.5], dtype=F64))
    torch.testing.assert_close(r_r, torch.tensor([-0.5, 0.5], dtype=F64))


@pytest.mark.parametrize("dtype,cap", [(torch.float32, 80.0), (torch.float16, 11.0)])
def test_alpha_divergence_clamp(dtype, cap):
    # α = 2: score = exp(ρ) - 1. A rejected ρ = 100 would overflow to inf; clamped, the exponent
    # is `cap` and the loss -log σ(-(e^cap - 1)) ≈ e^cap - 1 stays finite
    params = LossParams(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0, beta=1.0)
    z = torch.zeros(1, dtype=dtype)
    lp = PairLogps(z, z + 100, z, z, torch.ones(1), torch.ones(1))
    got = per_pair_losses(params, lp)["sigmoid"]
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(math.exp(cap) - 1, rel=1e-3)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_label_smoothing_aot_and_robust(eps):
    params = LossParams(loss_type=("aot", "robust", "sigmoid"), beta=0.5, label_smoothing=eps)
    out = per_pair_losses(params, hand_pairs())
    d = [-2.0, 1.5]  # sorted aot differences, see HAND["aot"]
    aot = [-(1 - eps) * logsig(0.5 * v) - eps * logsig(-0.5 * v) for v in d]
    torch.testing.assert_close(out["aot"], torch.tensor(aot, dtype=F64))
    x = [0.75, -1.0]
    robust = [(-(1 - eps) * logsig(v) + eps * logsig(-v)) / (1 - 2 * eps) for v in x]
    torch.testing.assert_close(out["robust"], torch.tensor(robust, dtype=F64))
    # label_smoothing does not touch sigmoid in TRL 1.16 (it feeds robust/exo/aot only)
    torch.testing.assert_close(out["sigmoid"], torch.tensor([-logsig(v) for v in x], dtype=F64))
    if eps == 0.0:
        torch.testing.assert_close(out["robust"], out["sigmoid"])


def clo_case(order=(0, 1, 2, 3)) -> PairLogps:
    """2 examples A, B (β = 0.5). Pairs [A_en, B_en, A_t, B_t]:
    A_en ρ = (0.4, -0.2) -> z = 0.3;  A_t ρ = (0.2, 0.6) -> z = -0.2
    B_en ρ = (-0.4, 0.4) -> z = -0.4; B_t ρ = (1.0, 0.2) -> z = 0.4
    Target chosen: A_t -6.0 over 3 tokens, B_t -9.0 over 6 tokens: L_SFT = 15/9.
    L_CL,A = -log σ(0.3) - log σ(-0.2) = 0.554355244469 + 0.798138869382 = 1.352494113850
    L_CL,B = -log σ(-0.4) - log σ(0.4) = 1.426030504800
    L = 0.5·15/9 + 0.5·(1.352494113850 + 1.426030504800)/2 = 1.527964487996
    """
    rows = [  # chosen, ref_chosen, rejected, ref_rejected, |c|, |r|, group, target
        (-1.0, -1.4, -2.2, -2.0, 2, 2, 0, False),
        (-2.0, -1.6, -1.6, -2.0, 4, 3, 1, False),
        (-6.0, -6.2, -1.4, -2.0, 3, 2, 0, True),
        (-9.0, -10.0, -2.8, -3.0, 6, 5, 1, True),
    ]
    rows = [rows[i] for i in order]
    col = lambda j, dt=F64: torch.tensor([r[j] for r in rows], dtype=dt)
    return PairLogps(
        col(0),
        col(2),
        col(1),
        col(3),
        col(4, torch.long),
        col(5, torch.long),
        sft_mask=col(7, torch.bool),
        group_ids=col(6, torch.long),
    )


def test_clo_two_examples_hand_computed():
    params = LossParams(loss_type="clo", beta=0.5, clo_lambda=0.5)
    assert preference_loss(params, clo_case()).item() == pytest.approx(1.527964487996, rel=1e-10)
    # the pair order inside the micro-batch does not matter
    shuffled = clo_case(order=(3, 0, 2, 1))
    assert preference_loss(params, shuffled).item() == pytest.approx(1.527964487996, rel=1e-10)
    # an incomplete example (B_t cut off): mean over the 2 examples, L_SFT = 6/3
    lp = clo_case(order=(0, 2, 1))
    expected = 0.5 * 2.0 + 0.5 * (1.352494113850 - logsig(-0.4)) / 2
    assert preference_loss(params, lp).item() == pytest.approx(expected, rel=1e-10)


def test_clo_nll_only_on_target_language():
    params = LossParams(loss_type="clo", beta=0.5, clo_lambda=0.5)
    lp = clo_case()
    lp.chosen_logps.requires_grad_(True)
    preference_loss(params, lp).backward()
    g = lp.chosen_logps.grad
    # English chosen (pairs 0, 1): only the contrastive term, (1-λ)·(P/G)/P·β·(-(1 - σ(z)))
    for i, z in ((0, 0.3), (1, -0.4)):
        assert g[i].item() == pytest.approx(0.5 * 2 / 4 * 0.5 * -(1 - sig(z)), rel=1e-10)
    # target chosen: the same plus λ·(-1/Σ|c_t|) from the NLL
    for i, z in ((2, -0.2), (3, 0.4)):
        assert g[i].item() == pytest.approx(0.5 * 2 / 4 * 0.5 * -(1 - sig(z)) - 0.5 / 9, rel=1e-10)
    # λ = 1 is pure target-language SFT; λ = 0 is the contrastive loss alone
    assert preference_loss(LossParams("clo", clo_lambda=1.0), clo_case()).item() == pytest.approx(
        15 / 9
    )


def test_sft_mask_and_wpo_weights():
    lp = hand_pairs(sft_mask=torch.tensor([False, True]))
    params = LossParams(loss_type=("sft", "sigmoid"), beta=0.5)
    assert per_pair_losses(params, lp)["sft"].tolist() == [2.0, 2.0]  # -(-6)/3
    w = torch.tensor([0.5, 0.25], dtype=F64)
    out = per_pair_losses(params, hand_pairs(weights=w))
    torch.testing.assert_close(out["sft"], torch.tensor([0.9, 0.45], dtype=F64))
    expected = torch.tensor([0.386871006115 * 0.5, 1.313261687518 * 0.25], dtype=F64)
    torch.testing.assert_close(out["sigmoid"], expected)
    with pytest.raises(ValueError, match="aot"):
        per_pair_losses(LossParams("aot"), hand_pairs(weights=w))


def test_zero_lengths_are_clamped():
    lp = hand_pairs()
    lp.chosen_lengths = torch.tensor([0, 3])
    out = per_pair_losses(LossParams("ipo", beta=0.5), lp)["ipo"]
    assert out[0].item() == pytest.approx((0.5 / 1 + 0.25 - 1) ** 2)


def test_validation():
    assert LossParams("ipo").loss_type == ("ipo",)
    assert LossParams(["sigmoid", "sft"], [1, 2]).weights == (1.0, 2.0)
    with pytest.raises(ValueError, match="Unknown loss"):
        LossParams("dpo")
    with pytest.raises(ValueError, match="same length"):
        LossParams(("sigmoid", "sft"), (1.0,))
    with pytest.raises(ValueError, match="twice"):
        LossParams(("sigmoid", "sigmoid"))
    with pytest.raises(ValueError, match="f_divergence_type"):
        LossParams("nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type"):
        LossParams("sigmoid", f_divergence_type="kl")
    with pytest.raises(ValueError, match="exo_pair"):
        LossParams("exo_pair")
    with pytest.raises(ValueError, match="clo_lambda"):
        LossParams("clo", clo_lambda=1.5)
    with pytest.warns(UserWarning, match="robust"):
        LossParams("robust", label_smoothing=0.5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type):
    g = torch.Generator().manual_seed(0)
    P = 4
    ref_c, ref_r = (
        -5 * torch.rand(P, generator=g, dtype=F64),
        -5 * torch.rand(P, generator=g, dtype=F64),
    )
    lc, lr = torch.tensor([3, 5, 1, 7]), torch.tensor([2, 6, 4, 1])
    groups, target = torch.tensor([0, 0, 1, 1]), torch.tensor([False, True, False, True])
    eps = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    # beta 0.05 keeps hinge's 1 - βΔ away from its kink at 0 for these inputs
    params = LossParams(loss_type=loss_type, beta=0.05, label_smoothing=eps)

    def fn(c, r):
        return preference_loss(params, PairLogps(c, r, ref_c, ref_r, lc, lr, target, groups))

    c = (ref_c + torch.randn(P, generator=g, dtype=F64)).requires_grad_(True)
    r = (ref_r + torch.randn(P, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (c, r))
