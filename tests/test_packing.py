"""Packed and prefix-shared layouts (csd_fast.packing): drawn layout, scored tokens, counts, rows.

    python -m pytest tests/test_packing.py -q

Model-level equality (log-probs, loss, gradients against the padded layout) for every supported
architecture lives in tests/test_attention.py; here a tiny Llama checks log-probs under truncation.
"""

from __future__ import annotations

import random

import pytest
import torch

from csd_fast.batch import collate_padded, segment_sum
from csd_fast.packing import collate_packed


def random_examples(n: int, seed: int, vocab: int = 64, max_prompt: int = 9, max_comp: int = 7):
    rng = random.Random(seed)
    toks = lambda k: [rng.randrange(1, vocab) for _ in range(k)]
    out = []
    for i in range(n):
        ex = {
            "prompt_ids": toks(rng.randint(1, max_prompt)),
            "chosen_ids": toks(rng.randint(1, max_comp)),
            "rejected_ids": toks(rng.randint(1, max_comp)),
            "row": 100 + i,
        }
        out.append(ex)
    out[0]["chosen_ids"] = out[0]["chosen_ids"][:1]  # one-token completions
    out[-1]["rejected_ids"] = out[-1]["rejected_ids"][:1]
    return out


def labels_by_sequence(batch) -> list[list[int]]:
    o = batch.seq_offsets.tolist()
    return [batch.token_labels[o[s] : o[s + 1]].tolist() for s in range(len(o) - 1)]


def test_prefix_layout_as_drawn():
    """The module docstring's picture: p0 p1 p2 c0 c1 r0 r1 r2."""
    ex = [{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33]}]
    b = collate_packed(ex, 0, prefix_sharing=True)
    assert b.layout == "prefix"
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 32, 33]]
    assert b.model_kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert b.model_kwargs["csd_branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    # c0 and r0 both predicted from p2 (flat position 2 appears twice)
    assert b.token_index.tolist() == [2, 3, 2, 5, 6]
    assert b.token_labels.tolist() == [21, 22, 31, 32, 33]
    assert b.seq_offsets.tolist() == [0, 2, 5]
    assert (b.num_tokens, b.num_real_tokens, b.capacity) == (11, 8, 8)
    # varlen view: queries [p, c] over keys [p, c]; queries [r] over keys [p, r]
    assert b.model_kwargs["cu_seqlens_q"].tolist() == [0, 5, 8]
    assert b.model_kwargs["cu_seqlens_k"].tolist() == [0, 5, 11]
    assert b.model_kwargs["csd_kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]


def test_packed_layout_as_drawn():
    ex = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9]},
    ]
    b = collate_packed(ex, 0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 1, 2, 5, 6, 7, 6, 8, 9]]
    assert b.model_kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]]
    assert b.model_kwargs["csd_segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]]
    assert b.model_kwargs["cu_seqlens_q"].tolist() == [0, 4, 7, 9, 12]
    assert "csd_kv_index" not in b.model_kwargs  # no key gather without sharing
    assert labels_by_sequence(b) == [[3, 4], [7], [5], [8, 9]]
    assert b.token_index.tolist() == [1, 2, 7, 5, 9, 10]


@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("trunc", [(None, "keep_start"), (8, "keep_start"), (8, "keep_end")])
def test_scored_tokens_and_counts_match_padded(prefix_sharing, trunc):
    max_length, mode = trunc
    ex = random_examples(7, seed=1)
    padded = collate_padded(ex, 0, max_length=max_length, truncation_mode=mode)
    b = collate_packed(
        ex, 0, max_length=max_length, truncation_mode=mode, prefix_sharing=prefix_sharing
    )
    assert labels_by_sequence(b) == labels_by_sequence(padded)
    assert b.num_tokens == padded.num_tokens  # TRL's count, whatever the layout
    assert b.capacity == b.num_real_tokens == b.input_ids.numel()  # one row, no padding
    assert torch.equal(b.pair_ids, padded.pair_ids)
    # every scored position predicts the label from the token right before it in its sequence
    flat = b.input_ids.flatten()
    pos = b.model_kwargs["position_ids"].flatten()
    assert (pos[b.token_index] >= 0).all() and (b.model_kwargs["csd_segment_ids"] >= 0).all()
    if not prefix_sharing:
        assert torch.equal(flat[b.token_index + 1], b.token_labels)


def test_prefix_sharing_saves_the_prompt_once_per_pair():
    ex = random_examples(5, seed=2)
    packed, shared = collate_packed(ex, 0), collate_packed(ex, 0, prefix_sharing=True)
    saved = sum(len(e["prompt_ids"]) for e in ex)
    assert packed.num_real_tokens - shared.num_real_tokens == saved
    assert packed.num_tokens == shared.num_tokens


def test_keep_end_with_different_prompts_falls_back_to_two_segments():
    ex = [{"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6], "rejected_ids": [7, 8, 9, 10]}]
    b = collate_packed(ex, 0, max_length=5, truncation_mode="keep_end", prefix_sharing=True)
    # chosen keeps prompt [2, 3, 4], rejected keeps [4]: no common prompt to share
    assert b.input_ids.tolist() == [[2, 3, 4, 5, 6, 4, 7, 8, 9, 10]]
    assert b.model_kwargs["csd_segment_ids"].tolist() == [[0] * 5 + [1] * 5]
    assert labels_by_sequence(b) == [[5, 6], [7, 8, 9, 10]]


def test_rows_of_equal_length_with_unscored_padding():
    ex = random_examples(6, seed=3)
    b = collate_packed(ex, 7, row_capacity=24, prefix_sharing=True)
    R, T = b.input_ids.shape
    assert R > 1 and T <= 24 and b.capacity == R * T
    seg = b.model_kwargs["csd_segment_ids"].flatten()
    assert (seg[b.token_index] >= 0).all()  # padding is never scored
    assert int((seg >= 0).sum()) == b.num_real_tokens
    assert (b.input_ids.flatten()[seg < 0] == 7).all()
    assert int(b.model_kwargs["cu_seqlens_k"][-1]) == b.model_kwargs["csd_kv_index"].numel()
    assert labels_by_sequence(b) == labels_by_sequence(collate_padded(ex, 7))
    with pytest.raises(ValueError, match="does not fit row_capacity=4"):
        collate_packed(ex, 7, row_capacity=4)


def test_pair_fields_and_options():
    ex = random_examples(3, seed=4)
    for i, e in enumerate(ex):
        e.update(group=i // 2, sft=i == 0, ref_chosen_logps=-1.0 - i, ref_rejected_logps=-2.0)
    b = collate_packed(ex, 0, attn_backend="sdpa")
    assert b.group_ids.tolist() == [0, 0, 1] and b.sft_mask.tolist() == [True, False, False]
    assert b.ref_chosen_logps.tolist() == [-1.0, -2.0, -3.0]
    assert "cu_seqlens_q" not in b.model_kwargs
    with pytest.raises(ValueError, match="attn_backend"):
        collate_packed(ex, 0, attn_backend="xformers")
    with pytest.raises(ValueError, match="at least one"):
        collate_packed([], 0)


def test_empty_completion_after_truncation_scores_nothing():
    # the prompt fills max_length: keep_start leaves both completions empty
    ex = [
        {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5], "rejected_ids": [6, 7]},
        {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10]},
    ]
    for sharing in (False, True):
        b = collate_packed(ex, 0, max_length=4, prefix_sharing=sharing)
        assert b.sequence_lengths().tolist() == [0, 1, 0, 1]
        assert labels_by_sequence(b) == labels_by_sequence(collate_padded(ex, 0, max_length=4))


def _seq_logps(model, batch):
    hidden = model.model(**batch.model_kwargs, use_cache=False).last_hidden_state
    h = hidden.flatten(0, 1).index_select(0, batch.token_index)  # (N, H)
    logps = model.lm_head(h).log_softmax(-1).gather(-1, batch.token_labels[:, None])[:, 0]
    return segment_sum(logps, batch.seq_offsets)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_llama_logps_equal_padded(mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    from csd_fast.attention import enable_packed_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ex = random_examples(6, seed=5)
    with torch.no_grad():
        ref = _seq_logps(model, collate_padded(ex, 0, max_length=9, truncation_mode=mode))
        enable_packed_attention(model)
        for sharing in (False, True):
            for cap in (None, 18):
                b = collate_packed(
                    ex, 0, max_length=9, truncation_mode=mode, prefix_sharing=sharing,
                    row_capacity=cap,
                )  # fmt: skip
                torch.testing.assert_close(_seq_logps(model, b), ref)


@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("trunc", [(None, "keep_start"), (7, "keep_start"), (7, "keep_end")])
def test_pair_costs_are_the_tokens_placed(prefix_sharing, trunc):
    from csd_fast.packing import pair_costs

    max_length, mode = trunc
    ex = random_examples(40, seed=6)
    lengths = [[len(e[k]) for e in ex] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    costs = pair_costs(
        *lengths, max_length=max_length, truncation_mode=mode, prefix_sharing=prefix_sharing
    )
    for e, cost in zip(ex, costs.tolist(), strict=True):
        b = collate_packed(
            [e], 0, max_length=max_length, truncation_mode=mode, prefix_sharing=prefix_sharing
        )
        assert b.num_real_tokens == cost
