"""SFT for the baselines: TRL's SFT formats, completion-only loss, packing, the fused head.

Truth: TRL 1.16 SFTTrainer's own dataset preparation for the token ids and labels, and a plain
`AutoModelForCausalLM(..., labels=...)` cross-entropy for the loss and its gradient.
Run: python -m pytest tests/test_sft.py -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from data_helpers import tiny_tokenizer, write_jsonl
from test_trainer import tiny_model
from transformers import AutoModelForCausalLM

from csd_fast import DPOConfig, DPOTrainer
from csd_fast.batch import collate_padded
from csd_fast.data import PreferenceDataError, load_rows, tokenize_pairs
from csd_fast.packing import collate_packed

TEXT = [
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": "What color is the sky?", "completion": " It is green."},
    {"prompt": "Hello world,", "completion": " how are you today?"},
    {"prompt": "Paris is the capital", "completion": " of France."},
]
CONV = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "completion": [{"role": "assistant", "content": r["completion"].strip()}],
    }
    for r in TEXT
]
MESSAGES = [{"messages": r["prompt"] + r["completion"]} for r in CONV]
PLAIN = [{"text": r["prompt"] + r["completion"]} for r in TEXT]


def trl_sft_prepare(rows, tok, max_length=1024):
    """TRL 1.16's `SFTTrainer._prepare_dataset` on `rows` (input_ids, labels), no trainer built."""
    from datasets import Dataset
    from trl import SFTTrainer

    completion_only = "completion" in rows[0]
    stub = SimpleNamespace(_tokenizer=tok, completion_only_loss=completion_only, chat_template=None)
    args = SimpleNamespace(
        dataset_num_proc=None,
        dataset_text_field="text",
        assistant_only_loss=False,
        max_length=max_length,
        truncation_mode="keep_start",
        shuffle_dataset=False,
    )
    out = SFTTrainer._prepare_dataset(stub, Dataset.from_list(rows), tok, args, False, None, "t")
    return [(ex["input_ids"], ex["labels"]) for ex in out]


@pytest.mark.parametrize("rows", [TEXT, CONV, MESSAGES, PLAIN], ids=["text", "conv", "msg", "lm"])
def test_tokens_and_labels_match_trl(rows):
    tok = tiny_tokenizer()
    pairs = tokenize_pairs(rows, tok, cache_dir=None)
    assert pairs.is_sft and len(pairs) == len(rows)
    for k, (ids, labels) in enumerate(trl_sft_prepare(rows, tok)):
        ex = pairs[k]
        assert ex["rejected_ids"] == []
        assert ex["prompt_ids"] + ex["chosen_ids"] == ids
        want = [-100] * len(ex["prompt_ids"]) + ex["chosen_ids"]
        assert want == labels


def hf_cross_entropy(model, examples, pad_id):
    """A plain causal-LM loss: right-padded rows, labels -100 on prompt and padding."""
    T = max(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) for ex in examples)
    ids = torch.full((len(examples), T), pad_id)
    labels = torch.full((len(examples), T), -100)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for r, ex in enumerate(examples):
        p, c = ex["prompt_ids"], ex["chosen_ids"]
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[r, : len(p) + len(c)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize(
    "layout,fused", [("padded", False), ("padded", True), ("packed", True), ("prefix", False)]
)
@pytest.mark.parametrize("rows", [TEXT, MESSAGES], ids=["completion_only", "all_tokens"])
def test_loss_and_gradient_equal_plain_cross_entropy(tmp_path, layout, fused, rows):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        loss_type=["sft"],
        fused=fused,
        padding_free=layout != "padded",
        prefix_sharing=layout == "prefix",
        bf16=False,
        report_to="none",
        dataset_cache_dir=None,
        use_cpu=True,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(str(tmp_path / "m"), args=args, train_dataset=rows)
    assert trainer.ref_model is None  # SFT never copies a reference
    examples = [trainer.train_pairs[i] for i in range(len(rows))]
    if layout == "padded":
        batch = collate_padded(examples, tok.pad_token_id)
    else:
        batch = collate_packed(examples, tok.pad_token_id, prefix_sharing=layout == "prefix")
    loss = trainer.compute_loss(batch)
    loss.backward()
    ours = [p.grad.clone() for p in trainer.model.parameters()]

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m").float()
    want = hf_cross_entropy(ref, examples, tok.pad_token_id)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for got, p in zip(ours, ref.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_csd_train_sft_baseline(tmp_path):
    from csd_fast.cli import main

    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = [dict(r, lang="en") for r in TEXT * 4]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(tmp_path / "m"), "--dataset_name"]
    flags += [str(tmp_path / "sft.jsonl"), "--output_dir", str(out), "--loss_type", "sft"]
    flags += ["--max_steps", "8", "--learning_rate", "5e-3", "--logging_steps", "1"]
    flags += ["--per_device_train_batch_size", "4", "--padding_free", "--fused"]
    flags += ["--report_to", "none", "--bf16", "false", "--dataset_cache_dir", "none"]
    flags += ["--gradient_checkpointing", "false", "--save_strategy", "no"]
    assert main(flags) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in logs if "loss" in h]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "mean_token_accuracy" in steps[-1] and "entropy" in steps[-1]
    assert not any(k.startswith("rewards/") for k in steps[-1])  # no reference, no rewards
    assert (out / "final" / "model.safetensors").exists()


def test_sft_rows_errors(tmp_path):
    tok = tiny_tokenizer()
    bad = TEXT[:2] + [{"prompt": "The sky is", "completion": "  "}]
    with pytest.raises(PreferenceDataError, match=r"row 2.*'completion'.*empty"):
        tokenize_pairs(bad, tok, cache_dir=None)
    mixed = TEXT[:2] + CONV[:1]
    with pytest.raises(PreferenceDataError, match=r"row 2.*mixed"):
        tokenize_pairs(mixed, tok, cache_dir=None)
    skipped = tokenize_pairs(bad, tok, cache_dir=None, on_bad_row="skip")
    assert len(skipped) == 2 and skipped.skipped == {"empty_completion": 1}
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid"], report_to="none")
    tiny_model(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"loss_type \['sft'\]"):
        DPOTrainer(str(tmp_path / "m"), args=args, train_dataset=load_rows(TEXT))


@pytest.mark.parametrize("budget", [None, 24], ids=["count", "token_budget"])
@pytest.mark.parametrize("rows", [TEXT, MESSAGES], ids=["completion_only", "all_tokens"])
def test_accumulated_step_is_one_token_mean_as_trl(tmp_path, rows, budget):
    """Gradient accumulation over micro-batches of unequal token counts: TRL's SFTTrainer takes
    the step's token sum over its token count, i.e. one cross-entropy over all the rows (a mean
    of micro-batch means would weigh a short row's tokens more). The step's accumulated
    gradient, read by a callback at on_pre_optimizer_step, must equal the plain cross-entropy's
    gradient over the whole step."""
    from transformers import TrainerCallback

    class KeepGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.grads = [p.grad.detach().clone() for p in model.parameters()]

    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ragged = rows[:1] + rows[1:2] * 2 + rows[2:]  # 5 rows: micro-batches of 2, 2 and 1
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), loss_type=["sft"], padding_free=True, bf16=False,
        per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1,
        max_tokens_per_batch=budget, max_grad_norm=0.0, report_to="none", dataset_cache_dir=None,
        use_cpu=True, gradient_checkpointing=False, save_strategy="no",
    )  # fmt: skip
    keep = KeepGradients()
    trainer = DPOTrainer(str(tmp_path / "m"), args=args, train_dataset=ragged, callbacks=[keep])
    plan = trainer.training_job().plans(0)[0]
    assert 1 < len(plan) <= 4 and sum(len(m) for m in plan) == len(ragged)  # 1 step, 2-4 parts
    trainer.train()

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m").float()
    examples = [trainer.train_pairs[i] for i in range(len(ragged))]
    hf_cross_entropy(ref, examples, tok.pad_token_id).backward()
    for got, p in zip(keep.grads, ref.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
