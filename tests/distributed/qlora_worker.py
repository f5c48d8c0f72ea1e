"""QLoRA scenarios under FSDP2: a torchrun worker (2 ranks x b) and the 1-process builder (1 x 2b).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/qlora_worker.py OUT

The test (tests/distributed/test_qlora_fsdp.py) saves the tiny Llama to OUT/models/llama first,
so no two ranks write it. Every rank then loads and quantizes that same base itself; each
scenario trains on two ranks and rank 0 saves OUT/<name>.pt: the log history, the gathered
trainable weights and each rank's parameter bytes (`parameter_bytes`). The test builds the same
scenario on one process with the global batch and compares. Also run here: the `nf4` run cut
after its step-2 checkpoint and resumed on the same two ranks (`resume2`), and the NF4 run with the
weights all kept out of FSDP2 (`unreduced`: no gradient reduced, a planted bug).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GLOBAL_BATCH = 4
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")
FP4 = dict(NF4, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
INT8 = dict(load_in_8bit=True)
# fp32_adapters: the adapters stay fp32 (TRL's QLoRA casts them to bf16, csd-fast too): the
# run then has fp32 numbers only, so 2 ranks must equal 1 process to fp32 round-off
SCENARIOS = {
    # 4 steps over two epochs, eval at step 2 and 4, checkpoints at steps 2 and 4
    "nf4": dict(quant=NF4, fp32_adapters=True, padding_free=True, max_steps=4,
                eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2),
    "int8": dict(quant=INT8, fp32_adapters=True, max_steps=3, save_strategy="steps",
                 save_steps=2),  # padded batches
    # TRL's bf16 adapters over double-quantized FP4 packed in fp32 storage, checkpointed
    # activations, a reference table from before training
    "fp4_bf16_ckpt_precompute": dict(quant=dict(FP4, bnb_4bit_quant_storage="float32"),
                                     padding_free=True, max_steps=3,
                                     gradient_checkpointing=True, precompute_ref_log_probs=True,
                                     learning_rate=1e-2),
    # a PeftModel passed in (DoRA, a nonzero adapter): its reference is a frozen copy of the
    # adapter over the same, shared 4-bit base, sharded as a second model; bf16 A/B with the
    # fp32 DoRA magnitudes in the same FSDP2 units
    "peftmodel_dora": dict(quant=NF4, peft_model=True, padding_free=True, max_steps=3,
                           learning_rate=1e-2),
}  # fmt: skip


def model_path(root: Path) -> str:
    from trl_helpers import save_tiny

    return save_tiny("llama", Path(root) / "models")[0]


def build_trainer(name: str, world: int, out: Path, root: Path, callbacks=None):
    """The scenario's trainer on `world` ranks (per-device batch GLOBAL_BATCH // world); the
    base model is root/models/llama, loaded by path with the scenario's quantization."""
    from unittest import mock

    spec = dict(SCENARIOS[name])
    quant = spec.pop("quant")
    keep = mock.patch("csd_fast.quantization.adapters_to_bf16", lambda model: None)
    with keep if spec.pop("fp32_adapters", False) else contextlib.nullcontext():
        return _trainer(spec, quant, world, out, root, callbacks)


def _trainer(spec, quant, world, out, root, callbacks):
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl_helpers import base_kwargs, rows

    from csd_fast import DPOConfig, DPOTrainer

    peft_model = spec.pop("peft_model", False)
    batch = GLOBAL_BATCH // world
    kw = base_kwargs(out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                     **spec)  # fmt: skip
    path = model_path(root)
    data = rows("standard", 8)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    model, extra = path, {"quantization_config": BitsAndBytesConfig(**quant), "peft_config": lora}
    if peft_model:  # the same on every rank: the seed is fixed before the adapter is made
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra_q(quant))
        torch.manual_seed(0)
        lora.use_dora, lora.init_lora_weights = True, False
        model, extra = get_peft_model(base, lora), {}
    return DPOTrainer(
        model=model, args=DPOConfig(**kw), train_dataset=datasets.Dataset.from_list(data),
        eval_dataset=datasets.Dataset.from_list(data[:5]) if "eval_steps" in spec else None,
        processing_class=AutoTokenizer.from_pretrained(path), callbacks=callbacks, **extra,
    )  # fmt: skip


def extra_q(quant: dict) -> dict:
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(**quant)}


def history(trainer) -> list[dict]:
    """The logged values (no wall-clock rates): equal on every world size."""
    timing = ("second", "runtime")
    return [{k: v for k, v in h.items() if not any(t in k for t in timing)}
            for h in trainer.state.log_history]  # fmt: skip


def trainable_weights(trainer) -> dict[str, torch.Tensor]:
    """Every trainable weight, whole (a collective under FSDP: all ranks call it)."""
    from csd_fast.distributed.fsdp import full_tensor

    return {n: full_tensor(p.detach()).float().cpu()
            for n, p in trainer.model.named_parameters() if p.requires_grad}  # fmt: skip


def parameter_bytes(model) -> dict[str, int]:
    """This rank's parameter memory: `packed` (bnb's quantized weights: its shards of the
    sharded ones, whole ones whole), `quant_state` (their absmax blocks, code tables and row
    scales, always whole), `full_precision` (its shards of everything else) and
    `full_precision_whole` (the same at full size)."""
    from torch.distributed.tensor import DTensor

    from csd_fast.quantization import bnb_layers

    def nbytes(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    out = dict.fromkeys(("packed", "quant_state", "full_precision", "full_precision_whole"), 0)
    packed = set()
    for _, layer in bnb_layers(model):
        packed.add(id(layer.weight))
        out["packed"] += nbytes(layer.weight)
        state = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
        scale = getattr(layer.weight, "SCB", None)  # 8-bit row scales, or where bnb moved them
        extras = [
            scale if scale is not None else getattr(getattr(layer, "state", None), "SCB", None)
        ]
        if state is not None:
            extras += [state.absmax, state.code]
            if state.nested:
                extras += [state.state2.absmax, state.state2.code]
        out["quant_state"] += sum(nbytes(t) for t in extras if t is not None)
    for p in model.parameters():
        if id(p) not in packed:
            out["full_precision"] += nbytes(p)
            out["full_precision_whole"] += p.numel() * p.element_size()  # the global shape
    return out


def result(trainer) -> dict:
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"history": history(trainer), "weights": trainable_weights(trainer),
            "bytes": parameter_bytes(trainer.model), "dtypes": dtypes}  # fmt: skip


def main(root: Path) -> None:
    from scenarios import StopAt

    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name in SCENARIOS:
        trainer = build_trainer(name, world, root / name, root)
        trainer.train()
        res = result(trainer)
        res["bytes"] = trainer.dist.all_gather_objects(res["bytes"])  # every rank's
        results[name] = res
    # a bug the parity tests must catch: every weight left out of FSDP2 (ignored_params), so
    # each rank trains its own copy on its half of the batch (no gradient is reduced)
    from unittest import mock

    every = mock.patch("csd_fast.quantization.quantized_params",
                       lambda module, *_: set(module.parameters()))  # fmt: skip
    with every:
        unreduced = build_trainer("nf4", world, root / "unreduced", root)
    unreduced.train()
    results["unreduced"] = result(unreduced)
    cut = build_trainer("nf4", world, root / "resume2", root, callbacks=[StopAt(2)])
    cut.train()
    resumed = build_trainer("nf4", world, root / "resume2", root)
    resumed.train(resume_from_checkpoint=True)
    results["resume2"] = result(resumed)
    if resumed.dist.is_main:
        for name, res in results.items():
            torch.save(res, root / f"{name}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
