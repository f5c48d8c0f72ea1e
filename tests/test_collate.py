"""The vectorised collators equal the plain per-token ones bit for bit, on random ragged batches.

    python -m pytest tests/test_collate.py -q

The truth is tests/collate_reference.py (one Python step per token). Batches mix empty prompts,
empty and one-token completions, a long tail, SFT rows (no rejected side), truncation in both
modes (keep_end leaves some pairs with two different prompts: two segments instead of one),
rows of a fixed capacity and every attention backend's metadata.
"""

from __future__ import annotations

import random

import pytest
import torch
from collate_reference import collate_packed_reference, collate_padded_reference

from csd_fast.batch import collate_padded
from csd_fast.packing import collate_packed


def ragged_examples(n: int, seed: int, sft: str = "none") -> list[dict]:
    """n pairs with long-tailed lengths and the corner cases; sft: none | some | all."""
    rng = random.Random(seed)
    length = lambda: rng.choice([0, 1, 1, 2, 3, 5, 8, 13]) if rng.random() < 0.7 else rng.randint(
        14, 60
    )  # fmt: skip
    toks = lambda: [rng.randrange(1, 500) for _ in range(length())]
    out = []
    for i in range(n):
        ex = {"prompt_ids": toks(), "chosen_ids": toks(), "rejected_ids": toks(), "row": 7 * i}
        if sft == "all" or (sft == "some" and rng.random() < 0.4):
            ex["rejected_ids"], ex["sft"] = [], True
        elif sft == "some":
            ex["sft"] = False
        if not ex["chosen_ids"] and not ex["prompt_ids"]:
            ex["chosen_ids"] = [3]  # a pair always has something to score
        out.append(ex)
    return out


def assert_same(batch, ref: dict) -> None:
    got = dict(batch.model_kwargs)
    got.update(token_index=batch.token_index, token_labels=batch.token_labels,
               seq_offsets=batch.seq_offsets, num_tokens=batch.num_tokens,
               num_real_tokens=batch.num_real_tokens, capacity=batch.capacity,
               pair_ids=batch.pair_ids)  # fmt: skip
    for name in ("group_ids", "sft_mask", "ref_chosen_logps", "ref_rejected_logps", "langs"):
        if getattr(batch, name) is not None:
            got[name] = getattr(batch, name)
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    for key, want in ref.items():
        have = got[key]
        if isinstance(want, torch.Tensor):
            assert have.dtype == want.dtype and have.shape == want.shape, (key, have, want)
            diff = (have != want).nonzero()
            assert diff.numel() == 0, f"{key}: first difference at {diff[0].tolist()}"
        else:
            assert type(have) is type(want) and have == want, (key, have, want)
    assert batch.host_seq_offsets == tuple(batch.seq_offsets.tolist())


CASES = [  # (max_length, truncation_mode, row_capacity)
    (None, "keep_start", None),
    (24, "keep_start", None),
    (24, "keep_end", None),
    (None, "keep_start", 128),
    (40, "keep_end", 80),  # a shared pair holds up to 2 x max_length tokens
]


@pytest.mark.parametrize("sft", ["none", "some", "all"])
@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_packed_equals_per_token_reference(case, prefix_sharing, sft):
    max_length, trunc, capacity = case
    for seed in range(4):
        examples = ragged_examples(1 + 5 * seed, seed, sft)
        for backend in ("auto", "sdpa", "flash"):
            kw = dict(max_length=max_length, truncation_mode=trunc, row_capacity=capacity,
                      prefix_sharing=prefix_sharing, attn_backend=backend)  # fmt: skip
            batch = collate_packed(examples, 0, **kw)
            assert_same(batch, collate_packed_reference(examples, 0, **kw))


@pytest.mark.parametrize("sft", ["none", "some", "all"])
@pytest.mark.parametrize("case", [(None, "keep_start", None), (24, "keep_end", 8),
                                  (24, "keep_start", 3)])  # fmt: skip
def test_padded_equals_per_token_reference(case, sft):
    max_length, trunc, multiple = case
    for seed in range(4):
        examples = ragged_examples(1 + 5 * seed, 100 + seed, sft)
        kw = dict(max_length=max_length, truncation_mode=trunc, pad_to_multiple_of=multiple)
        assert_same(collate_padded(examples, 2, **kw), collate_padded_reference(examples, 2, **kw))


def test_reference_fields_and_empty_segments():
    # cached reference values travel; a pair reduced to nothing places no segment
    examples = ragged_examples(6, 9)
    for i, ex in enumerate(examples):
        ex["ref_chosen_logps"], ex["ref_rejected_logps"], ex["group"] = -1.5 * i, -2.0, i // 2
    examples[2].update(prompt_ids=[], chosen_ids=[5], rejected_ids=[])
    for prefix in (False, True):
        kw = dict(max_length=1, prefix_sharing=prefix)
        assert_same(collate_packed(examples, 0, **kw), collate_packed_reference(examples, 0, **kw))


def test_keep_end_pairs_with_two_prompts_are_not_shared():
    # keep_end cuts the prompt per sequence: a long chosen keeps less prompt than a short rejected
    ex = {"prompt_ids": list(range(1, 9)), "chosen_ids": [20] * 6, "rejected_ids": [30]}
    batch = collate_packed([ex], 0, max_length=8, truncation_mode="keep_end", prefix_sharing=True)
    assert batch.model_kwargs["csd_segment_ids"].unique().tolist() == [0, 1]  # two segments
    assert_same(batch, collate_packed_reference([ex], 0, max_length=8, truncation_mode="keep_end",
                                                prefix_sharing=True))  # fmt: skip


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix", "trl_collator"])
@pytest.mark.parametrize(("max_length", "trunc"), [(None, "keep_start"), (6, "keep_end")])
def test_completion_lengths_are_trls_counts(layout, max_length, trunc):
    """ipo / sigmoid_norm divide by TRL's completion_mask.sum(1) (unshifted): a completion that
    starts its row (empty prompt, or keep_end cut it all) counts its unscored first token."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from csd_fast.trl_collate import batch_from_collated

    trl_collator = trl_dpo.DataCollatorForPreference(0, max_length, trunc)
    seen = 0  # batches with such a completion: the case under test must occur
    for seed in range(4):
        examples = ragged_examples(3 + 4 * seed, 40 + seed)
        out = trl_collator(examples)
        trl_counts = out["completion_mask"].sum(1)
        if layout == "padded":
            batch = collate_padded(examples, 0, max_length=max_length, truncation_mode=trunc)
        elif layout == "trl_collator":
            batch = batch_from_collated(examples, out)
        else:
            batch = collate_packed(examples, 0, max_length=max_length, truncation_mode=trunc,
                                   prefix_sharing=layout == "prefix")  # fmt: skip
        assert batch.completion_lengths().tolist() == trl_counts.tolist()
        assert batch.sequence_lengths().tolist() == out["completion_mask"][:, 1:].sum(1).tolist()
        starts = (out["completion_mask"][:, 0] == 1).any().item()
        assert (batch.unscored_first is not None) == starts
        seen += starts
    assert seen
