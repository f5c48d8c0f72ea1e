"""The forward reads each architecture's head right: backbone + gathered head == the model's logits.

For Llama, Qwen2, Qwen3, Mistral, Gemma 2 (final-logit soft-capping), Gemma 3 and Cohere
(`logit_scale`, as in Tiny Aya), the per-sequence log-probs of `sequence_forward` must equal
log_softmax of the model's own full `logits` gathered at the completion tokens, in fp32, with
every head implementation (eager, chunked).

Run: python -m pytest tests/test_forward.py -q
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from csd_fast.batch import collate_padded
from csd_fast.forward import head_spec, sequence_forward

V = 97
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"head_dim": 16}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"head_dim": 16}),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        {"head_dim": 16, "final_logit_softcapping": 5.0, "attn_logit_softcapping": None},
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {"head_dim": 16, "final_logit_softcapping": 3.0},
    ),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.25}),
}


def build(arch: str):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    return model


def examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    return [
        {"prompt_ids": ids(5), "chosen_ids": ids(4), "rejected_ids": ids(1)},
        {"prompt_ids": ids(2), "chosen_ids": ids(1), "rejected_ids": ids(6)},
        {"prompt_ids": ids(7), "chosen_ids": ids(3), "rejected_ids": ids(3)},
    ]


def logps_from_full_logits(model, batch) -> torch.Tensor:
    """(2P,) the plain way: the model's own logits for every position, then gather."""
    kw = batch.model_kwargs
    logits = model(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (R*T, V)
    per_token = logp[batch.token_index, batch.token_labels]
    sums = torch.zeros(batch.seq_offsets.numel() - 1)
    return sums.index_add(0, batch.sequence_ids(), per_token)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("head_impl", ["eager", "chunked"])
def test_forward_matches_model_logits(arch, head_impl):
    model = build(arch)
    batch = collate_padded(examples(), pad_token_id=0)
    want = logps_from_full_logits(model, batch)
    with torch.no_grad():
        out = sequence_forward(model, batch, head_impl=head_impl)
    got = torch.cat([out.chosen_logps, out.rejected_logps])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_spec_reads_softcap_and_scale():
    assert head_spec(build("gemma2")).softcap == 5.0
    assert head_spec(build("cohere")).logit_scale == 0.25
    spec = head_spec(build("llama"))
    assert spec.softcap is None and spec.logit_scale == 1.0


def test_ld_alpha_down_weights_the_longer_tail():
    model = build("llama")
    batch = collate_padded(examples(), pad_token_id=0)
    with torch.no_grad():
        plain = sequence_forward(model, batch, with_stats=False)
        half = sequence_forward(model, batch, with_stats=False, ld_alpha=0.5)
        tokens = plain.token_logps
    # pair 1: chosen has 1 token, rejected 6: rejected keeps its first token, the rest count half
    start = int(batch.seq_offsets[4])
    rej = tokens[start : start + 6]
    want = rej[0] + 0.5 * rej[1:].sum()
    torch.testing.assert_close(half.rejected_logps[1], want)
    torch.testing.assert_close(half.chosen_logps[1], plain.chosen_logps[1])
