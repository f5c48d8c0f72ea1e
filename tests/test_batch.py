"""`collate_padded` reproduces TRL 1.16's `DataCollatorForPreference`, truncation included.

The padded rows and attention mask must equal TRL's, and the scored tokens (`token_index`,
`token_labels`) must be exactly the positions of TRL's shifted completion mask.

Run: python -m pytest tests/test_batch.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from csd_fast.batch import collate_padded, segment_sum

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def random_examples(seed: int, n: int = 5) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, 50) for _ in range(rng.randrange(lo, hi))]

    return [{"prompt_ids": ids(0, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)}
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (8, "keep_start"),
                                             (8, "keep_end"), (3, "keep_end")])  # fmt: skip
def test_padded_layout_equals_trl_collator(seed, max_length, mode):
    examples = random_examples(seed)
    trl_batch = trl_dpo.DataCollatorForPreference(
        pad_token_id=0, max_length=max_length, truncation_mode=mode
    )(examples)
    ours = collate_padded(examples, 0, max_length=max_length, truncation_mode=mode)
    torch.testing.assert_close(ours.input_ids, trl_batch["input_ids"])
    torch.testing.assert_close(ours.model_kwargs["attention_mask"], trl_batch["attention_mask"])
    # TRL scores position t for label t+1 wherever completion_mask[t+1] == 1
    shifted = trl_batch["completion_mask"][:, 1:].bool()
    T = trl_batch["input_ids"].shape[1]
    rows, cols = shifted.nonzero(as_tuple=True)
    assert sorted((rows * T + cols).tolist()) == sorted(ours.token_index.tolist())
    want_labels = trl_batch["input_ids"][:, 1:][shifted]
    order = torch.argsort(rows * T + cols)
    got_order = torch.argsort(ours.token_index)
    torch.testing.assert_close(ours.token_labels[got_order], want_labels[order])
    # sequence lengths are the per-row counts of TRL's shifted mask
    torch.testing.assert_close(ours.sequence_lengths(), shifted.sum(1))
    assert ours.num_tokens == int(trl_batch["attention_mask"].sum())


def test_segment_sum_is_differentiable_and_exact():
    values = torch.randn(7, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 7])
    out = segment_sum(values, offsets)
    torch.testing.assert_close(out, torch.stack([values[:3].sum(), values.new_zeros(()),
                                                 values[3:].sum()]))  # fmt: skip
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.ones_like(values))
