"""QLoRA against TRL 1.16's own DPOTrainer: a bitsandbytes 4-bit / 8-bit tiny Llama + LoRA.

Run: `python -m pytest tests/test_qlora_trl.py -q` (about 15 s on 2 cores).

Both trainers load the same saved model by path with the same `BitsAndBytesConfig` (bnb runs on
the CPU) and train the same LoRA for 3 steps; every logged metric must agree within the parity
harness's tolerances (tests/trl_helpers.py) and the trained adapter weights (bf16, as TRL casts
them for a quantized base) must match. Also: csd-fast's packed + fused path against TRL's padded
one, precomputed reference log-probs, a PeftModel passed in, and TRL's own `trl dpo` script with
`--load_in_4bit --use_peft` and only its imports swapped.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import torch
from trl_helpers import (
    WEIGHT_ATOL,
    base_kwargs,
    compare_logs,
    max_weight_diff,
    rows,
    save_tiny,
    step_logs,
    swapped_trl_script,
)

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32"),
    "int8": dict(load_in_8bit=True),
}


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def qlora_run(impl, models, out, quant="nf4", *, as_init_kwargs=False, eval_rows=0, **kw):
    """Train `impl` ('trl' or 'csd') on the 4-bit/8-bit tiny Llama with LoRA, the model given by
    path; `as_init_kwargs`: the config as a plain dict in model_init_kwargs (what a YAML recipe
    or `--model_init_kwargs` JSON holds) instead of the trainer argument."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    mod = trl if impl == "trl" else __import__("csd_fast")
    path, _ = save_tiny("llama", models)
    extra = {}
    if as_init_kwargs:
        kw["model_init_kwargs"] = {"quantization_config": dict(QUANT[quant])}
    else:
        extra["quantization_config"] = BitsAndBytesConfig(**QUANT[quant])
    trainer = mod.DPOTrainer(
        model=path, args=mod.DPOConfig(**base_kwargs(out, **kw)),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        eval_dataset=datasets.Dataset.from_list(rows("standard", eval_rows)) if eval_rows else None,
        processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora_config(), **extra,
    )  # fmt: skip
    trainer.train()
    adapter = {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()
               if "lora_" in k}  # fmt: skip
    return trainer, list(trainer.state.log_history), adapter


def assert_parity(ours, ref, **compare):
    (_, our_logs, our_adapter), (_, ref_logs, ref_adapter) = ours, ref
    assert compare_logs(our_logs, ref_logs, **compare) == []
    assert max_weight_diff(our_adapter, ref_adapter) <= WEIGHT_ATOL
    # it trained: a step-0-equal run could hide an adapter that never received a gradient
    assert step_logs(ref_logs)[-1]["rewards/margins"] != 0.0
    assert max(v.abs().max().item() for k, v in ref_adapter.items() if "lora_B" in k) > 0


@pytest.mark.parametrize(
    "quant, options",
    [("nf4", {}), ("int8", {}), ("nf4", {"gradient_checkpointing": True})],
    ids=["nf4", "int8", "nf4-gradient-checkpointing"],
)
def test_qlora_matches_trl(models, tmp_path, quant, options):
    ref = qlora_run("trl", models, tmp_path / "trl", quant, **options)
    ours = qlora_run("csd", models, tmp_path / "csd", quant, **options)
    import bitsandbytes as bnb

    layer = ours[0].model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt)
    trained = {n: p.dtype for n, p in ours[0].model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.bfloat16}  # TRL's QLoRA adapter dtype
    assert all("lora_" in n for n in trained)
    assert ours[0].ref_model is None  # the reference is the quantized base, adapters off
    assert_parity(ours, ref)


def test_qlora_packed_fused_from_init_kwargs_matches_trl_padded(models, tmp_path):
    """csd-fast's own layouts over a 4-bit base, the config a dict in model_init_kwargs."""
    ref = qlora_run("trl", models, tmp_path / "trl")
    ours = qlora_run(
        "csd", models, tmp_path / "csd", as_init_kwargs=True, padding_free=True, fused=True
    )
    assert_parity(ours, ref)


def test_evaluation_between_steps_leaves_qlora_training_as_trl_trains(models, tmp_path):
    """An evaluate() after every step (eval mode, no grad) must not change the training that
    follows: the step logs and adapter equal TRL's run without evaluations. (TRL's own run with
    them would not: bitsandbytes' CPU eval-mode repacking leaves it without gradients, see
    the test below.) The step-0 evaluation scores the policy against itself: rewards 0."""
    ref = qlora_run("trl", models, tmp_path / "trl")
    ours = qlora_run(
        "csd", models, tmp_path / "csd", eval_rows=4, eval_strategy="steps", eval_steps=1,
        eval_on_start=True,
    )  # fmt: skip
    evals = [h for h in ours[1] if "eval_loss" in h]
    assert len(evals) == 4 and evals[0]["eval_rewards/margins"] == 0.0
    assert evals[-1]["eval_rewards/margins"] != 0.0
    assert compare_logs(step_logs(ours[1]), step_logs(ref[1])) == []
    assert max_weight_diff(ours[2], ref[2]) <= WEIGHT_ATOL


def test_qlora_precomputed_reference_matches_trl(models, tmp_path):
    """Precomputed reference log-probs against TRL's live reference (the same values: both are
    the base with the adapter off). Not against TRL's own precompute: TRL scores in eval mode,
    and on a CPU with AVX512-BF16 bitsandbytes then repacks each 4-bit weight into an inference
    layout with no backward, so TRL's training after it gets grad_norm 0 (csd_fast.quantization
    .pin_train_mode keeps bnb layers on their training path)."""
    ref = qlora_run("trl", models, tmp_path / "trl")
    ours = qlora_run("csd", models, tmp_path / "csd", precompute_ref_log_probs=True)
    assert_parity(ours, ref)


def test_peft_model_over_a_4bit_base_matches_trl(models, tmp_path):
    """A PeftModel passed in: TRL copies its adapter into a frozen "ref" adapter; csd-fast's
    reference is a frozen copy of the adapter over the same, shared 4-bit base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path, _ = save_tiny("llama", models)
    results = {}
    for impl, mod in (("trl", trl), ("csd", __import__("csd_fast"))):
        torch.manual_seed(0)  # the same LoRA A init on both sides
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**QUANT["nf4"])
        )
        trainer = mod.DPOTrainer(
            model=peft.get_peft_model(base, lora_config()),
            args=mod.DPOConfig(**base_kwargs(tmp_path / impl)),
            train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
            processing_class=AutoTokenizer.from_pretrained(path),
        )  # fmt: skip
        trainer.train()
        adapter = {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()
                   if "lora_" in k and ".ref." not in k}  # fmt: skip
        results[impl] = (trainer, list(trainer.state.log_history), adapter)
    ours = results["csd"][0]
    ref_base = ours.ref_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    policy_base = ours.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert ref_base.weight is policy_base.weight  # the 4-bit base is shared, not copied
    assert_parity(results["csd"], results["trl"])


def test_trl_dpo_script_qlora_with_only_the_imports_swapped(models, tmp_path, monkeypatch):
    """`trl dpo --load_in_4bit --use_peft`: TRL's get_quantization_config / get_peft_config
    feed our trainer; the run saves the adapter and logs what TRL's script logs."""
    model_path, _ = save_tiny("llama", models)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows("standard", 8)))
    logs = {}
    for impl in ("trl", "csd"):
        out = tmp_path / impl
        argv = [
            "dpo.py", "--model_name_or_path", model_path, "--dataset_name", str(data),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--bf16", "false", "--use_cpu", "--max_length", "32",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--gradient_checkpointing", "false", "--load_in_4bit", "--use_peft",
            "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
            "--lora_target_modules", "q_proj", "v_proj", "--save_strategy", "no",
        ]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        if impl == "trl":  # its checkpoint's trainer_state.json holds the log history
            argv[-2:] = ["--save_strategy", "steps", "--save_steps", "2"]
            script = Path(trl.__file__).parent / "scripts" / "dpo.py"
            script = shutil.copy(script, tmp_path / "trl_dpo.py")
        else:
            script = swapped_trl_script(tmp_path)
        runpy.run_path(str(script), run_name="__main__")
        assert (out / "adapter_config.json").exists() and (
            out / "adapter_model.safetensors"
        ).exists()
        assert not (out / "model.safetensors").exists()  # the adapter is what is saved
        if impl == "trl":
            state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
            logs[impl] = state["log_history"]
        else:
            lines = (out / "metrics.jsonl").read_text().splitlines()
            logs[impl] = [json.loads(line) for line in lines]
    assert compare_logs(logs["csd"], logs["trl"]) == []
