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

import os
import warnings

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
    "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
    "mics_shard_size", "memory_efficient_linear",
}  # fmt: skip
_SCHEDULES = {"WarmupDecayLR": "linear", "WarmupLR": "constant_with_warmup",
              "WarmupCosineLR": "cosine"}  # fmt: skip


def read_deepspeed(value) -> dict | None:
    """The config as a dict: a dict, a JSON string, or a JSON file's path (transformers' forms)."""
    from csd_fast.distributed.hf_options import read_json_option

    if value is None or value == "" or isinstance(value, dict):
        return value or None
    return read_json_option("deepspeed", value)


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
        elif key == "train_batch_size":  # per device x accumulation x ranks, as DeepSpeed checks
            world = int(os.environ.get("WORLD_SIZE", "1"))
            want = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
            expect(key, value, want)
        elif key in ("bf16", "fp16"):
            block = value or {}
            expect(f"{key}.enabled", block.get("enabled", False), bool(getattr(args, key)))
            if key == "fp16" and block.get("enabled") in (True, "auto") and args.fp16:
                _fp16_scaler_keys(block)
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
        if key == "cpu_offload":  # the old spelling of offload_optimizer {"device": "cpu"}
            if value:
                out["cpu_offload"] = True
        elif key in ("offload_optimizer", "offload_param"):
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


# DeepSpeed's dynamic loss scaler, and what torch's GradScaler (which fp16 uses) can match
_FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip


def _fp16_scaler_keys(block: dict) -> None:
    if block.get("loss_scale", 0) not in (0, "auto"):
        raise NotImplementedError(
            f"deepspeed.fp16.loss_scale={block['loss_scale']}: a static loss scale is not "
            "supported (0, dynamic scaling, is)"
        )
    unknown = set(block) - {"enabled", "auto_cast", *_FP16_DEFAULTS}
    if unknown:
        raise ValueError(f"deepspeed.fp16: unknown key(s) {sorted(unknown)}")


def scaler_options(args) -> dict:
    """GradScaler arguments from a DeepSpeed fp16 block: its initial scale and growth window
    (DeepSpeed's defaults where the file is silent). Its hysteresis (how many overflows before
    the scale drops) and minimum scale have no GradScaler counterpart: a warning says so."""
    ds = read_deepspeed(getattr(args, "deepspeed", None)) or {}
    block = ds.get("fp16") or {}
    if not block:
        return {}

    def value(key):  # the file's value, or DeepSpeed's default where it is left out or "auto"
        given = block.get(key, "auto")
        return _FP16_DEFAULTS[key] if given == "auto" else given

    if (value("hysteresis"), value("min_loss_scale")) != (1, 1):
        warnings.warn(
            f"deepspeed.fp16 hysteresis={value('hysteresis')}, min_loss_scale="
            f"{value('min_loss_scale')}: torch's GradScaler halves the scale at every overflow "
            "and has no floor (hysteresis 1, no minimum)",
            UserWarning,
            stacklevel=3,
        )
    return {"init_scale": 2.0 ** value("initial_scale_power"),
            "growth_interval": int(value("loss_scale_window"))}  # fmt: skip


# DeepSpeed's defaults for the schedule keys a file leaves out (deepspeed/runtime/lr_schedules)
_SCHEDULE_DEFAULTS = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                      "warmup_type": "log", "warmup_min_ratio": 0.0,
                      "cos_min_ratio": 0.0001}  # fmt: skip


def _scheduler(sched: dict, args, expect: _Expect) -> None:
    kind = str(sched.get("type", ""))
    if kind not in _SCHEDULES:
        raise NotImplementedError(
            f"deepspeed.scheduler.type={kind!r}: csd-fast takes the schedule from DPOConfig "
            f"(lr_scheduler_type); DeepSpeed's {', '.join(_SCHEDULES)} map onto it"
        )
    expect("scheduler.type", _SCHEDULES[kind], args.lr_scheduler_type)
    params = dict(sched.get("params") or {})
    # csd-fast's schedules: linear warmup from 0 to learning_rate, then flat / linear / cosine
    # to 0; what DeepSpeed would do with a key the file leaves out is its default
    checks = {"warmup_max_lr": args.learning_rate, "warmup_min_lr": 0,
              "warmup_num_steps": args.warmup_steps,
              "total_num_steps": args.max_steps if args.max_steps > 0 else "auto",
              "warmup_type": "linear", "warmup_min_ratio": 0, "cos_min_ratio": 0}  # fmt: skip
    unknown = set(params) - set(checks)
    if unknown:
        raise ValueError(f"deepspeed.scheduler.params: unknown key(s) {sorted(unknown)}")
    used = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"}
    if kind == "WarmupDecayLR":
        used.add("total_num_steps")
    if kind == "WarmupCosineLR":
        used = {"warmup_min_ratio", "warmup_num_steps", "warmup_type", "cos_min_ratio",
                "total_num_steps"}  # fmt: skip
    steps = params.get("warmup_num_steps", _SCHEDULE_DEFAULTS["warmup_num_steps"])
    if (args.warmup_steps if steps == "auto" else steps) == 0:
        used.discard("warmup_type")  # no warmup: its shape does not matter
    for key in sorted(used):
        value = params.get(key, _SCHEDULE_DEFAULTS.get(key, "auto"))
        if checks[key] != "auto":
            expect(f"scheduler.params.{key}", value, checks[key])
