"""Parity of csd_fast.losses with TRL 1.16's own arithmetic: `DPOTrainer._compute_loss`, called
unbound on a stand-in trainer whose model returns preset per-token log-probs, against
`preference_loss` on the same sums: every loss_type but CLO, weighted combinations with
f-divergences, and WPO weights.

Run: `python -m pytest tests/test_losses_trl.py -q` (skipped where trl is not installed).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from csd_fast.losses import LOSS_TYPES, LossParams, PairLogps, preference_loss


def run_trl(loss_type, weights, seed=0, **kw):
    """Run TRL's DPOTrainer._compute_loss on a stand-in trainer whose model returns preset
    per-token log-probs. Returns (TRL loss, TRL metrics, our PairLogps, data)."""
    trl_mod = pytest.importorskip("trl.trainer.dpo_trainer")
    use_weighting = kw.pop("use_weighting", False)
    g = torch.Generator().manual_seed(seed)
    P, T = 3, 9
    prompt = torch.tensor([2, 3, 1])  # prompt lengths >= 1 so the shifted mask keeps every token
    comp = torch.tensor([4, 1, 6, 3, 5, 2])  # chosen 0..P-1, rejected P..2P-1
    pos = torch.arange(T)
    completion_mask = (
        (pos >= prompt.repeat(2)[:, None]) & (pos < (prompt.repeat(2) + comp)[:, None])
    ).long()
    attention_mask = (pos < (prompt.repeat(2) + comp)[:, None]).long()
    shift = completion_mask[:, 1:].to(torch.float32)
    tok_logps = (
        -2 * torch.rand(2 * P, T - 1, generator=g) * shift
    )  # zero off-completion, as TRL's head
    outputs = SimpleNamespace(
        log_probs=tok_logps,
        entropy=3 * torch.rand(2 * P, T - 1, generator=g),
        mean_logits=torch.randn(2 * P, T - 1, generator=g),
        is_top1=torch.rand(2 * P, T - 1, generator=g) > 0.5,
        log_sum_sq_probs=-torch.rand(2 * P, T - 1, generator=g),
    )
    ref = tok_logps.sum(1) + torch.randn(2 * P, generator=g)
    inputs = {
        "input_ids": torch.ones(2 * P, T, dtype=torch.long),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:P],
        "ref_rejected_logps": ref[P:],
    }
    params = LossParams(loss_type=loss_type, loss_weights=weights, **kw)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=params.f_divergence_type,
        f_alpha_divergence_coef=params.f_alpha_divergence_coef,
        loss_types=list(params.loss_type),
        loss_weights=list(params.weights),
        beta=params.beta,
        label_smoothing=params.label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=params.discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    model = lambda **_: outputs
    loss = trl_mod.DPOTrainer._compute_loss(stub, model, inputs, False)
    logps = tok_logps.sum(1)
    lengths = shift.sum(1).long()
    ours = PairLogps(logps[:P], logps[P:], ref[:P], ref[P:], lengths[:P], lengths[P:])
    return loss, stub._metrics["train"], ours, params, (outputs, shift, attention_mask)


TRL_TYPES = [t for t in LOSS_TYPES if t != "clo"]


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_parity_with_trl(loss_type):
    eps = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    trl_loss, _, ours, params, _ = run_trl(loss_type, None, beta=0.3, label_smoothing=eps)
    torch.testing.assert_close(preference_loss(params, ours), trl_loss)


@pytest.mark.parametrize(
    "kind,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]
)
def test_parity_with_trl_combined(kind, alpha):
    types, weights = ("sigmoid", "ipo", "sft", "sigmoid_norm"), (1.0, 0.5, 0.2, 2.0)
    trl_loss, _, ours, params, _ = run_trl(
        types, weights, seed=1, f_divergence_type=kind, f_alpha_divergence_coef=alpha
    )
    torch.testing.assert_close(preference_loss(params, ours), trl_loss)


def test_parity_with_trl_wpo():
    # not "sft": TRL 1.16 multiplies its expanded sft tensor in place and raises with use_weighting
    trl_loss, _, ours, params, (outputs, shift, _) = run_trl(
        ("sigmoid", "ipo"), (1.0, 0.5), seed=2, use_weighting=True
    )
    # WPO weights as TRL forms them: exp(token mean of logp - log Σ p²), chosen × rejected
    aligned = (outputs.log_probs - outputs.log_sum_sq_probs) * shift
    w = torch.exp(aligned.sum(1) / shift.sum(1).clamp_min(1))
    ours.weights = w[:3] * w[3:]
    torch.testing.assert_close(preference_loss(params, ours), trl_loss)
