"""A DeepSpeed ZeRO config (`DPOConfig.deepspeed`), run as csd-fast's own FSDP2.

    args = DPOConfig(output_dir="out", deepspeed="ds_zero3.json")   # a TRL user's config
    args.fsdp_config    # {'reshard_after_forward': True, 'cpu_offload': True}

DeepSpeed's engine is not used: ZeRO and FSDP shard the same state and give the same training
(the same gradients and AdamW steps), so the stages map onto FSDP2's layouts:

    stage 3                 full_shard       params, grads and optimizer state sharded
    stage 1, 2              shard_grad_op    params kept gathered between forward and backward
    stage 0                 no_shard         whole copies, gradients all-reduced
    offload_param / offload_optimizer {"device": "cpu"}   cpu_offload

The training values (batch sizes, accumulation, clipping, AdamW, the schedule, bf16 / fp16)
come from DPOConfig, as in transformers' DeepSpeed integration: a value in the file must be
"auto" or agree with DPOConfig, else a ValueError lists every mismatch. Keys that tune
DeepSpeed's own engine (bucket sizes, overlap, logging) are accepted and have no counterpart to
set; anything csd-fast cannot give (NVMe offload, other optimizers, DeepSpeed's activation
partitioning) raises NotImplementedError naming the key.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

# ZeRO stage -> csd-fast fsdp_config keys
STAGES = {
    0: {"dp_replicate_size": "all"},
    1: {"reshard_after_forward": False},
    2: {"reshard_after_forward": False},
    3: {"reshard_after_forward": True},
}
# keys that configure DeepSpeed's engine itself: FSDP2 sizes its buckets and streams on its own
ENGINE_ONLY = {
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comms_logger", "dump_state", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "data_types", "checkpoint", "memory_breakdown",
}  # fmt: skip
ZERO_TUNING = {
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
    "allgather_partitions", "reduce_scatter", "round_robin_gradients", "sub_group_size",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "load_from_fp32_weights",
    "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
    "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1", "cpu_offload",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
    "mics_shard_size", "memory_efficient_linear",
}  # fmt: skip
_SCHEDULES = {"WarmupDecayLR": "linear", "WarmupLR": "constant_with_warmup",
              "WarmupCosineLR": "cosine"}  # fmt: skip


def read_deepspeed(value) -> dict | None:
    """The config as a dict: a dict, a JSON string, or a JSON file's path (transformers' forms)."""
    if value is None or value == "" or isinstance(value, dict):
        return value or None
    path = Path(str(value))
    if not path.is_file():
        raise ValueError(f"deepspeed: {value!r} is neither a dict nor a JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed: {path} is not valid JSON: {e}") from e


def deepspeed_fsdp_config(args) -> dict:
    """csd-fast fsdp_config keys for `args.deepspeed` (checked against `args`); {} if unset."""
    ds = read_deepspeed(args.deepspeed)
    if not ds:
        return {}
    mismatches: list[str] = []
    expect = _Expect(mismatches)
    fsdp = dict(_zero(ds.get("zero_optimization") or {}))
    for key, value in ds.items():
        if key == "zero_optimization" or key in ENGINE_ONLY:
            continue
        if key == "train_micro_batch_size_per_gpu":
            expect(key, value, args.per_device_train_batch_size)
        elif key == "gradient_accumulation_steps":
            expect(key, value, args.gradient_accumulation_steps)
        elif key == "gradient_clipping":
            expect(key, value, args.max_grad_norm)
        elif key == "train_batch_size":
            pass  # per device x accumulation x world: checked by DeepSpeed at launch; the two above
        elif key in ("bf16", "fp16"):
            enabled = (value or {}).get("enabled", "auto")
            expect(f"{key}.enabled", enabled, bool(getattr(args, key)))
        elif key == "optimizer":
            _optimizer(value or {}, args, expect)
        elif key == "scheduler":
            _scheduler(value or {}, args, expect)
        elif key == "activation_checkpointing":
            if any(bool(v) for k, v in (value or {}).items() if k != "number_checkpoints"):
                raise NotImplementedError(
                    "deepspeed.activation_checkpointing (DeepSpeed's partitioned activations) is "
                    "not supported: gradient_checkpointing recomputes each layer instead"
                )
        else:
            raise ValueError(f"deepspeed: unknown key {key!r}")
    if mismatches:
        raise ValueError(
            'deepspeed config values that disagree with DPOConfig (set them to "auto" or '
            "to the same value): " + "; ".join(mismatches)
        )
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    warnings.warn(
        f"deepspeed: ZeRO stage {stage} runs as csd-fast's FSDP2 ({fsdp}); DeepSpeed's own "
        "engine is not used (the same training; see csd_fast/distributed/deepspeed_config.py)",
        UserWarning,
        stacklevel=4,
    )
    return fsdp


def _zero(zero: dict) -> dict:
    stage = zero.get("stage", 0)
    if stage not in STAGES:
        raise ValueError(f"deepspeed.zero_optimization.stage={stage!r}: ZeRO stages are 0-3")
    out = dict(STAGES[stage])
    for key, value in zero.items():
        if key == "stage" or key in ZERO_TUNING:
            continue
        if key in ("offload_optimizer", "offload_param"):
            device = (value or {}).get("device", "none")
            if device == "cpu":
                out["cpu_offload"] = True  # FSDP2 offloads parameters, grads and the AdamW step
            elif device == "nvme":
                raise NotImplementedError(f"deepspeed.zero_optimization.{key}: NVMe offload is "
                                          "not supported (device 'cpu' is)")  # fmt: skip
            elif device not in ("none", None):
                raise ValueError(f"deepspeed.zero_optimization.{key}.device={device!r}")
        else:
            raise ValueError(f"deepspeed.zero_optimization: unknown key {key!r}")
    return out


class _Expect:
    """Collects the file's values that are neither "auto" nor DPOConfig's."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = mismatches

    def __call__(self, name: str, value, want) -> None:
        if value == "auto":
            return
        same = value == want
        if isinstance(want, float | int) and isinstance(value, float | int):
            same = abs(float(value) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
        if not same:
            self.mismatches.append(f"{name}={value!r} (DPOConfig: {want!r})")


def _optimizer(opt: dict, args, expect: _Expect) -> None:
    kind = str(opt.get("type", "AdamW"))
    params = dict(opt.get("params") or {})
    if kind.lower() not in ("adamw", "adam") or params.pop("adam_w_mode", True) is not True:
        raise NotImplementedError(
            f"deepspeed.optimizer.type={kind!r}: csd-fast trains with AdamW (set optim / "
            "learning_rate in DPOConfig, or 'auto' here)"
        )
    params.pop("torch_adam", None)  # which AdamW implementation, not its values
    checks = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
              "eps": args.adam_epsilon, "betas": [args.adam_beta1, args.adam_beta2]}  # fmt: skip
    for key, value in params.items():
        if key not in checks:
            raise ValueError(f"deepspeed.optimizer.params: unknown key {key!r}")
        if key == "betas" and value != "auto":
            for i, (got, want) in enumerate(zip(value, checks[key], strict=True)):
                expect(f"optimizer.params.betas[{i}]", got, want)
        else:
            expect(f"optimizer.params.{key}", value, checks[key])


def _scheduler(sched: dict, args, expect: _Expect) -> None:
    kind = str(sched.get("type", ""))
    if kind not in _SCHEDULES:
        raise NotImplementedError(
            f"deepspeed.scheduler.type={kind!r}: csd-fast takes the schedule from DPOConfig "
            f"(lr_scheduler_type); DeepSpeed's {', '.join(_SCHEDULES)} map onto it"
        )
    expect("scheduler.type", _SCHEDULES[kind], args.lr_scheduler_type)
    params = dict(sched.get("params") or {})
    checks = {"warmup_max_lr": args.learning_rate, "warmup_min_lr": 0,
              "warmup_num_steps": args.warmup_steps,
              "total_num_steps": args.max_steps if args.max_steps > 0 else "auto",
              "warmup_type": "linear"}  # fmt: skip
    for key, value in params.items():
        if key not in checks:
            raise ValueError(f"deepspeed.scheduler.params: unknown key {key!r}")
        if checks[key] != "auto":
            expect(f"scheduler.params.{key}", value, checks[key])
