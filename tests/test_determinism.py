"""--full_determinism: HF's switch plus flash-attn's deterministic backward; what is bit-exact.

    python -m pytest tests/test_determinism.py -q

Bit-exact by construction on every device: segment sums (one sequential sum per segment, no
atomics: tests/kernels/test_pair_loss.py) and the Triton head's backward (one writer per output
element: tests/kernels/test_logprob.py). With --full_determinism the GPU's remaining sources
(cuBLAS split-K workspaces, flash-attn's backward, torch's atomic ops) are pinned too.
"""

from __future__ import annotations

import pytest
import torch
from data_helpers import tiny_tokenizer
from test_trainer import ROWS, make_args, tiny_model

from csd_fast import DPOTrainer, attention


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)
    attention.set_deterministic(False)


def _trainer(tmp_path, **kw):
    from datasets import Dataset

    tok = tiny_tokenizer()
    return DPOTrainer(tiny_model(tok), args=make_args(tmp_path, **kw),
                      train_dataset=Dataset.from_list(ROWS), processing_class=tok)  # fmt: skip


def test_full_determinism_switches_torch_and_flash(tmp_path, restore_determinism, monkeypatch):
    _trainer(tmp_path, full_determinism=True, max_steps=1)
    assert torch.are_deterministic_algorithms_enabled()
    assert attention.DETERMINISTIC
    seen = {}

    def fake_flash(*args, **kwargs):
        seen.update(kwargs)
        return attention.varlen_attention_ref(*args, **{k: v for k, v in kwargs.items()
                                                        if k != "deterministic"})  # fmt: skip

    q = torch.randn(1, 2, 4, 8)
    kw = dict(cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), max_seqlen_q=4,
              cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32), max_seqlen_k=4)  # fmt: skip
    attention._varlen_attention(q, q, q, kw, 0.3, 0.0, None, None, fake_flash)
    assert seen.get("deterministic") is True


def test_default_leaves_flash_nondeterministic(tmp_path, restore_determinism):
    _trainer(tmp_path, max_steps=1)
    assert not attention.DETERMINISTIC


def test_two_deterministic_runs_are_bit_equal(tmp_path, restore_determinism):
    losses = []
    for run in range(2):
        trainer = _trainer(tmp_path / str(run), full_determinism=True, max_steps=2, fused=True)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] and losses[0] == losses[1]
