"""QLoRA in csd-fast itself: refusals, the reference-cache key, resume, export.

Run: `python -m pytest tests/test_qlora.py -q` (about 20 s on 2 cores). Parity with TRL's
trainer lives in tests/test_qlora_trl.py; QLoRA under torchrun (FSDP2) in
tests/distributed/test_qlora_fsdp.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import TrainerCallback
from trl_helpers import base_kwargs, max_weight_diff, rows, save_tiny, step_logs

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from csd_fast import DPOConfig, DPOTrainer  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")


def lora(**kw):
    kw = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0,
        **kw,
    }
    return peft.LoraConfig(**kw)


def trainer(models, out, quant=NF4, peft_config="lora", callbacks=None, **kw):
    """A csd-fast trainer over the 4-bit tiny Llama loaded by path (`quant` a BitsAndBytesConfig
    kwargs dict, passed as the trainer argument)."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    path, _ = save_tiny("llama", models)
    return DPOTrainer(
        model=path, args=DPOConfig(**base_kwargs(out, **kw)),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        processing_class=AutoTokenizer.from_pretrained(path), callbacks=callbacks,
        quantization_config=BitsAndBytesConfig(**quant) if quant is not None else None,
        peft_config=lora() if peft_config == "lora" else peft_config,
    )  # fmt: skip


def adapter_of(t) -> dict:
    return {k: v.detach().float().clone() for k, v in t.model.state_dict().items() if "lora_" in k}


# ------------------------------------------------------------------------------- refusals
def test_a_quantized_model_without_an_adapter_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match="purely quantized.*peft_config"):
        trainer(models, tmp_path, peft_config=None)


def test_a_quantized_lm_head_is_refused(models, tmp_path):
    """llm_int8_skip_modules without lm_head quantizes the head, which every head path reads
    as a matrix: refused, naming the option."""
    quant = dict(NF4, llm_int8_skip_modules=["q_proj"])
    with pytest.raises(ValueError, match="LM head.*Linear4bit.*llm_int8_skip_modules"):
        trainer(models, tmp_path, quant=quant, peft_config=lora(target_modules=["v_proj"]))


def test_quantization_config_errors_are_trls(models, tmp_path):
    """Both places at once, or a model object: TRL's ValueErrors, raised before any loading."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path, _ = save_tiny("llama", models)
    tok = AutoTokenizer.from_pretrained(path)
    ds = datasets.Dataset.from_list(rows("standard", 4))
    q = BitsAndBytesConfig(**NF4)
    for mod in (trl, __import__("csd_fast")):
        both = mod.DPOConfig(
            **base_kwargs(tmp_path, model_init_kwargs={"quantization_config": NF4})
        )
        with pytest.raises(ValueError, match="both as a trainer argument and in"):
            mod.DPOTrainer(model=path, args=both, train_dataset=ds, processing_class=tok,
                           quantization_config=q, peft_config=lora())  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(path)
        with pytest.raises(ValueError, match="already instantiated"):
            mod.DPOTrainer(model=model, args=mod.DPOConfig(**base_kwargs(tmp_path)),
                           train_dataset=ds, processing_class=tok, quantization_config=q,
                           peft_config=lora())  # fmt: skip


def test_missing_bitsandbytes_is_a_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install 'csd-fast\[qlora\]'"):
        trainer(models, tmp_path)


def test_csd_fast_imports_and_trains_without_bitsandbytes(tmp_path):
    """The import stays lazy: a process where bitsandbytes cannot be imported still imports the
    trainer and builds a full-precision one."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from csd_fast import DPOConfig, DPOTrainer\n"
        "import csd_fast.quantization, csd_fast.models, csd_fast.trainer_reference\n"
        "assert sys.modules['bitsandbytes'] is None\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------------- reference cache key
def test_quantization_key_names_the_whole_config():
    from transformers import BitsAndBytesConfig

    from csd_fast.quantization import quantization_key

    nf4 = quantization_key(None, BitsAndBytesConfig(**NF4))
    assert nf4 == quantization_key(None, dict(NF4))  # a YAML dict and the object agree
    others = [
        dict(NF4, bnb_4bit_quant_type="fp4"),
        dict(NF4, bnb_4bit_compute_dtype="bfloat16"),  # same stored weights, other numerics
        dict(NF4, bnb_4bit_use_double_quant=True),
        {"load_in_8bit": True},
    ]
    keys = {quantization_key(None, BitsAndBytesConfig(**c)) for c in others}
    assert len(keys) == len(others) and nf4 not in keys
    assert quantization_key(None, None) is None


def test_reference_store_tells_a_quantized_reference_from_a_full_precision_one(models, tmp_path):
    """One ref_cache_dir, the same data and LoRA: the 4-bit base's table and the fp32 base's
    are two tables; the second 4-bit run reads its own table back (no rescoring)."""
    store = tmp_path / "store"
    kw = dict(ref_cache_dir=str(store), max_steps=1)
    first = trainer(models, tmp_path / "q1", **kw)
    (table,) = store.glob("ref-*")
    manifest = json.loads((table / "manifest.json").read_text())
    assert json.loads(manifest["components"]["quantization"])["bnb_4bit_quant_type"] == "nf4"
    full = trainer(models, tmp_path / "fp", quant=None, **kw)
    tables = sorted(store.glob("ref-*"))
    assert len(tables) == 2
    fp_manifest = next(json.loads((t / "manifest.json").read_text()) for t in tables if t != table)
    assert "quantization" not in fp_manifest["components"]  # full-precision ids as before
    again = trainer(models, tmp_path / "q2", **kw)
    assert len(list(store.glob("ref-*"))) == 2
    (q_rows,) = first._ref_tables.values()
    (again_rows,) = again._ref_tables.values()
    assert torch.equal(q_rows[1].lookup([0, 1])[0], again_rows[1].lookup([0, 1])[0])
    (fp_rows,) = full._ref_tables.values()
    assert not torch.equal(q_rows[1].lookup([0, 1])[0], fp_rows[1].lookup([0, 1])[0])


# -------------------------------------------------------------------- resume and export
class StopAt(TrainerCallback):
    """Stops training after `step` (as a kill after that checkpoint would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_qlora_resume_is_exact_and_export_merges_into_the_full_precision_base(models, tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = trainer(models, tmp_path / "whole", **kw)
    whole.train()
    cut = trainer(models, tmp_path / "cut", callbacks=[StopAt(2)], **kw)
    cut.train()
    ckpt = tmp_path / "cut" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files  # the adapter is what a QLoRA checkpoint holds
    resumed = trainer(models, tmp_path / "cut", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert max_weight_diff(adapter_of(resumed), adapter_of(whole)) == 0.0

    def steps(t):  # the logged numbers, without wall-clock rates
        timing = ("per_second", "runtime", "step")
        return [{k: v for k, v in h.items() if not any(w in k for w in timing)}
                for h in step_logs(t.state.log_history)]  # fmt: skip

    got, want = steps(resumed), steps(whole)
    assert got[-2:] == want[-2:]  # steps 3 and 4, every metric, to the bit

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from csd_fast.distributed.checkpoint import export_checkpoint

    out = export_checkpoint(tmp_path / "whole" / "checkpoint-4", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # merged into the full-precision base
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(save_tiny("llama", models)[0], dtype=torch.float32)
    adapter = load_file(tmp_path / "whole" / "checkpoint-4" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"].float(), adapter[f"{prefix}.lora_B.weight"].float()
    want_w = base.model.layers[1].self_attn.v_proj.weight + (8 / 4) * b @ a  # W + (alpha/r) BA
    got_w = merged.model.layers[1].self_attn.v_proj.weight
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)
    assert (b @ a).abs().max() > 0  # the adapter moved: the check above could fail


def test_csd_train_qlora_equals_the_python_api(models, tmp_path, capsys):
    """`csd train --model_init_kwargs '{"quantization_config": ...}' --peft_config '{...}'`
    trains the same adapter as DPOTrainer with the same options; without --peft_config the
    quantization config is a user error (exit 2, naming the fix) before any model loads."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig

    from csd_fast.cli import main

    path, _ = save_tiny("llama", models)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows("standard", 8)))
    options = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, max_length=32,
                   bf16=False, use_cpu=True, report_to="none", seed=0)  # fmt: skip
    lora_kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0}
    argv = ["--model_name_or_path", path, "--dataset_name", str(data),
            "--model_init_kwargs", json.dumps({"quantization_config": NF4})]  # fmt: skip
    for k, v in options.items():
        argv += [f"--{k}", str(v)]
    assert main([*argv, "--output_dir", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "--model_init_kwargs: quantization_config (QLoRA)" in err and "--peft_config" in err
    assert not (tmp_path / "bare" / "config.yaml").exists()

    cli_out = tmp_path / "cli"
    argv += ["--output_dir", str(cli_out), "--peft_config", json.dumps(lora_kw)]
    assert main(argv) == 0
    final = cli_out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    api = DPOTrainer(
        model=path, args=DPOConfig(output_dir=str(tmp_path / "api"), on_fully_truncated="error",
                                   **options),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        quantization_config=BitsAndBytesConfig(**NF4), peft_config=lora(**lora_kw),
    )  # fmt: skip
    api.train()
    saved = load_file(final / "adapter_model.safetensors")
    ours = {k.replace(".default", ""): v for k, v in adapter_of(api).items()}
    assert saved.keys() == ours.keys()
    assert max_weight_diff({k: v.float() for k, v in saved.items()}, ours) == 0.0
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    # --peft_config alone: LoRA on the full-precision base
    plain = [a for a in argv if a != json.dumps({"quantization_config": NF4})]
    plain.remove("--model_init_kwargs")
    plain[plain.index(str(cli_out))] = str(tmp_path / "plain")
    assert main(plain) == 0
    plain_saved = load_file(tmp_path / "plain" / "final" / "adapter_model.safetensors")
    assert plain_saved.keys() == saved.keys()
    assert max_weight_diff({k: v.float() for k, v in plain_saved.items()}, ours) > 0


def test_a_pretrained_adapter_over_a_4bit_base_is_its_own_reference_at_step_0(models, tmp_path):
    """A PeftModel whose adapter starts nonzero: the reference is the adapter as the policy
    trains it (bf16), so the first step's rewards are exactly zero (README: where TRL differs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path, _ = save_tiny("llama", models)
    base = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**NF4)
    )
    model = peft.get_peft_model(base, lora(init_lora_weights=False))  # B != 0
    t = DPOTrainer(
        model=model, args=DPOConfig(**base_kwargs(tmp_path, max_steps=2)),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip
    t.train()
    first, second = step_logs(t.state.log_history)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert second["rewards/margins"] != 0.0  # the adapter trained away from its copy


def test_trainable_params_naming_quantized_weights_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match=r"match 4 quantized weight\(s\).*cannot be trained"):
        trainer(models, tmp_path, trainable_params=[r"\.self_attn\.(q|k)_proj"])
    # the adapter's own parameters are fine: only they train
    t = trainer(models, tmp_path / "ok", trainable_params=[r"lora_A"])
    assert t.trainable and all("lora_A" in n for n in t.trainable)


def test_resuming_over_another_quantization_is_refused(models, tmp_path):
    """The checkpoint records its base's quantization: the adapter resumed over FP4 (or over the
    full-precision base) would train another model, so resume names the change and refuses."""
    from csd_fast.resume import ResumeMismatch

    kw = dict(max_steps=2, save_strategy="steps", save_steps=1)
    trainer(models, tmp_path, callbacks=[StopAt(1)], **kw).train()
    for quant in (dict(NF4, bnb_4bit_quant_type="fp4"), None):
        with pytest.raises(ResumeMismatch, match="quantization_config"):
            trainer(models, tmp_path, quant=quant, **kw).train(resume_from_checkpoint=True)
    resumed = trainer(models, tmp_path, **kw)  # the same quantization resumes
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


def test_a_peftmodel_reference_keeps_its_full_precision_weights_when_they_train(models, tmp_path):
    """The reference of a PeftModel over a 4-bit base shares only the quantized weights: a norm
    that trainable_params switches on trains in the policy and stays put in the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path, _ = save_tiny("llama", models)
    base = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**NF4)
    )
    norm = "model.norm.weight"
    args = DPOConfig(**base_kwargs(tmp_path, max_steps=2, trainable_params=["lora_", "norm"]))
    t = DPOTrainer(
        model=peft.get_peft_model(base, lora()), args=args,
        processing_class=AutoTokenizer.from_pretrained(path),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
    )  # fmt: skip
    ref_norm = dict(t.ref_model.named_parameters())[f"base_model.model.{norm}"]
    before = ref_norm.detach().clone()
    t.train()
    policy_norm = dict(t.model.named_parameters())[f"base_model.model.{norm}"]
    assert not torch.equal(policy_norm.detach().float(), before.float())  # it trained
    torch.testing.assert_close(ref_norm.detach(), before, rtol=0, atol=0)  # the reference did not


def test_base_weights_trained_under_an_adapters_off_reference_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="adapters disabled, which would move"):
        trainer(models, tmp_path, quant=None, trainable_params=["lora_", r"\.norm\."])
    trainer(models, tmp_path / "ok", quant=None, trainable_params=["lora_", r"\.norm\."],
            precompute_ref_log_probs=True)  # a table from before training: allowed  # fmt: skip


def test_other_quantization_methods_and_saved_quantized_checkpoints(models, tmp_path):
    from types import SimpleNamespace

    from csd_fast.quantization import bnb_config, requested_config

    with pytest.raises(NotImplementedError, match="gptq"):
        bnb_config(SimpleNamespace(quant_method="gptq"))
    with pytest.raises(NotImplementedError, match="awq"):
        bnb_config({"quant_method": "awq"})
    saved = tmp_path / "bnb-4bit"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    args = DPOConfig(output_dir=str(tmp_path / "o"))
    assert requested_config(args, None, str(saved)) == {"load_in_4bit": True}  # torchrun refuses
    args.model_init_kwargs = {"quantization_config": {"load_in_8bit": True}}
    assert requested_config(args, None, torch.nn.Linear(2, 2)) is None  # TRL ignores them here


def test_a_reference_loaded_lazily_by_path_is_pinned_to_training_mode(models):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from csd_fast.models import prepare_reference

    path, _ = save_tiny("llama", models)
    ref = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    prepare_reference(ref, DPOConfig(output_dir="x")).eval()
    layers = [m for m in ref.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(m.training for m in layers)  # still on their training path


def test_resuming_under_another_adapter_configuration_is_refused(models, tmp_path):
    """A checkpoint's adapter loads non-strictly, so another lora_alpha or target set would
    train another model: resume names peft_config and refuses; the same adapter resumes."""
    from csd_fast.resume import ResumeMismatch

    kw = dict(max_steps=2, save_strategy="steps", save_steps=1, quant=None)
    trainer(models, tmp_path, callbacks=[StopAt(1)], **kw).train()
    for other in (lora(lora_alpha=16), lora(target_modules=["q_proj", "k_proj"])):
        with pytest.raises(ResumeMismatch, match="peft_config"):
            trainer(models, tmp_path, peft_config=other, **kw).train(resume_from_checkpoint=True)
    trainer(models, tmp_path, **kw).train(resume_from_checkpoint=True)
