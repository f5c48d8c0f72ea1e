"""`DPOConfig`: TRL 1.16's DPOConfig fields and defaults, as a plain dataclass.

    from csd_fast import DPOConfig            # instead of `from trl import DPOConfig`
    args = DPOConfig(output_dir="out", beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1, 1])

Every field of `trl.DPOConfig` 1.16 (its own and the `transformers.TrainingArguments` ones it
inherits) is accepted with TRL's default, so a script written for TRL runs unchanged. We do not
subclass TrainingArguments: its `__post_init__` sets up accelerate and devices, which this
engine does not want at config time (and the CLI's `--help` must stay cheap).

Two kinds of inherited fields:
  * used by the engine (learning_rate, warmup, batch sizes, logging/eval/save, FSDP, ...);
    transformers' and accelerate's distributed options (fsdp, fsdp_config, parallelism_config,
    accelerator_config, deepspeed) are read as csd-fast's FSDP2 options
    (csd_fast/distributed/hf_options.py, deepspeed_config.py);
  * harmless: accepted at any value, no effect here (log_level, ddp_timeout, hub ids, ...).
A value csd-fast cannot honour (an optimizer other than AdamW, tensor parallelism, ...) raises
NotImplementedError naming the field -- never silently ignored.
Fields TRL removed by 1.16 (`REMOVED_FIELDS`) are unknown keywords, hence TRL's own TypeError.

Our extensions come last and are off by default, so the defaults reproduce TRL.
Run the tests: `python -m pytest tests/test_config.py -q`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csd_fast.losses import LOSS_TYPES
from csd_fast.optim import METRIC_SCHEDULES, SCHEDULES

STRATEGIES = ("no", "steps", "epoch")
# DPOConfig fields of older TRL releases that 1.16 no longer has. Passing one gives the plain
# dataclass TypeError, the same TRL 1.16 gives (checked against trl in tests/test_config.py).
REMOVED_FIELDS = (
    "rpo_alpha", "max_prompt_length", "max_completion_length", "reference_free",
    "use_logits_to_keep", "ref_model_init_kwargs", "model_adapter_name", "ref_adapter_name",
    "force_use_ref_model", "generate_during_eval", "label_pad_token_id", "padding_value",
    "is_encoder_decoder", "tools", "use_liger_loss", "base_model_attribute_name",
)  # fmt: skip
# Fields whose value may be a JSON string on the command line (TRL's _VALID_DICT_FIELDS).
_DICT_FIELDS = (
    "model_init_kwargs", "lr_scheduler_kwargs", "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs", "fsdp_config", "accelerator_config", "deepspeed",
    "parallelism_config",
)  # fmt: skip


def _f(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A dataclass field with `metadata['help']` (for the CLI); list/dict defaults are copied."""
    if isinstance(default, list | dict):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **meta}
        )
    return field(default=default, metadata={"help": help, **meta})


def _optimizer_names() -> tuple[str, ...]:
    """Every `optim` transformers knows (csd_fast.optim builds the non-AdamW ones with it)."""
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


@dataclass
class DPOConfig:
    """TRL 1.16 `DPOConfig` (and the TrainingArguments it inherits) plus csd-fast's extensions."""

    # ---- output, run control -------------------------------------------------------------
    output_dir: str | None = _f(None, "Where checkpoints, metrics and the final model go.")
    overwrite_output_dir: bool = _f(
        False,
        "Replace the earlier run's results in output_dir (else a used output_dir is refused).",
    )
    do_train: bool = _f(False, "For scripts only; the trainer does not read it.")
    do_eval: bool = _f(False, "For scripts only; set True when eval_strategy is not 'no'.")
    do_predict: bool = _f(False, "For scripts only; the trainer does not read it.")
    resume_from_checkpoint: str | None = _f(None, "For scripts; pass it to `train()` to resume.")
    seed: int = _f(42, "Random seed set at the start of training (model init, shuffling).")
    data_seed: int | None = _f(None, "Seed of the data sampler; `seed` when None.")
    use_cpu: bool = _f(False, "Train on the CPU even when an accelerator is available.")
    # ---- optimisation --------------------------------------------------------------------
    learning_rate: float = _f(1e-6, "Initial (peak) learning rate of AdamW. TRL's default 1e-6.")
    lr_scheduler_type: str = _f("linear", f"Learning-rate schedule: one of {', '.join(SCHEDULES)}.")
    lr_scheduler_kwargs: dict | str | None = _f(
        None, "Extra schedule arguments, e.g. {'min_lr': 1e-7}."
    )
    warmup_steps: float = _f(0, "Linear warmup: a step count (>= 1) or a ratio of the run (< 1).")
    warmup_ratio: float | None = _f(None, "Older name for a warmup ratio (transformers < 5).")
    per_device_train_batch_size: int = _f(8, "Preference pairs per device per micro-batch.")
    per_device_eval_batch_size: int = _f(8, "Preference pairs per device per evaluation batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    num_train_epochs: float = _f(3.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Total optimizer steps; overrides num_train_epochs when > 0.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    optim: str = _f(
        "adamw_torch_fused",
        "Optimizer: transformers' names (adamw_torch(_fused), sgd, adafactor, paged_adamw_8bit).",
    )
    # ---- precision, memory ---------------------------------------------------------------
    bf16: bool | None = _f(None, "bf16 mixed precision; None means True unless fp16 (TRL's rule).")
    fp16: bool = _f(
        False,
        "fp16 mixed precision with dynamic loss scaling on GPUs (none on the CPU, as accelerate).",
    )
    tf32: bool | None = _f(None, "Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory.")
    gradient_checkpointing_kwargs: dict | str | None = _f(None, "E.g. {'use_reentrant': False}.")
    activation_checkpointing: bool | None = _f(
        None, "transformers 5's name for gradient_checkpointing."
    )
    activation_checkpointing_kwargs: dict | str | None = _f(None, "New name of the kwargs above.")
    torch_empty_cache_steps: int | None = _f(None, "Empty the device cache every N steps.")
    # ---- logging, evaluation, saving -----------------------------------------------------
    logging_strategy: str = _f("steps", "When to log: 'no', 'steps' or 'epoch'.")
    logging_steps: float = _f(10, "Log every N optimizer steps (a ratio of the run if < 1).")
    logging_first_step: bool = _f(False, "Also log after the first optimizer step.")
    logging_nan_inf_filter: bool = _f(True, "Skip nan/inf losses when averaging the logged loss.")
    logging_dir: str | None = _f(
        None, "TensorBoard directory (older name); output_dir/runs if None."
    )
    report_to: None | str | list[str] = _f(
        "none", "'none', 'all', 'tensorboard', 'wandb', 'mlflow', any transformers integration."
    )
    run_name: str | None = _f(None, "Run name for W&B / TensorBoard.")
    disable_tqdm: bool | None = _f(None, "Hide the progress bar.")
    eval_strategy: str = _f("no", "When to evaluate: 'no', 'steps' or 'epoch'.")
    eval_steps: float | None = _f(None, "Evaluate every N steps; logging_steps when None.")
    save_strategy: str = _f("steps", "When to checkpoint: 'no', 'steps', 'epoch' or 'best'.")
    save_steps: float = _f(500, "Checkpoint every N optimizer steps (a ratio if < 1).")
    save_total_limit: int | None = _f(None, "Keep at most N checkpoints (the best is kept too).")
    save_only_model: bool = _f(
        False,
        "Checkpoints hold the weights, tokenizer and progress only (no optimizer, schedule or "
        "RNG state): smaller, but a run cannot resume from them.",
    )
    load_best_model_at_end: bool = _f(False, "Reload the best checkpoint when training ends.")
    metric_for_best_model: str | None = _f(None, "Metric that picks the best checkpoint ('loss').")
    greater_is_better: bool | None = _f(None, "Whether a larger metric is better.")
    # ---- data loading --------------------------------------------------------------------
    dataloader_num_workers: int = _f(0, "DataLoader workers collating micro-batches ahead.")
    dataloader_drop_last: bool = _f(False, "Drop the last incomplete batch.")
    dataloader_pin_memory: bool = _f(True, "Pin collated batches (GPU, with workers).")
    dataloader_persistent_workers: bool = _f(False, "Accepted; no effect.")
    dataloader_prefetch_factor: int | None = _f(None, "Batches each worker prefetches.")
    dataloader_multiprocessing_context: str | None = _f(None, "Accepted; no effect.")
    dataloader_in_order: bool = _f(True, "Accepted; no effect.")
    remove_unused_columns: bool = _f(True, "Accepted; extra dataset columns are always ignored.")
    label_names: list[str] | None = _f(None, "Accepted; no effect for DPO.")
    train_sampling_strategy: str = _f(
        "random", "Order of training samples: 'random' (seeded per epoch) or 'sequential'."
    )
    length_column_name: str = _f("length", "Accepted; no effect.")
    # ---- accepted, no effect here (logging destinations, distributed knobs, hub ids) -----
    log_level: str = _f("passive", "Accepted; no effect.")
    log_level_replica: str = _f("warning", "Accepted; no effect.")
    log_on_each_node: bool = _f(True, "Accepted; no effect.")
    include_num_input_tokens_seen: str | bool = _f("no", "Accepted; num_tokens is always logged.")
    project: str = _f("huggingface", "Accepted; no effect (Trackio).")
    trackio_space_id: str | None = _f(None, "Accepted; no effect.")
    trackio_bucket_id: str | None = _f(None, "Accepted; no effect.")
    trackio_static_space_id: str | None = _f(None, "Accepted; no effect.")
    prediction_loss_only: bool = _f(False, "Accepted; no effect.")
    eval_do_concat_batches: bool = _f(True, "Accepted; no effect.")
    eval_use_gather_object: bool = _f(False, "Accepted; no effect.")
    eval_accumulation_steps: int | None = _f(None, "Accepted; no effect.")
    include_for_metrics: list[str] = _f([], "Accepted; no effect.")
    batch_eval_metrics: bool = _f(False, "Accepted; no effect.")
    skip_memory_metrics: bool = _f(True, "Accepted; no effect.")
    average_tokens_across_devices: bool = _f(True, "Accepted; no effect for DPO.")
    use_cache: bool = _f(False, "Accepted; the KV cache is off in training.")
    save_on_each_node: bool = _f(False, "Accepted; no effect.")
    local_rank: int = _f(-1, "Accepted; ranks come from torchrun's environment.")
    ddp_find_unused_parameters: bool | None = _f(None, "Accepted; no effect.")
    ddp_bucket_cap_mb: int | None = _f(None, "Accepted; no effect.")
    ddp_broadcast_buffers: bool | None = _f(None, "Accepted; no effect.")
    ddp_static_graph: bool | None = _f(None, "Accepted; no effect.")
    ddp_backend: str | None = _f(None, "Accepted; no effect.")
    ddp_timeout: int = _f(1800, "Accepted; no effect.")
    hub_token: str | None = _f(None, "Hub token for push_to_hub (default: the logged-in one).")
    hub_private_repo: bool | None = _f(None, "Create the Hub repo private.")
    hub_model_id: str | None = _f(None, "Hub repo id; default: the output_dir's name.")
    hub_strategy: str = _f("every_save", "Accepted; csd-fast pushes once, when asked.")
    hub_always_push: bool = _f(False, "Accepted; no effect.")
    hub_revision: str | None = _f(None, "Hub branch to push to.")
    # ---- inherited, not supported (default only) -----------------------------------------
    optim_args: str | None = _f(
        None, "Extra optimizer settings 'k=v,...' (transformers' rule; not read by AdamW)."
    )
    optim_target_modules: None | str | list[str] = _f(
        None, "Accepted; transformers reads it only for GaLore/APOLLO (a warning)."
    )
    label_smoothing_factor: float = _f(
        0.0, "Accepted; no effect, as in TRL (its DPO loss never calls HF's label smoother)."
    )
    bf16_full_eval: bool = _f(
        False, "evaluate()/predict() outside train() cast the policy to bf16 (as transformers)."
    )
    fp16_full_eval: bool = _f(False, "The same in fp16.")
    torch_compile: bool = _f(False, "torch.compile the policy (and a live reference model).")
    torch_compile_backend: str | None = _f(None, "torch.compile backend (default: inductor).")
    torch_compile_mode: str | None = _f(None, "torch.compile mode (e.g. 'max-autotune').")
    use_liger_kernel: bool = _f(
        False, "Liger's layer kernels (RMSNorm, RoPE, SwiGLU) on GPU; the LM head stays ours."
    )
    liger_kernel_config: dict | None = _f(None, "Liger kernel options (as TRL: no fused CE).")
    neftune_noise_alpha: float | None = _f(
        None, "NEFTune: uniform noise on the input embeddings in training (e.g. 5)."
    )
    auto_find_batch_size: bool = _f(
        False, "On out-of-memory, retry from the start with 0.9x the train batch size."
    )
    eval_delay: float = _f(0, "No evaluation before this many steps (or epochs, eval 'epoch').")
    eval_on_start: bool = _f(False, "Evaluate once before the first training step.")
    enable_jit_checkpoint: bool = _f(
        False, "On SIGTERM: finish the step, write a checkpoint, stop (preemptible jobs)."
    )
    push_to_hub: bool = _f(
        False, "Push the model to the Hub at the end (`trainer.push_to_hub()`; TRL's scripts)."
    )
    ignore_data_skip: bool = _f(
        False, "On resume, start the saved epoch over instead of skipping its consumed batches."
    )
    restore_callback_states_from_checkpoint: bool = _f(
        False, "On resume, restore stateful callbacks (e.g. EarlyStoppingCallback) as saved."
    )
    full_determinism: bool = _f(
        False,
        "transformers' enable_full_determinism(seed): deterministic torch algorithms and cuBLAS "
        "workspace, flash-attn's deterministic backward (csd_fast.attention). Slower on GPUs.",
    )
    accelerator_config: dict | str | None = _f(
        None,
        "accelerate's AcceleratorConfig options (a dict or JSON file): split_batches, "
        "gradient_accumulation_kwargs.num_steps, ... (csd_fast.distributed.hf_options).",
    )
    parallelism_config: Any = _f(
        None,
        "accelerate's ParallelismConfig under torchrun: dp_replicate_size x dp_shard_size "
        "(HSDP), or dp_shard_size x tp_size (tensor parallelism by the model's tp_plan); "
        "context / sequence parallelism are not supported.",
    )
    fsdp: str | None = _f(
        None,
        "transformers' FSDP words, mapped onto csd-fast's FSDP2 under torchrun: full_shard, "
        "shard_grad_op (no reshard after forward), offload (cpu_offload), auto_wrap (always).",
    )
    fsdp_config: dict | str | None = _f(
        None,
        "FSDP2 options under torchrun: cpu_offload, reshard_after_forward, param_dtype, "
        "reduce_dtype, async_checkpoint (csd_fast.distributed.fsdp.FSDP_CONFIG_KEYS).",
    )
    deepspeed: dict | str | None = _f(
        None,
        "A DeepSpeed ZeRO config (dict or JSON file), run as csd-fast's FSDP2 under torchrun "
        "(csd_fast.distributed.deepspeed_config): stage 3 full_shard, 1-2 shard_grad_op, "
        "CPU offload; DeepSpeed's engine is not used.",
    )
    debug: str | list[str] = _f(
        "", "transformers' debug options: 'underflow_overflow' (abort on the first inf/nan)."
    )

    # ---- TRL DPOConfig: model --------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | str | None = _f(
        None, "Keyword arguments for from_pretrained when `model` is a path (e.g. dtype)."
    )
    trust_remote_code: bool = _f(False, "Allow models/tokenizers with custom code.")
    router_aux_loss_coef: float | None = _f(
        None, "MoE load-balancing loss coefficient; None: the model config's own (0 if none)."
    )
    disable_dropout: bool = _f(True, "Disable dropout in the policy and reference models.")
    # ---- TRL DPOConfig: data -----------------------------------------------------------------
    dataset_num_proc: int | None = _f(None, "Accepted; tokenization runs in one process.")
    max_length: int | None = _f(1024, "Max tokens of prompt + completion; None: no truncation.")
    truncation_mode: str = _f(
        "keep_start", "How over-long sequences are cut: 'keep_start' ('keep_end' is deprecated).",
        choices=["keep_end", "keep_start"],
    )  # fmt: skip
    padding_free: bool = _f(
        False, "Pack pairs into one row without padding (real packing; TRL 1.16 disables it)."
    )
    pad_to_multiple_of: int | str | None = _f(
        "auto", "Pad lengths to a multiple of N ('auto': none)."
    )
    precompute_ref_log_probs: bool = _f(
        False, "Compute reference log-probs for the whole dataset before training."
    )
    precompute_ref_batch_size: int | None = _f(None, "Batch size of that precomputation.")
    # ---- TRL DPOConfig: loss -----------------------------------------------------------------
    loss_type: list[str] = _f(
        ["sigmoid"], f"Loss type(s), combined with loss_weights: {', '.join(LOSS_TYPES)}."
    )
    loss_weights: list[float] | None = _f(None, "Weight of each loss_type (default 1.0 each).")
    ld_alpha: float | None = _f(None, "LD-DPO alpha in [0, 1] for the verbose tokens.")
    f_divergence_type: str = _f(
        "reverse_kl", "f-DPO regularizer: reverse_kl, forward_kl, js_divergence, alpha_divergence."
    )
    f_alpha_divergence_coef: float = _f(0.5, "alpha of the alpha-divergence.")
    label_smoothing: float = _f(0.0, "Robust DPO flip probability / EXO epsilon.")
    beta: float = _f(0.1, "Strength of the tie to the reference model (tau for IPO).")
    use_weighting: bool = _f(False, "WPO weighting of pairs by length-normalized policy prob.")
    discopop_tau: float = _f(0.05, "DiscoPOP temperature.")
    activation_offloading: bool = _f(
        False, "Keep the policy's saved activations in CPU memory between forward and backward."
    )
    sync_ref_model: bool = _f(False, "TR-DPO: mix the policy into the reference periodically.")
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO alpha (needs sync_ref_model).")
    ref_model_sync_steps: int = _f(512, "TR-DPO period (needs sync_ref_model).")
    pad_token: str | None = _f(None, "Deprecated in TRL: set tokenizer.pad_token instead.")

    # ---- csd-fast extensions (off by default: the defaults reproduce TRL) -------------------
    fused: bool = _f(False, "Use the fused kernels (lm-head + log-prob + loss).")
    prefix_sharing: bool = _f(
        False, "Pack [prompt, chosen, rejected] once per pair (prompt computed once)."
    )
    ref_cache_dir: str | None = _f(
        None, "Sharded on-disk store of reference log-probs, shared by runs and sweeps."
    )
    ref_cache_strict: bool = _f(
        False, "Error (naming what differs) instead of computing a missing reference table."
    )
    ref_cache_shard_size: int = _f(4096, "Pairs per reference-store shard (the unit of resume).")
    plan_cache_dir: str | None = _f(
        None, "On-disk cache of token-budget epoch plans (shared by the runs of a sweep)."
    )
    max_tokens_per_batch: int | None = _f(
        None, "Token budget per packed micro-batch (padding_free/prefix_sharing)."
    )
    trainable_params: list[str] | None = _f(
        None, "Regex patterns of parameter names to train (others frozen); all when None."
    )
    on_bad_row: str = _f("error", "Bad dataset row: 'error' stops, 'skip' skips and records it.")
    min_lr: float | None = _f(None, "Floor of the cosine schedule (cosine_with_min_lr).")
    clo_lambda: float = _f(0.5, "CLO: weight of the NLL term on the target language.")
    stream_buffer_size: int = _f(
        1024, "Streams with max_tokens_per_batch: pairs read ahead and planned together."
    )
    on_fully_truncated: str | None = _f(
        None,
        "Rows whose prompt alone fills max_length: 'drop' (TRL's way, with a warning and the "
        "rejects file) or 'error'. None: 'drop' in the Python API, 'error' in csd train.",
    )
    dataset_cache_dir: str | None = _f(
        "auto",
        "Tokenized-pairs cache: 'auto' ($CSD_FAST_CACHE/pairs or ~/.cache/csd_fast/pairs), a "
        "directory, or None for no cache.",
    )

    resume_with_changes: bool = _f(
        False, "Resume although run-changing options differ from the checkpoint's (logged)."
    )

    def __post_init__(self) -> None:
        for name in _DICT_FIELDS:  # the CLI passes dicts as JSON text
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().startswith("{"):
                setattr(self, name, json.loads(value))
        self._map_distributed_options()
        if self.train_sampling_strategy not in ("random", "sequential"):
            raise NotImplementedError(
                f"train_sampling_strategy={self.train_sampling_strategy!r} is not supported yet "
                "('random', 'sequential'; token-budget batching: max_tokens_per_batch)"
            )
        if isinstance(self.dataset_cache_dir, str) and self.dataset_cache_dir.lower() in (
            "none",
            "null",
            "off",
            "",
        ):
            self.dataset_cache_dir = None
        if self.ref_cache_strict and not self.ref_cache_dir:
            raise ValueError("ref_cache_strict needs ref_cache_dir (the store it must read)")
        if self.ref_cache_shard_size < 1:
            raise ValueError(f"ref_cache_shard_size must be >= 1, got {self.ref_cache_shard_size}")
        if self.output_dir is None:
            self.output_dir = "trainer_output"  # transformers 5's default
        # TRL's rule: bf16 unless fp16 was asked for.
        self.bf16 = (not self.fp16) if self.bf16 is None else bool(self.bf16)
        if self.bf16 and self.fp16:
            raise ValueError("At most one of fp16 and bf16 can be True, but not both")
        # transformers 5 renamed gradient_checkpointing -> activation_checkpointing; the new
        # name wins when given, and both read the same afterwards.
        if self.activation_checkpointing is not None:
            self.gradient_checkpointing = bool(self.activation_checkpointing)
        self.activation_checkpointing = self.gradient_checkpointing
        if self.activation_checkpointing_kwargs is not None:
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        if self.warmup_ratio is not None and not self.warmup_steps:
            self.warmup_steps = float(self.warmup_ratio)
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = (
                "all" if self.include_num_input_tokens_seen else "no"
            )
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if isinstance(self.debug, str):
            self.debug = self.debug.split()
        self.debug = list(self.debug or [])  # HF's parser may hand over None
        self.debug = [getattr(d, "value", d) for d in self.debug]
        unknown = [d for d in self.debug if d not in ("underflow_overflow", "tpu_metrics_debug")]
        if unknown:
            raise ValueError(
                f"debug={unknown} is not a valid DebugOption: use 'underflow_overflow' or "
                "'tpu_metrics_debug'"
            )
        self._check_choices()
        self._derive_logging_eval_save()
        self._normalise_report_to()
        self._normalise_loss()
        if isinstance(self.pad_to_multiple_of, str):
            text = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if text in ("auto", "none", "null") else int(text)
        if self.pad_token is not None:
            warnings.warn(
                "`pad_token` is deprecated: set `tokenizer.pad_token` and pass the tokenizer as "
                "`processing_class`.",
                FutureWarning,
                stacklevel=3,
            )
        for name in ("optim_args", "optim_target_modules"):
            if getattr(self, name) and self.optim in ("adamw_torch", "adamw_torch_fused"):
                warnings.warn(
                    f"{name}={getattr(self, name)!r} has no effect with optim={self.optim!r}: "
                    "transformers reads it only for other optimizers (SGD, GaLore, APOLLO, ...), "
                    "so it is ignored, as in TRL. AdamW's settings: adam_beta1/adam_beta2/"
                    "adam_epsilon/weight_decay.",
                    UserWarning,
                    stacklevel=3,
                )
        if self.truncation_mode == "keep_end":
            warnings.warn(
                "truncation_mode='keep_end' is deprecated (removed in TRL 2.0); use 'keep_start'.",
                FutureWarning,
                stacklevel=3,
            )

    # -- validation helpers ----------------------------------------------------------------
    def _map_distributed_options(self) -> None:
        """transformers' `fsdp` words and fsdp_config keys, accelerate's parallelism_config and
        a DeepSpeed ZeRO config, as fsdp_config keys of csd-fast's own FSDP2
        (csd_fast.distributed.hf_options); keys given in csd-fast's names win."""
        from csd_fast.distributed import hf_options
        from csd_fast.distributed.deepspeed_config import deepspeed_fsdp_config
        from csd_fast.distributed.fsdp import FSDP_CONFIG_KEYS

        mapped = deepspeed_fsdp_config(self)
        if mapped and self.fsdp:
            raise ValueError("deepspeed and fsdp are both set: choose one")
        mapped.update(hf_options.fsdp_words_config(self.fsdp))
        mapped.update(hf_options.parallelism_config(self.parallelism_config))
        # kept as its plain sizes: the config stays JSON-safe (to_dict, the resume record)
        self.parallelism_config = hf_options.parallelism_sizes(self.parallelism_config)
        if isinstance(self.fsdp_config, str | Path):  # transformers takes a JSON file's path
            self.fsdp_config = hf_options.read_json_option("fsdp_config", self.fsdp_config)
        given, checkpointing = hf_options.transformers_fsdp_config(
            dict(self.fsdp_config or {}), set(FSDP_CONFIG_KEYS)
        )
        if checkpointing:  # FSDP's activation checkpointing: the same recompute per layer
            self.gradient_checkpointing = True
        self.accelerator_config = hf_options.accelerator_options(self.accelerator_config) or None
        steps = ((self.accelerator_config or {}).get("gradient_accumulation_kwargs") or {}).get(
            "num_steps"
        )
        if steps is not None:  # transformers' rule: one of the two places, not both
            if self.gradient_accumulation_steps > 1:
                raise ValueError(
                    "gradient_accumulation_steps and accelerator_config's "
                    "gradient_accumulation_kwargs.num_steps are both set: use one"
                )
            self.gradient_accumulation_steps = int(steps)
            # moved, not copied: the config saved and read back (to_yaml / replace) has one
            ga = dict(self.accelerator_config["gradient_accumulation_kwargs"])
            del ga["num_steps"]
            self.accelerator_config = {**self.accelerator_config,
                                       "gradient_accumulation_kwargs": ga or None}  # fmt: skip
        if mapped or given or self.fsdp_config is not None:
            self.fsdp_config = {**mapped, **given}
        from csd_fast.distributed.tensor_parallel import check_tensor_parallel_args

        check_tensor_parallel_args(self)

    def _check_choices(self) -> None:
        checks = {
            "lr_scheduler_type": SCHEDULES,
            "optim": _optimizer_names(),
            "logging_strategy": STRATEGIES,
            "eval_strategy": STRATEGIES,
            "save_strategy": (*STRATEGIES, "best"),
            "truncation_mode": ("keep_start", "keep_end"),
            "on_bad_row": ("error", "skip"),
            "on_fully_truncated": (None, "drop", "error"),
        }
        for name, allowed in checks.items():
            value = getattr(self, name)
            value = getattr(value, "value", value)  # a transformers enum member
            setattr(self, name, value)
            if value not in allowed:
                raise ValueError(
                    f"DPOConfig.{name}={value!r} is not supported; expected one of {allowed}"
                )

    def _derive_logging_eval_save(self) -> None:
        # transformers' rules: integer step counts above 1, eval_steps falls back to
        # logging_steps, load_best_model_at_end implies metric 'loss' and needs matching strategies.
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value > 1:
                if value != int(value):
                    raise ValueError(f"--{name} must be an integer if bigger than 1: {value}")
                setattr(self, name, int(value))
        if self.logging_strategy == "steps" and self.logging_steps == 0:
            raise ValueError("logging_strategy='steps' requires a non-zero logging_steps")
        if self.eval_strategy != "no":
            self.do_eval = True
        if self.eval_strategy == "steps" and not self.eval_steps:
            if not self.logging_steps:
                raise ValueError("eval_strategy='steps' requires eval_steps or logging_steps")
            self.eval_steps = self.logging_steps
        metric_schedule = self.lr_scheduler_type in METRIC_SCHEDULES
        if metric_schedule and self.eval_strategy == "no":
            raise ValueError(
                f"lr_scheduler_type {self.lr_scheduler_type} requires an eval strategy"
            )
        if (self.load_best_model_at_end or metric_schedule) and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.load_best_model_at_end and self.save_strategy != "best":
            if self.eval_strategy != self.save_strategy:
                raise ValueError(
                    "load_best_model_at_end requires the save and eval strategy to match, except "
                    f"when save_strategy='best' (eval: {self.eval_strategy!r}, save: "
                    f"{self.save_strategy!r})"
                )
            if self.eval_strategy == "steps" and self.save_steps % self.eval_steps != 0:
                raise ValueError(
                    "load_best_model_at_end requires save_steps to be a multiple of eval_steps "
                    f"(save_steps={self.save_steps}, eval_steps={self.eval_steps})"
                )

    def _normalise_report_to(self) -> None:
        # transformers turns 'none' into [] and a single name into a list; 'all' means every
        # integration we support that is installed.
        rt = self.report_to
        if rt is None or rt == "none" or rt == ["none"]:
            self.report_to = []
        elif rt == "all" or rt == ["all"]:  # transformers' rule: every installed integration
            from transformers.integrations import get_available_reporting_integrations

            self.report_to = list(get_available_reporting_integrations())
        else:
            self.report_to = [rt] if isinstance(rt, str) else list(rt)

    def _normalise_loss(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    "`loss_weights` must have the same length as `loss_type` when combining "
                    f"multiple losses. Got {len(self.loss_weights)} weights for "
                    f"{len(self.loss_type)} loss types."
                )
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}; expected among {list(LOSS_TYPES)}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")

    # -- public helpers ----------------------------------------------------------------------
    def loss_params(self):
        """The loss settings as `csd_fast.losses.LossParams` (what `preference_loss` reads)."""
        from csd_fast.losses import LossParams

        return LossParams(
            loss_type=tuple(self.loss_type),
            loss_weights=None if self.loss_weights is None else tuple(self.loss_weights),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau,
            clo_lambda=self.clo_lambda,
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/YAML-safe values (what `from_yaml` reads back)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = getattr(value, "value", value)  # enums (if a caller set one)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DPOConfig:
        """Build from a YAML mapping of field: value; keyword `overrides` win over the file.

        Dashes in keys are accepted (`max-steps`), as on the command line.
        """
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: expected a mapping of option: value, got {type(data).__name__}"
            )
        from csd_fast.validation import coerce_fields

        data = {k.replace("-", "_"): v for k, v in data.items()}
        data = coerce_fields(cls, data, source=str(path))  # YAML 1.1 reads 5e-3 as a string
        data.update(overrides)
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def fields_for_cli(cls) -> list[tuple[str, Any, Any, str]]:
        """(name, type annotation, default, help) of every field, for building `--help`."""
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append((f.name, f.type, default, f.metadata.get("help", "")))
        return out
