"""Test helpers for the safety tests: a tiny saved model + data on disk, and `csd train` flags.

`write_tiny_run(dir)` saves a 2-layer hidden-32 Llama with the local BPE tokenizer of
data_helpers and 16 train / 6 eval pairs as JSONL, so `csd train` runs through the same loading
code as for a real model, in about a second per run.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

# the pairs and the model tests/test_trainer.py trains on
from test_trainer import ROWS, tiny_model


def write_tiny_run(root: str | Path) -> SimpleNamespace:
    from data_helpers import tiny_tokenizer

    root = Path(root)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        tok = tiny_tokenizer()
        tiny_model(tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    train, evalset = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    evalset.write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:9]))
    return SimpleNamespace(model=str(model_dir), train=str(train), eval=str(evalset), root=root)


def train_flags(assets, out, *extra: str, eval_set: bool = False) -> list[str]:
    """`csd train` flags for a 6-step run checkpointing every 2 steps, logging every step."""
    flags = [
        "--model_name_or_path",
        assets.model,
        "--dataset_name",
        assets.train,
        "--output_dir",
        str(out),
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "linear",
        "--warmup_steps",
        "2",
        "--bf16",
        "false",
        "--gradient_checkpointing",
        "false",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--max_length",
        "64",
        "--seed",
        "0",
        "--dataset_cache_dir",
        "none",
    ]
    if eval_set:
        flags += ["--eval_dataset_name", assets.eval, "--eval_steps", "3"]
    return [*flags, *extra]


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without wall-clock fields (the only ones that differ run to run)."""
    return [
        {k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k} for r in rows
    ]
