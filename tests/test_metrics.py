"""Tests for csd_fast.metrics: hand-computed metric values, TRL's window averaging, and parity with
the metrics TRL 1.16's `_compute_loss` logs on a stand-in trainer.

Run: `python -m pytest tests/test_metrics.py -q`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from csd_fast.losses import LossParams, PairLogps
from csd_fast.metrics import (
    MetricsLog,
    metrics_from_sums,
    pair_metric_sums,
    pair_metrics,
    throughput,
)

F64 = torch.float64


def hand_case():
    """β = 0.5; ρ_c = (0.5, -1.0), ρ_r = (-1.0, 1.0):
    rewards chosen (0.25, -0.5) -> mean -0.125; rejected (-0.5, 0.5) -> mean 0.0
    accuracies: 0.25 > -0.5 yes, -0.5 > 0.5 no -> 0.5; margins (0.75, -1.0) -> -0.125
    logps/chosen mean(-3, -6) = -4.5; logps/rejected mean(-5, -3.5) = -4.25
    Tokens: chosen lengths (2, 3), rejected (4, 1) -> seq ids 0 0 1 1 1 2 2 2 2 3
    mean logits 1..10: chosen tokens 1..5 -> 3.0, rejected 6..10 -> 8.0
    top1 T F T T F | F F F F T: chosen 3/5 = 0.6 (the rejected hit does not count)
    entropy 0.5 x 5 then 1.5 x 5: token mean over all 10 = 1.0
    """
    t = lambda v: torch.tensor(v, dtype=F64)
    lp = PairLogps(
        t([-3.0, -6.0]),
        t([-5.0, -3.5]),
        t([-3.5, -5.0]),
        t([-4.0, -4.5]),
        torch.tensor([2, 3]),
        torch.tensor([4, 1]),
    )
    tokens = dict(
        token_entropy=torch.tensor([0.5] * 5 + [1.5] * 5),
        token_mean_logit=torch.arange(1.0, 11.0),
        token_is_top1=torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool),
        token_seq_ids=torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3]),
        num_pairs=2,
    )
    return LossParams(beta=0.5), lp, tokens


EXPECTED = {
    "rewards/chosen": -0.125,
    "rewards/rejected": 0.0,
    "rewards/accuracies": 0.5,
    "rewards/margins": -0.125,
    "logps/chosen": -4.5,
    "logps/rejected": -4.25,
    "logits/chosen": 3.0,
    "logits/rejected": 8.0,
    "mean_token_accuracy": 0.6,
    "entropy": 1.0,
}


def test_hand_computed():
    params, lp, tokens = hand_case()
    got = pair_metrics(params, lp, **tokens)
    assert got == pytest.approx(EXPECTED, rel=1e-12, abs=1e-12)


def test_accuracy_is_strict_and_empty_token_sets_are_zero():
    params, lp, tokens = hand_case()
    lp.rejected_logps = lp.chosen_logps - lp.ref_chosen_logps + lp.ref_rejected_logps  # ties
    tokens["token_seq_ids"] = torch.full((10,), 3)  # every token belongs to rejected pair 1
    got = pair_metrics(params, lp, **tokens)
    assert got["rewards/accuracies"] == 0.0
    assert got["rewards/margins"] == 0.0
    assert got["logits/chosen"] == 0.0 and got["mean_token_accuracy"] == 0.0
    assert got["logits/rejected"] == pytest.approx(5.5)


def test_missing_token_inputs_omit_keys_and_pairs_are_checked():
    params, lp, tokens = hand_case()
    tokens.update(token_entropy=None, token_mean_logit=None, token_is_top1=None)
    assert set(pair_metrics(params, lp, **tokens)) == {
        k for k in EXPECTED if k.startswith(("rewards/", "logps/"))
    }
    tokens["num_pairs"] = 3
    with pytest.raises(ValueError, match="num_pairs"):
        pair_metrics(params, lp, **tokens)


def test_sums_reduce_like_a_gather():
    # two "ranks" summed before dividing = TRL's gather-then-mean over all pairs / tokens
    params, lp, tokens = hand_case()
    a = pair_metric_sums(params, lp, **tokens)
    b = pair_metric_sums(params, lp, **{**tokens, "token_entropy": tokens["token_entropy"] * 3})
    merged = metrics_from_sums({k: a[k] + b[k] for k in a})
    assert merged["entropy"] == pytest.approx(2.0)  # (1.0 * 10 + 3.0 * 10) / 20
    assert merged["rewards/margins"] == pytest.approx(-0.125)


def test_metrics_log_window_mean_and_cumulative_tokens():
    log = MetricsLog()
    # plain mean of per-micro-batch values (not token-weighted), like DPOTrainer.log
    log.add("train", {"rewards/chosen": 1.0, "entropy": 0.5})
    log.add_tokens("train", 10)
    log.add("train", {"rewards/chosen": 2.0, "entropy": 1.5})
    log.add_tokens("train", 20)
    assert log.pop("train") == {"rewards/chosen": 1.5, "entropy": 1.0, "num_tokens": 30.0}
    assert log.pop("train") == {}  # the window was cleared
    # num_tokens keeps counting across windows; eval batches do not count but report the total
    log.add("train", {"rewards/chosen": 4.0})
    log.add_tokens("train", 5)
    log.add("eval", {"rewards/chosen": -1.0})
    log.add_tokens("eval", 100)
    log.add("eval", {"rewards/chosen": -3.0})
    assert log.pop("eval") == {"eval_rewards/chosen": -2.0, "eval_num_tokens": 35.0}
    assert log.pop("train") == {"rewards/chosen": 4.0, "num_tokens": 35.0}
    with pytest.raises(ValueError, match="mode"):
        log.add("test", {})


def test_throughput():
    assert throughput(1000, 8, 2.0) == {"tokens_per_second": 500.0, "pairs_per_second": 4.0}
    assert throughput(1000, 8, 0.0)["tokens_per_second"] == 0.0


def _run_trl():
    # the stand-in TRL trainer lives in test_losses_trl.py; load it by path (tests/ is no package)
    path = Path(__file__).with_name("test_losses_trl.py")
    spec = importlib.util.spec_from_file_location("_csd_test_losses_trl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run_trl


@pytest.mark.parametrize("seed", [0, 3])
def test_parity_with_trl(seed):
    _, trl_metrics, ours, params, (outputs, shift, attention_mask) = _run_trl()(
        ("sigmoid",), None, seed=seed, beta=0.2
    )
    mask = shift.bool()  # (2P, T-1), rows are sequences in [chosen; rejected] order
    seq_ids = torch.arange(mask.size(0))[:, None].expand_as(mask)[mask]
    got = pair_metrics(
        params,
        ours,
        token_entropy=outputs.entropy[mask],
        token_mean_logit=outputs.mean_logits[mask],
        token_is_top1=outputs.is_top1[mask],
        token_seq_ids=seq_ids,
        num_pairs=ours.num_pairs,
    )
    log = MetricsLog()
    log.add("train", got)
    log.add_tokens("train", int(attention_mask.sum()))
    popped = log.pop("train")
    expected = {k: sum(v) / len(v) for k, v in trl_metrics.items()}
    assert set(popped) == set(expected)
    assert popped == pytest.approx(expected, rel=1e-6, abs=1e-6)
