"""Model preparation: Liger's layer kernels are swapped in (GPU path), the LM head is left alone.

The swap is checked on CPU without running the Triton kernels: the modules' forwards must be
Liger's, while the output head stays a plain Linear (ours is the fused log-prob kernel). Liger
patches transformers' classes process-wide, so each check runs in its own interpreter.

Run: python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("liger_kernel")


def run_isolated(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_liger_swaps_norm_and_mlp_but_not_the_head():
    run_isolated("""
        import transformers as tf
        from csd_fast.models import apply_liger_kernels
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32,
            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16))
        head_forward = model.lm_head.forward
        assert apply_liger_kernels(model)
        assert model.model.norm.forward.__qualname__.startswith("LigerRMSNorm")
        assert model.model.layers[0].mlp.forward.__qualname__.startswith("LigerSwiGLU")
        assert model.lm_head.forward == head_forward
    """)


def test_unsupported_architecture_warns_instead_of_failing():
    run_isolated("""
        import warnings
        import transformers as tf
        from csd_fast.models import apply_liger_kernels
        model = tf.CohereForCausalLM(tf.CohereConfig(vocab_size=64, hidden_size=32,
            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert apply_liger_kernels(model) is False
        assert any("no kernels for 'cohere'" in str(w.message) for w in caught)
        assert model.model.norm.forward.__qualname__.startswith("Cohere")
    """)


def test_reference_copy_is_made_in_its_dtype_frozen_and_keeps_ties():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from csd_fast.models import frozen_copy

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    ref = frozen_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # still tied, one copy
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.detach().bfloat16(), q), name
        assert p.data_ptr() != q.data_ptr()
