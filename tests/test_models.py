"""Model preparation: Liger's layer kernels are swapped in (GPU path), the LM head is left alone.

The swap itself is checked on CPU without running the Triton kernels: the modules' forwards must
be Liger's, while the output head stays a plain Linear (ours is the fused log-prob kernel).

Run: python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import pytest
import transformers as tf

from csd_fast.models import apply_liger_kernels

pytest.importorskip("liger_kernel")


def test_liger_swaps_norm_and_mlp_but_not_the_head():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, head_dim=16))  # fmt: skip
    head_forward = model.lm_head.forward
    assert apply_liger_kernels(model)
    assert model.model.norm.forward.__qualname__.startswith("LigerRMSNorm")
    assert model.model.layers[0].mlp.forward.__qualname__.startswith("LigerSwiGLU")
    assert model.lm_head.forward == head_forward
    assert "Liger" not in type(model).forward.__qualname__  # no fused linear cross-entropy


def test_unsupported_architecture_warns_instead_of_failing():
    class Tiny(tf.GPT2LMHeadModel):
        pass

    model = Tiny(tf.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    model.config.model_type = "not-a-liger-model"
    with pytest.warns(UserWarning):
        assert apply_liger_kernels(model) is False
