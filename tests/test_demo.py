"""Tests for the built-in demo (csd_fast/demo): tokenizer, model config, data, and learnability.

    python -m pytest tests/test_demo.py -x -q            # all (the learnability run is marked slow)
    python -m pytest tests/test_demo.py -x -q -m "not slow"

The learnability test trains the demo model with a minimal DPO loop written here (padded batches
from `collate_padded`, sigmoid loss against a frozen copy) using `DEMO_RECIPE`, independent of the
engine's trainer, and checks held-out reward accuracy: the demo is only useful if it learns.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from csd_fast.batch import collate_padded, segment_sum
from csd_fast.demo import (
    DEMO_EVAL_FILE,
    DEMO_RECIPE,
    DEMO_TRAIN_FILE,
    build_demo,
    build_demo_tokenizer,
    demo_model_config,
    make_data,
)


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


# ----------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer):
    for row in _rows(DEMO_EVAL_FILE)[:40]:
        for text in (row["prompt"], row["prompt"] + row["chosen"]):
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id
            assert tokenizer.unk_token_id not in ids, text
            assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tokenizer):
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and tokenizer.unk_token_id not in ids
    # TRL appends the EOS *string*: it must come back as the single EOS id
    ids = tokenizer("Anna er i haven." + tokenizer.eos_token)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer("Anna xyzzy")["input_ids"][-1] == tokenizer.unk_token_id
    assert len(tokenizer) < 512  # small on purpose: it is what makes the demo learn fast


def test_tokenizer_deterministic_and_saved(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    again = build_demo_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = _rows(DEMO_TRAIN_FILE)[0]["prompt"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")


def test_chat_template_prompt_is_prefix(tokenizer):
    row = _rows(DEMO_TRAIN_FILE)[0]
    prompt = [{"role": "user", "content": row["prompt"]}]
    full = prompt + [{"role": "assistant", "content": row["chosen"]}]
    p_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    f_ids = tokenizer.apply_chat_template(full)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids
    assert f_ids[-1] == tokenizer.eos_token_id and f_ids.count(tokenizer.bos_token_id) == 1


# --------------------------------------------------------------------------------- model files


def test_model_config_head_dim(tokenizer):
    config = demo_model_config(len(tokenizer))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim >= 64  # vLLM's CPU attention refuses smaller heads
    assert head_dim * config.num_attention_heads == config.hidden_size
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id


def test_build_demo_idempotent(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = build_demo(tmp_path)
    weights = assets.model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_demo(tmp_path) == assets
    assert weights.stat().st_mtime_ns == stamp  # reused, not rewritten
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    assert model.config.vocab_size == len(tok)
    # same seed, same weights: a second fresh build is bit-identical
    other = build_demo(tmp_path / "other")
    assert (other.model_dir / "model.safetensors").read_bytes() == weights.read_bytes()


# ----------------------------------------------------------------------------------------- data


def test_data_is_trl_standard_format():
    for path in (DEMO_TRAIN_FILE, DEMO_EVAL_FILE):
        rows = _rows(path)
        assert rows
        by_id: dict[int, list[dict]] = {}
        for row in rows:
            assert {"prompt", "chosen", "rejected", "id", "lang"} <= row.keys()
            assert all(isinstance(row[k], str) and row[k] for k in ("prompt", "chosen", "rejected"))
            assert row["chosen"] != row["rejected"]
            assert row["chosen"].startswith(" ") and not row["prompt"].endswith(" ")
            by_id.setdefault(row["id"], []).append(row)
        for pair in by_id.values():
            # one item = the same answer in both languages, each preferred for its own prompt
            assert sorted(r["lang"] for r in pair) == ["da", "en"]
            en, da = sorted(pair, key=lambda r: r["lang"] != "en")
            assert en["chosen"] == da["rejected"] and da["chosen"] == en["rejected"]


def test_data_splits_disjoint_and_sized(tokenizer):
    train, evals = _rows(DEMO_TRAIN_FILE), _rows(DEMO_EVAL_FILE)
    assert 400 <= len(train) <= 1000 and 100 <= len(evals) <= 200
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    # every eval token was seen in train, so held-out accuracy measures generalisation, not luck
    seen = {
        i
        for r in train
        for k in ("prompt", "chosen", "rejected")
        for i in tokenizer(r[k])["input_ids"]
    }
    for r in evals:
        assert set(tokenizer(r["prompt"] + r["chosen"])["input_ids"]) <= seen


def test_make_data_regenerates_committed_files():
    train, evals = make_data.make_items()
    assert make_data.to_pairs(train, 0) == _rows(DEMO_TRAIN_FILE)
    assert make_data.to_pairs(evals, len(train)) == _rows(DEMO_EVAL_FILE)


# ------------------------------------------------------------------------- learnability (slow)


def tokenize_pair(tokenizer, row: dict) -> dict:
    """TRL 1.16's standard-format rule: EOS appended, completion = where the token lists diverge."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    out = {}
    for key in ("chosen", "rejected"):
        text = row[key] if row[key].endswith(eos) else row[key] + eos
        full = tokenizer(row["prompt"] + text)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids
        out[f"{key}_ids"] = full[len(prompt_ids) :]
    return {"prompt_ids": prompt_ids, **out}


def sequence_logps(model, batch) -> torch.Tensor:
    """(2P,) summed completion log-probs: the chosen rows then the rejected rows."""
    logits = model(**batch.model_kwargs).logits  # (R, T, V)
    flat = logits.flatten(0, 1)[batch.token_index].float()  # (N, V)
    token_logps = flat.log_softmax(-1).gather(-1, batch.token_labels[:, None]).squeeze(-1)
    return segment_sum(token_logps, batch.seq_offsets)


def dpo_terms(model, ref, batch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid loss, per-pair reward margin) for one padded batch."""
    P = batch.num_pairs
    logps = sequence_logps(model, batch)
    with torch.no_grad():
        ref_logps = sequence_logps(ref, batch)
    ratio = logps - ref_logps
    margin = beta * (ratio[:P] - ratio[P:])  # rewards/chosen - rewards/rejected
    return -F.logsigmoid(margin).mean(), margin.detach()


def mini_dpo(recipe: dict, model_dir, eval_every: int = 0) -> list[tuple[int, float, float]]:
    """Train with a bare DPO loop; returns held-out (step, rewards/accuracies, rewards/margins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad, max_len = tokenizer.pad_token_id, recipe["max_length"]
    train = [tokenize_pair(tokenizer, r) for r in _rows(DEMO_TRAIN_FILE)]
    evals = [tokenize_pair(tokenizer, r) for r in _rows(DEMO_EVAL_FILE)]
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    steps, warmup, lr = recipe["max_steps"], recipe["warmup_steps"], recipe["learning_rate"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe["weight_decay"])

    def lr_at(step: int) -> float:  # linear warmup then cosine to 0, as transformers' "cosine"
        if step < warmup:
            return step / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def evaluate() -> tuple[float, float]:
        model.eval()
        bs, margins = recipe["per_device_eval_batch_size"], []
        with torch.no_grad():
            for i in range(0, len(evals), bs):
                batch = collate_padded(evals[i : i + bs], pad, max_len)
                margins.append(dpo_terms(model, ref, batch, recipe["beta"])[1])
        model.train()
        m = torch.cat(margins)
        return float((m > 0).float().mean()), float(m.mean())

    rng, order, history = random.Random(recipe["seed"]), [], []
    bs = recipe["per_device_train_batch_size"]
    model.train()
    for step in range(steps):
        if len(order) < bs:  # epochs of reshuffled train rows, as a sampler would give
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[:bs], order[bs:]
        loss, _ = dpo_terms(
            model, ref, collate_padded([train[i] for i in idx], pad, max_len), recipe["beta"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            history.append((step + 1, *evaluate()))
    history.append((steps, *evaluate()))
    return history


@pytest.mark.slow
def test_demo_recipe_learns_held_out_preferences(tmp_path):
    assets = build_demo(tmp_path)
    history = mini_dpo(DEMO_RECIPE, assets.model_dir)
    step, accuracy, margin = history[-1]
    assert accuracy >= 0.9, f"held-out rewards/accuracies {accuracy:.3f} after {step} steps"
    assert margin > 1.0, f"held-out rewards/margins {margin:.3f}: learned, but barely"


@pytest.mark.slow
def test_demo_under_trl_dpo_trainer(tmp_path, monkeypatch):
    """TRL 1.16 itself: same tokenization as `tokenize_pair`, and DEMO_RECIPE learns there too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    assets = build_demo(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    data = datasets.load_dataset(
        "json", data_files={"train": str(assets.train_file), "eval": str(assets.eval_file)}
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, **DEMO_RECIPE
    )
    trainer = trl.DPOTrainer(
        model=str(assets.model_dir),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
    )
    for k in (0, 1, 333):
        ours = tokenize_pair(tokenizer, data["train"][k])
        assert {key: trainer.train_dataset[k][key] for key in ours} == ours
    trainer.train()
    final = [log for log in trainer.state.log_history if "eval_rewards/accuracies" in log][-1]
    assert final["eval_rewards/accuracies"] >= 0.9, final
