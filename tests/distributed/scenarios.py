"""Training scenarios shared by the torchrun worker (2 ranks x b) and the tests (1 rank x 2b).

Each scenario is DPOConfig overrides plus model options; `build_trainer(name, world, out)` gives
the trainer of one side, with the per-device batch scaled so both sides see the same pairs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from data_helpers import tiny_tokenizer  # noqa: E402, F401  (re-exported for tests)
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

GLOBAL_BATCH = 4
ROWS = [
    {"prompt": f"The cat sat {i % 3}", "chosen": " on the mat.", "rejected": " is happy."}
    for i in range(9)
] + [
    {"prompt": f"Hello world {i % 2}", "chosen": " the dog runs now.", "rejected": " the sat."}
    for i in range(9)
]  # 18 pairs: the last global batch of an epoch (2 pairs) splits 1 + 1 over two ranks
EVAL_ROWS = ROWS[:5]  # 5 eval pairs: batches of 2 + 2, then 1 + none (a stand-in)

SCENARIOS = {
    # 4 steps across the epoch end, eval every 2 steps, checkpoints at 2 and 4
    "packed": dict(padding_free=True, max_steps=6, eval_strategy="steps", eval_steps=3,
                   save_strategy="steps", save_steps=3),
    "padded": dict(max_steps=3),
    "prefix_fused": dict(prefix_sharing=True, fused=True, max_steps=3),
    "lora": dict(padding_free=True, max_steps=3, learning_rate=1e-2, save_strategy="steps",
                 save_steps=3),  # checkpoint-3: what csd export merges
    "attention_only": dict(padding_free=True, max_steps=3, trainable_params=[r"\.self_attn\."]),
    "ckpt_tied_ga": dict(padding_free=True, max_steps=3, gradient_checkpointing=True,
                         gradient_accumulation_steps=2),
    "precompute": dict(padding_free=True, max_steps=3, precompute_ref_log_probs=True),
    # policy and reference given by path: on two ranks only rank 0 reads them (the others
    # build them on meta and get rank 0's weights after sharding); a reference of its own,
    # and a tied policy with LoRA (its frozen copy the reference)
    # the reference store (ref_cache_dir) under FSDP: each rank scores and writes its shards
    "ref_store": dict(padding_free=True, max_steps=3, ref_cache_shard_size=4),  # 5 shards
    "by_path": dict(padding_free=True, max_steps=3),
    "by_path_lora_tied": dict(padding_free=True, max_steps=3, learning_rate=1e-2,
                              save_strategy="steps", save_steps=3),
    # a vision-language model (tiny LLaVA) on image rows: padded batches through its processor
    "vision": dict(max_steps=3),
    # fp16's loss scaling (the CPU's GradScaler, see OverflowAtStep2): an inf in one rank's
    # gradient shard must make every rank skip that step
    "fp16_overflow": dict(padding_free=True, max_steps=3),
    # an optimizer transformers builds (torch's SGD with optim_args) stepping DTensor shards
    "sgd_momentum": dict(padding_free=True, max_steps=3, optim="sgd", learning_rate=0.1,
                         optim_args="momentum=0.9"),
    # train and eval sets as streams (IterableDataset): every rank reads the whole stream and
    # keeps its share; 5 steps cross the end of the stream (its last global batch of 1 pair is
    # 1 + a stand-in), and the eval stream's last batch too
    "stream": dict(padding_free=True, max_steps=5, eval_strategy="steps", eval_steps=2),
    # ipo on the fused kernel with keep_end cutting one eval prompt away whole (FUSED_EVAL_ROWS):
    # that batch takes the torch loss on rank 0 only, the other rank the kernel; both must
    # reshard after the no-grad pass or the next forward's collectives differ
    "fused_ipo_eval": dict(fused=True, loss_type="ipo", truncation_mode="keep_end",
                           max_length=20, max_steps=3, eval_strategy="steps", eval_steps=1),
    # compute_metrics on the logits of every rank's rows (gathered), a plateau schedule on it
    "compute_metrics": dict(max_steps=3, eval_strategy="steps", eval_steps=1,
                            lr_scheduler_type="reduce_lr_on_plateau", metric_for_best_model="rows",
                            lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
}  # fmt: skip


def eval_row_metrics(prediction) -> dict:
    """How many rows compute_metrics saw, and an order-free mean over them (position 0 is a
    real token in every row)."""
    logits = prediction.predictions
    return {"rows": float(logits.shape[0]), "first_logit": float(logits[:, 0, :].mean())}


# pair 0's chosen fills max_length=20 by itself; the eval deal puts it on rank 0 (rows 0 and 2)
FUSED_EVAL_ROWS = [
    {**ROWS[0], "chosen": " the dog runs now the cat sat on the mat the dog runs now."},
    *ROWS[1:4],
]
# run on 4 ranks as 2 nodes x 2 (tests/distributed/test_hsdp.py), each against 1 rank x 4b
HSDP_SCENARIOS = {
    # hybrid_shard: shard within a node, replicate across the 2 nodes (mesh 2 x 2)
    "hybrid": dict(
        padding_free=True,
        max_steps=6,
        fsdp="hybrid_shard auto_wrap",
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
    ),
    "no_shard": dict(max_steps=3, fsdp="no_shard"),  # mesh 4 x 1: whole copies, all-reduce
    # accelerate's and transformers' spellings: a 2 x 2 mesh from ParallelismConfig, the
    # global batch split over the ranks, transformers' fsdp_config keys; sync_module_states
    # makes rank 0's weights everyone's (each rank builds its model with its own seed)
    "accelerate": dict(
        padding_free=True,
        max_steps=3,
        per_device_train_batch_size=GLOBAL_BATCH,
        per_device_eval_batch_size=GLOBAL_BATCH,
        accelerator_config={"split_batches": True},
        fsdp_config={
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_activation_checkpointing": True,
            "fsdp_sync_module_states": True,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
        },
    ),
    # a DeepSpeed ZeRO-2 config in transformers' "auto" style: FSDP2 shard_grad_op
    "deepspeed": dict(
        padding_free=True,
        max_steps=3,
        deepspeed={
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
            },
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"},
            },
        },
    ),
}
BY_PATH = {"by_path", "by_path_lora_tied"}
# the packed run with checkpoints written in the background (run by the worker, not 1-rank)
ASYNC = dict(SCENARIOS["packed"], fsdp_config={"async_checkpoint": True})
TIED = {"ckpt_tied_ga", "by_path_lora_tied"}


def tiny_model(tok, tied: bool = False, seed: int = 0, arch: str = "llama"):
    """A 2-layer Llama; arch="qwen2": a Qwen2 (q/k/v biases) with 4 heads / 2 key-value heads,
    what tensor parallelism splits (tests/distributed/test_tensor_parallel.py)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    width = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=2) if arch == "llama" else dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    config = config_cls(
        vocab_size=len(tok), num_hidden_layers=2, head_dim=16, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=tied, **width,
    )  # fmt: skip
    return model_cls(config)


class OverflowAtStep2(torch.amp.GradScaler):
    """fp16 loss scaling on the CPU (fp16=True makes one on GPUs only) where step 2 overflows
    in one place only: the first gradient element of the last rank's shards turns inf just
    before the scaler checks them, as an fp16 overflow in that shard would."""

    def __init__(self, rank: int, world: int):
        super().__init__("cpu", init_scale=2.0**10)
        self.poison, self.calls = rank == world - 1, 0

    def unscale_(self, optimizer):
        self.calls += 1
        if self.calls == 2 and self.poison:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    if local is not None and local.numel():
                        local.view(-1)[0] = float("inf")
                        return super().unscale_(optimizer)
        return super().unscale_(optimizer)


class OutOfMemoryOnLastRank(TrainerCallback):
    """The last rank runs out of memory (simulated: the error CUDA raises) at the second step
    (after the first one's log) while its batch has more than one pair."""

    def on_step_begin(self, args, state, control, **kwargs):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        last = int(os.environ.get("RANK", "0")) == world - 1
        if last and state.global_step == 1 and args.per_device_train_batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return control


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def build_trainer(name: str, world: int, out, callbacks=None, **overrides):
    from csd_fast import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    train = overrides.pop("train_dataset", ROWS)
    kw = dict(
        output_dir=str(out), per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=GLOBAL_BATCH // world, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", bf16=False, report_to="none", disable_tqdm=True, seed=0,
        gradient_checkpointing=False, use_cpu=True,
    )  # fmt: skip
    kw.update(ASYNC if name == "packed_async" else {**SCENARIOS, **HSDP_SCENARIOS}[name])
    if name == "accelerate":
        from accelerate import ParallelismConfig

        if world > 1:  # one process: no mesh to shape
            kw["parallelism_config"] = ParallelismConfig(dp_replicate_size=2,
                                                         dp_shard_size=world // 2)  # fmt: skip
    if name == "ref_store":
        kw["ref_cache_dir"] = str(Path(out) / "refstore")
    kw.update(overrides)
    peft_config = None
    if name in ("lora", "by_path_lora_tied"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    evalset = EVAL_ROWS if kw.get("eval_strategy") == "steps" else None
    if name == "fused_ipo_eval":
        evalset = FUSED_EVAL_ROWS
    if name == "stream" and train is ROWS:
        import datasets

        # a seeded shuffle: every process draws the same order (an unseeded one is refused)
        train = (
            datasets.Dataset.from_list(ROWS).to_iterable_dataset().shuffle(seed=3, buffer_size=8)
        )
        evalset = datasets.Dataset.from_list(EVAL_ROWS).to_iterable_dataset()
    if name == "vision":
        return _vision_trainer(DPOConfig(**kw), callbacks)
    name = "packed" if name == "packed_async" else name
    seed = int(os.environ.get("RANK", "0")) if name == "accelerate" else 0
    model, ref = tiny_model(tok, tied=name in TIED, seed=seed), None
    if name in BY_PATH:
        model, ref = by_path_models(Path(out).parent, name)
    trainer = DPOTrainer(
        model, ref_model=ref, args=DPOConfig(**kw), train_dataset=train, eval_dataset=evalset,
        processing_class=tok, peft_config=peft_config, callbacks=callbacks,
        compute_metrics=eval_row_metrics if name == "compute_metrics" else None,
    )  # fmt: skip
    if name == "fp16_overflow":
        trainer.grad_scaler = OverflowAtStep2(trainer.dist.rank, world)
    return trainer


def _vision_trainer(args, callbacks):
    import datasets
    from vision_helpers import tiny_vlm, vision_rows

    from csd_fast import DPOTrainer

    model, processor = tiny_vlm("llava")
    rows = datasets.Dataset.from_list(vision_rows(len(ROWS)))
    return DPOTrainer(model, args=args, train_dataset=rows, processing_class=processor,
                      callbacks=callbacks)  # fmt: skip


def by_path_models(root: Path, name: str) -> tuple[str, str | None]:
    """(policy path, reference path or None) of a by-path scenario under root/models, saved
    once; the two-rank test saves them before torchrun starts, so no two ranks write them."""
    tok = tiny_tokenizer()
    paths = []
    models = [("", tiny_model(tok, tied=name in TIED))]
    if name == "by_path":  # a reference of its own, also by path
        models.append(("-ref", tiny_model(tok, seed=1)))
    for suffix, model in models:
        path = root / "models" / f"{name}{suffix}"
        if not path.exists():
            model.save_pretrained(path)
            tok.save_pretrained(path)
        paths.append(str(path))
    return paths[0], (paths[1] if len(paths) > 1 else None)


def history(trainer) -> list[dict]:
    """Logged values that must match across world sizes (no timings)."""
    skip = ("second", "runtime")
    return [
        {k: v for k, v in h.items() if not any(s in k for s in skip)}
        for h in trainer.state.log_history
    ]


def weights(trainer) -> dict[str, torch.Tensor]:
    """Full (gathered) weights on every rank; a collective under FSDP."""
    from csd_fast.distributed.fsdp import full_state_dict

    return full_state_dict(trainer.model)
