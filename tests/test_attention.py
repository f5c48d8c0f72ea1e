"""The csd_packed attention function: packed and prefix-shared layouts equal the padded layout.

    python -m pytest tests/test_attention.py -q

For tiny random Llama, Qwen2, Qwen3, Mistral, Gemma-2, Gemma-3 and Cohere models (sliding windows
smaller than the sequences, Gemma-2's attention softcap biting), the per-sequence log-probs, a
sigmoid DPO loss and every parameter gradient from the packed and prefix-shared layouts equal those
of the padded layout run through the model's own eager attention. The flash-attn varlen metadata is
checked on CPU through `varlen_attention_ref`, a pure-torch stand-in with flash's semantics.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from csd_fast import attention
from csd_fast.batch import collate_padded, segment_sum
from csd_fast.packing import collate_packed

TINY = dict(
    vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
)  # fmt: skip
MODELS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        {"sliding_window": 4, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 3.0},
    ),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"sliding_window": 3}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.5}),
}


def make_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**TINY, **extra, attn_implementation="eager")
    model = model_cls(config).eval()  # eval: no dropout; gradients still flow
    with torch.no_grad():  # random init is near-uniform: scale up so masks and softcaps bite
        for n, p in model.named_parameters():
            if "proj" in n:
                p.mul_(3.0)
    return model


def examples(seed: int, n: int = 5):
    rng = random.Random(seed)
    toks = lambda k: [rng.randrange(1, 48) for _ in range(k)]
    ex = [
        {
            "prompt_ids": toks(rng.randint(1, 8)),
            "chosen_ids": toks(rng.randint(1, 6)),
            "rejected_ids": toks(rng.randint(1, 6)),
        }
        for _ in range(n)
    ]
    ex[0]["chosen_ids"], ex[1]["rejected_ids"] = ex[0]["chosen_ids"][:1], ex[1]["rejected_ids"][:1]
    ex[2]["prompt_ids"] = toks(12)  # the prompt fills max_length: completions cut to nothing
    return ex


def head_logits(model, hidden):
    logits = model.lm_head(hidden)
    scale = getattr(model.config, "logit_scale", None)  # Cohere
    if scale is not None:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def seq_logps(model, batch):
    hidden = model.model(**batch.model_kwargs, use_cache=False).last_hidden_state
    h = hidden.flatten(0, 1).index_select(0, batch.token_index)  # (N, H)
    logps = head_logits(model, h).log_softmax(-1).gather(-1, batch.token_labels[:, None])[:, 0]
    return segment_sum(logps, batch.seq_offsets)  # (2P,)


def dpo_step(model, batch):
    """Per-sequence log-probs, a sigmoid DPO loss against a fixed reference, all gradients."""
    model.zero_grad(set_to_none=True)
    logps = seq_logps(model, batch)
    P = batch.num_pairs
    ref = torch.linspace(-3.0, -1.0, 2 * P)
    margin = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    loss = -F.logsigmoid(0.1 * margin).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), loss.detach(), grads


def assert_same_step(got, want):
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_and_prefix_equal_padded(name):
    model = make_model(name)
    ex = examples(seed=len(name))
    want = dpo_step(model, collate_padded(ex, 0, max_length=12))
    attention.enable_packed_attention(model)
    assert model.config._attn_implementation == attention.ATTN_NAME
    for sharing in (False, True):
        for cap in (None, 24):
            b = collate_packed(ex, 0, max_length=12, prefix_sharing=sharing, row_capacity=cap)
            assert_same_step(dpo_step(model, b), want)
    # a padded batch through the switched model: transformers' padding mask, our attention
    assert_same_step(dpo_step(model, collate_padded(ex, 0, max_length=12)), want)


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_varlen_metadata_equals_padded(name, monkeypatch):
    """The flash-attn path's cu_seqlens / key gather / window, run by a pure-torch stand-in."""
    model = make_model(name, seed=1)
    ex = examples(seed=7)
    want = dpo_step(model, collate_padded(ex, 0, max_length=12, truncation_mode="keep_end"))
    attention.enable_packed_attention(model)
    calls = []

    def fake_flash(*args, **kwargs):
        calls.append(kwargs["window_size"])
        return attention.varlen_attention_ref(*args, **kwargs)

    monkeypatch.setattr(attention, "_use_flash", lambda q, kw: "cu_seqlens_q" in kw)
    monkeypatch.setattr(attention, "_varlen_fn", fake_flash)
    for sharing in (False, True):
        b = collate_packed(
            ex, 0, max_length=12, truncation_mode="keep_end", prefix_sharing=sharing,
            row_capacity=20,
        )  # fmt: skip
        assert_same_step(dpo_step(model, b), want)
    assert calls and (name == "llama") == all(w == (-1, -1) for w in calls)


def test_prefix_layout_without_our_attention_is_wrong():
    """The equality above is not vacuous: stock SDPA reads the prefix layout differently."""
    model = make_model("llama")
    ex = examples(seed=3)
    want = seq_logps(model, collate_padded(ex, 0)).detach()
    model.set_attn_implementation("sdpa")
    b = collate_packed(ex, 0, prefix_sharing=True)
    got = seq_logps(model, b).detach()
    P = b.num_pairs
    assert not torch.allclose(got[P:], want[P:], atol=1e-3)  # rejected would see chosen


def test_mask_blocks_chosen_for_rejected():
    seg = torch.zeros(1, 6, dtype=torch.long)
    branch = torch.tensor([[0, 0, 1, 1, 2, 2]], dtype=torch.int8)
    pos = torch.tensor([[0, 1, 2, 3, 2, 3]])
    m = attention.packed_mask(seg, branch, pos)[0, 0].int().tolist()
    assert m[4] == [1, 1, 0, 0, 1, 0] and m[5] == [1, 1, 0, 0, 1, 1] and m[3] == [1, 1, 1, 1, 0, 0]
    # a window of 2 positions: r1 (position 3) sees p1 (1)? no: 3 - 1 = 2 is outside
    mw = attention.packed_mask(seg.clone(), branch, pos, sliding_window=2)[0, 0].int().tolist()
    assert mw[5] == [0, 0, 0, 0, 1, 1] and mw[4] == [0, 1, 0, 0, 1, 0]


def test_unsupported_model_is_refused_by_name():
    config = tf.GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=2)
    model = tf.GPT2LMHeadModel(config)
    ok, why = attention.packed_attention_supported(model)
    assert not ok and "gpt2" in why
    with pytest.raises(ValueError, match="gpt2"):
        attention.enable_packed_attention(model)


def test_gradient_checkpointing_keeps_the_layout():
    """Checkpointed layers re-run attention in backward: the packing kwargs must reach it again."""
    model = make_model("mistral", seed=2)
    ex = examples(seed=9)
    want = dpo_step(model, collate_padded(ex, 0, max_length=12))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    attention.enable_packed_attention(model)
    b = collate_packed(ex, 0, max_length=12, prefix_sharing=True)
    assert_same_step(dpo_step(model, b), want)
