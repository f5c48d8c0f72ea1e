"""Every training recipe in recipes/ parses and trains one step on a tiny model of its architecture.

The model each recipe names is replaced by a tiny random model of the same `model_type` (the
architecture of the real config.json: EuroLLM is llama, Tiny Aya cohere2), built locally; every
other value is the recipe's own except the few that would not fit a CPU test (sequence length,
bf16, steps). Run: python -m pytest tests/test_recipes.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_helpers import tiny_tokenizer, write_jsonl

from csd_fast.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LOOP_RECIPES = sorted(RECIPES.glob("loop-*.yaml"))
# training recipes: everything but the loops (loop-demo-train.yaml is the CPU walk-through's
# training stage, run by tests/pipeline/test_loop.py's sibling, the demo loop)
TRAIN_RECIPES = sorted(
    p for p in RECIPES.glob("*.yaml") if p not in LOOP_RECIPES or p.name == "loop-demo-train.yaml"
)
LOOP_RECIPES = [p for p in LOOP_RECIPES if p.name != "loop-demo-train.yaml"]
# model_type of each real model's config.json (EuroLLM-9B-Instruct: LlamaForCausalLM;
# tiny-aya-global: Cohere2ForCausalLM)
MODEL_TYPES = {
    "utter-project/EuroLLM-9B-Instruct": "llama",
    "CohereLabs/tiny-aya-global": "cohere2",
}


def tiny_model(model_type: str, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if model_type == "cohere2":
        sizes.update(sliding_window=16)  # smaller than the sequences: the window binds here
    config = AutoConfig.for_model(model_type, **sizes)
    return AutoModelForCausalLM.from_config(config)


def recipe_rows(recipe: dict) -> list[dict]:
    """Rows in the format the recipe trains on: SFT, CLO groups, or plain pairs (with lang)."""
    prompts = [("The sky is", " blue.", " green."), ("Hello world,", " how are you?", " fine.")]
    rows = []
    for i in range(8):
        p, c, r = prompts[i % 2]
        lang = "en" if i % 2 == 0 else "da"  # CLO: group i // 2 = an English and a Danish pair
        rows.append({"prompt": f"{p} {i}", "chosen": c, "rejected": r, "lang": lang})
    if recipe["loss_type"] == ["sft"]:
        return [{"prompt": r["prompt"], "completion": r["chosen"], "lang": r["lang"]} for r in rows]
    if "clo" in recipe["loss_type"]:
        for i, r in enumerate(rows):
            r["group"], r["sft"] = i // 2, r["lang"] == "da"
    return rows


def test_every_loop_recipe_parses_and_its_training_recipe_is_accepted():
    from csd_fast.cli import resolve
    from csd_fast.pipeline.loopconfig import LoopConfig

    assert {p.stem for p in LOOP_RECIPES} >= {
        "loop-csd-paired",
        "loop-maxr",
        "loop-clo",
        "loop-icr",
    }
    for path in LOOP_RECIPES:
        config = LoopConfig.from_yaml(path)
        assert Path(config.train_recipe).exists(), path.name
        _, kwargs = resolve(["--config", config.train_recipe, "--output_dir", "o"])
        assert kwargs["loss_type"], path.name
        if config.base_model != "demo":
            assert config.base_model in MODEL_TYPES, path.name


def test_every_recipe_names_a_known_architecture():
    assert len(TRAIN_RECIPES) >= 7
    for path in TRAIN_RECIPES:
        recipe = yaml.safe_load(path.read_text())
        if path.name == "loop-demo-train.yaml":
            continue  # the demo loop supplies its model
        assert recipe["model_name_or_path"] in MODEL_TYPES, path.name
        assert path.read_text().count("#") >= 10, f"{path.name}: values need their sources"


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_step_on_a_tiny_model(tmp_path, path):
    recipe = yaml.safe_load(path.read_text())
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    # the demo loop's training recipe names no model: the loop passes the demo Llama
    model_type = (
        MODEL_TYPES[recipe["model_name_or_path"]] if "model_name_or_path" in recipe else "llama"
    )
    tiny_model(model_type, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write_jsonl(tmp_path / "data.jsonl", recipe_rows(recipe))
    out = tmp_path / "out"
    flags = ["--config", str(path), "--model_name_or_path", str(model_dir)]
    flags += ["--dataset_name", str(tmp_path / "data.jsonl"), "--output_dir", str(out)]
    flags += ["--max_steps", "1", "--max_length", "48", "--bf16", "false"]
    flags += ["--ref_cache_dir", str(tmp_path / "ref"), "--dataset_cache_dir", "none"]
    flags += ["--disable_tqdm", "true", "--logging_steps", "1"]
    if recipe.get("eval_dataset_name"):
        flags += ["--eval_dataset_name", str(tmp_path / "data.jsonl"), "--eval_steps", "1"]
        flags += ["--save_steps", "1"]
    assert main(flags) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(h for h in logs if "loss" in h)
    assert step["step"] == 1 and step["loss"] == step["loss"]  # one finite step
    saved = yaml.safe_load((out / "config.yaml").read_text())["training"]
    for key in ("loss_type", "beta", "learning_rate", "trainable_params", "fused", "clo_lambda"):
        if key in recipe:
            assert saved[key] == recipe[key], key
    if recipe["loss_type"] != ["sft"]:
        # the lang column reaches the metrics
        assert any(k.startswith("rewards/accuracies/") for k in step), sorted(step)
