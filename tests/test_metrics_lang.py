"""Per-language training metrics (rewards/accuracies/<lang>, rewards/margins/<lang>).

Run: python -m pytest tests/test_metrics_lang.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from csd_fast import DPOConfig, DPOTrainer
from csd_fast.data import PreferenceDataError, load_rows, tokenize_pairs
from csd_fast.demo import build_demo, build_demo_tokenizer
from csd_fast.losses import LossParams, PairLogps
from csd_fast.metrics import pair_metrics


def _logps(c, r, rc, rr) -> PairLogps:
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    n = len(c)
    return PairLogps(t(c), t(r), t(rc), t(rr), torch.ones(n), torch.ones(n))


def test_per_language_values_by_hand():
    # beta 1: margins are (c - rc) - (r - rr) = 2, -1, 0.5, 3 ; languages en, da, en, da
    logps = _logps([1.0, 0.0, 2.0, 3.0], [-1.0, 1.0, 1.5, 0.0], [0.0] * 4, [0.0] * 4)

    def metrics(langs):
        no_tokens = torch.zeros(0, dtype=torch.long)
        return pair_metrics(
            LossParams(beta=1.0),
            logps,
            token_entropy=None,
            token_mean_logit=None,
            token_is_top1=None,
            token_seq_ids=no_tokens,
            num_pairs=4,
            langs=langs,
        )

    got = metrics(("en", "da", "en", "da"))
    assert got["rewards/margins/en"] == pytest.approx((2.0 + 0.5) / 2)
    assert got["rewards/margins/da"] == pytest.approx((-1.0 + 3.0) / 2)
    assert got["rewards/accuracies/en"] == 1.0
    assert got["rewards/accuracies/da"] == 0.5
    assert got["rewards/margins"] == pytest.approx(4.5 / 4)
    assert not any("/en" in k or "/da" in k for k in metrics(None))


def _demo_rows(path, n):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:n]
    for row in rows:  # the CLO columns from the demo's own layout (one item = two pairs)
        row["group"], row["sft"] = row["id"], row["lang"] != "en"
    return rows


def test_lang_column_is_carried_and_checked(tmp_path):
    tok = build_demo_tokenizer()
    rows = [{"prompt": "Hi.", "chosen": " Hi.", "rejected": " Hej.", "lang": x} for x in "ab"]
    pairs = tokenize_pairs(rows, tok, cache_dir=tmp_path)
    assert [pairs[i]["lang"] for i in range(2)] == ["a", "b"]
    again = tokenize_pairs(rows, tok, cache_dir=tmp_path)  # from the cache
    assert again.from_cache and [again[i]["lang"] for i in range(2)] == ["a", "b"]
    rows += [{"prompt": "Hi.", "chosen": " Hi.", "rejected": " Hej."}]
    with pytest.raises(PreferenceDataError, match=r"row 2.*'lang'"):
        tokenize_pairs(rows, tok, cache_dir=None)
    bad = [{"prompt": "Hi.", "chosen": " Hi.", "rejected": " Hej.", "lang": "en/da"}]
    with pytest.raises(PreferenceDataError, match="lang"):
        tokenize_pairs(bad, tok, cache_dir=None)


@pytest.mark.parametrize("loss_type", ["sigmoid", "clo"])
def test_trainer_logs_each_language(tmp_path, loss_type):
    assets = build_demo(tmp_path / "assets")
    train = _demo_rows(assets.train_file, 32)
    held = _demo_rows(assets.eval_file, 12)
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        loss_type=[loss_type],
        max_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=1,  # one pair per micro-batch: eval means are pair means
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        dataset_cache_dir=None,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        str(assets.model_dir),
        args=args,
        train_dataset=load_rows(train),
        eval_dataset=load_rows(held),
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    for key in ("rewards/accuracies/en", "rewards/accuracies/da", "rewards/margins/da"):
        assert key in train_logs[-1], key
    ev = next(h for h in trainer.state.log_history if "eval_loss" in h)
    n = {lang: sum(r["lang"] == lang for r in held) for lang in ("en", "da")}
    mixed = sum(n[x] * ev[f"eval_rewards/margins/{x}"] for x in n) / len(held)
    assert ev["eval_rewards/margins"] == pytest.approx(mixed, rel=1e-6, abs=1e-9)
    acc = sum(n[x] * ev[f"eval_rewards/accuracies/{x}"] for x in n) / len(held)
    assert ev["eval_rewards/accuracies"] == pytest.approx(acc)
    # training moved the model: the per-language margins are not all zero
    assert any(abs(ev[f"eval_rewards/margins/{x}"]) > 0 for x in n)
