"""The meta-device build of a model given by path (FSDP ranks other than 0): the same names,
shapes, dtypes and ties as `from_pretrained`, so rank 0's weights fit every rank's shards.

    python -m pytest -q tests/distributed/test_meta_init.py

The 2-rank runs that train from such builds are in test_fsdp.py (scenarios `by_path*`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from csd_fast.models import load_model, loads_on_meta


def _layout(model) -> dict:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors}


def _tiny(kind: str):
    if kind == "llama-tied":
        config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                tie_word_embeddings=True)  # fmt: skip
        return tf.LlamaForCausalLM(config)
    # DeepSeek-V3 keeps its router's e_score_correction_bias in fp32 under bf16
    # (_keep_in_fp32_modules_strict), which from_config alone does not do
    config = tf.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    return tf.DeepseekV3ForCausalLM(config)


@pytest.mark.parametrize("kind,dtype", [("llama-tied", "float32"), ("deepseek-v3", "bfloat16")])
def test_meta_build_has_the_layout_of_from_pretrained(tmp_path, kind, dtype):
    _tiny(kind).save_pretrained(tmp_path)
    args = SimpleNamespace(model_init_kwargs={"dtype": dtype}, trust_remote_code=False)
    full, meta = load_model(str(tmp_path), args), load_model(str(tmp_path), args, on_meta=True)
    assert all(t.is_meta for t in meta.parameters())
    assert _layout(meta) == _layout(full)
    if kind == "deepseek-v3":
        assert torch.float32 in {dtype for _, dtype in _layout(full).values()}  # the case bites
    tied = meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
    assert tied == (kind == "llama-tied")
    assert meta.config._name_or_path == str(tmp_path)


def test_when_every_rank_loads_the_weights_instead(monkeypatch):
    def args(**kw):
        return SimpleNamespace(model_init_kwargs=kw.pop("init", None), fsdp_config=kw or None)

    assert loads_on_meta(args())
    assert loads_on_meta(args(init={"dtype": "bfloat16", "attn_implementation": "sdpa"}))
    assert not loads_on_meta(args(init={"quantization_config": {"load_in_4bit": True}}))
    assert not loads_on_meta(args(cpu_offload=True))  # offloaded shards start on the host
    monkeypatch.setenv("CSD_FSDP_META_INIT", "0")
    assert not loads_on_meta(args())
