"""bf16 autocast parity: the fused head (and head + pair loss) under CPU bf16 autocast stays
within the house tolerance of the fp64 truth, err <= 2 * err(eager torch, same autocast) + atol.

    python -m pytest tests/test_autocast.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_attention import examples, make_model

from csd_fast.batch import collate_padded
from csd_fast.forward import fused_sequence_loss, sequence_forward

ATOL = 2e-2


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _err(x, truth):
    return (x.double() - truth).abs().max().item()


@pytest.mark.parametrize("name", ["llama", "cohere"])  # cohere: logit_scale + bias-free head
def test_fused_head_under_bf16_autocast(name):
    model = make_model(name, seed=6)
    batch = collate_padded(examples(seed=4), 0, max_length=12)
    truth_model = copy.deepcopy(model).double()
    with torch.no_grad():
        truth = sequence_forward(truth_model, batch, with_stats=False)
        with _autocast():
            eager = sequence_forward(model, batch, head_impl="eager", with_stats=False)
            fused = sequence_forward(model, batch, head_impl="auto", with_stats=False)
    for side in ("chosen_logps", "rejected_logps"):
        t = getattr(truth, side)
        bound = 2 * _err(getattr(eager, side), t) + ATOL
        assert _err(getattr(fused, side), t) <= bound, side
        assert _err(getattr(eager, side), t) > 0  # autocast really ran in bf16


def test_fused_head_and_loss_gradients_under_bf16_autocast():
    model = make_model("llama", seed=7)
    batch = collate_padded(examples(seed=8), 0, max_length=12)
    P = batch.num_pairs
    ref_c, ref_r = torch.linspace(-9, -3, P), torch.linspace(-8, -4, P)

    def run(m, fused, dtype_ctx):
        m.zero_grad(set_to_none=True)
        with dtype_ctx:
            if fused:
                loss, _ = fused_sequence_loss(m, batch, ref_c, ref_r, loss_type="sigmoid", beta=0.5)
            else:
                out = sequence_forward(m, batch, head_impl="eager", with_stats=False)
                margin = (out.chosen_logps - ref_c) - (out.rejected_logps - ref_r)
                loss = -torch.nn.functional.logsigmoid(0.5 * margin).mean()
        loss.backward()
        return loss.detach(), m.lm_head.weight.grad.detach().clone()

    truth_model = copy.deepcopy(model).double()
    t_loss, t_grad = run(truth_model, False, torch.autocast("cpu", enabled=False))
    e_loss, e_grad = run(model, False, _autocast())
    f_loss, f_grad = run(copy.deepcopy(model), True, _autocast())
    assert _err(f_loss, t_loss) <= 2 * _err(e_loss, t_loss) + ATOL
    assert _err(f_grad, t_grad) <= 2 * _err(e_grad, t_grad) + ATOL
