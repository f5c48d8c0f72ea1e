"""Reward scoring: packed == padded == the HF model's own raw logits; BOS rule; OOM halving.

python -m pytest -q tests/sampling/test_rewards.py
"""

from __future__ import annotations

import random

import pytest
import torch

from csd_fast.sampling.rewards import (
    PackedScorer,
    rm_input_ids,
    strip_double_bos,
    token_budget_batches,
)
from tests.sampling.models import build_reward_model


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("rm") / "rm")


def _seqs(n=13, seed=0):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(7, 200) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


def test_packed_and_padded_equal_the_models_raw_logits(rm_dir):
    from transformers import AutoModelForSequenceClassification

    seqs = _seqs()
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # truth: each sequence alone, no padding, the model's own pooling
        truth = torch.tensor([hf(torch.tensor([s])).logits[0, 0].item() for s in seqs])
    packed = PackedScorer(str(rm_dir), dtype="float32")
    padded = PackedScorer(str(rm_dir), dtype="float32", packing=False)
    assert packed.packed and not padded.packed
    for scorer in (packed, padded):
        got = torch.from_numpy(scorer.score(seqs, max_batch_tokens=150, max_batch_size=4))
        torch.testing.assert_close(got.float(), truth, rtol=1e-5, atol=1e-5)
    # raw logits, not probabilities: a sigmoid would squeeze them into (0, 1)
    assert (truth.abs() > 1).any()


def test_out_of_memory_halves_the_batch(rm_dir, monkeypatch):
    scorer = PackedScorer(str(rm_dir), dtype="float32")
    seqs = _seqs(9, seed=1)
    want = scorer.score(seqs, max_batch_tokens=10_000)
    real, sizes = scorer.forward, []

    def tight_memory(batch):  # fault injection: any batch over 100 tokens "runs out of memory"
        sizes.append(sum(map(len, batch)))
        if sum(map(len, batch)) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    monkeypatch.setattr(scorer, "forward", tight_memory)
    got = scorer.score(seqs, max_batch_tokens=10_000)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    assert sizes[0] > 100 and max(s for s in sizes if s <= 100) <= 100
    monkeypatch.setattr(scorer, "forward", lambda b: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # other errors are not swallowed
        scorer.score(seqs, max_batch_tokens=10_000)


def test_token_budget_batches():
    lengths = [5, 50, 7, 30, 30, 2, 90]
    batches = token_budget_batches(lengths, max_tokens=60, max_size=3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or sum(lengths[i] for i in b) <= 60)
    assert batches[0] == [6]  # longest first: a batch that does not fit fails early


def test_rm_template_and_duplicated_bos():
    from csd_fast.demo.assets import build_demo_tokenizer

    tok = build_demo_tokenizer()  # template writes BOS, tokenizer adds one too
    msgs = [{"role": "user", "content": "The car is red."}]
    ids = rm_input_ids(tok, msgs, "It is blue.")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    text = tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": "It is blue."}], tokenize=False
    )
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert strip_double_bos([1, 1, 5], 1) == [1, 5] and strip_double_bos([1, 5], 1) == [1, 5]


def test_one_row_layout_with_varlen_metadata(rm_dir, monkeypatch):
    """The GPU layout (one row, cu_seqlens for flash-attn) scores the same as the row layout."""
    import csd_fast.sampling.rewards as rewards
    from csd_fast.sampling.rewards import pack_sequences

    seqs = _seqs(6, seed=2)
    kwargs, last = pack_sequences(seqs, "cpu")
    lengths = [len(s) for s in seqs]
    assert kwargs["input_ids"].shape == (1, sum(lengths))
    assert kwargs["cu_seqlens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert last.tolist() == [x - 1 for x in torch.tensor(lengths).cumsum(0).tolist()]
    scorer = PackedScorer(str(rm_dir), dtype="float32")
    rows = scorer.score(seqs, max_batch_tokens=10_000)
    monkeypatch.setattr(rewards, "_flash_available", lambda device, dtype: True)
    one = scorer.score(seqs, max_batch_tokens=10_000)  # dense path over the single row on CPU
    torch.testing.assert_close(torch.from_numpy(one), torch.from_numpy(rows), rtol=1e-5, atol=1e-5)
