"""TRL 1.16 / transformers Trainer behaviours that sit outside the core loop: init, eval, options.

    check_trl_arguments(args, model, ref_model, train_dataset, peft_config)   # TRL's init errors
    coef, enabled = model_setup(trainer, args)   # MoE aux, tags, pad id, TR-DPO, Liger, compile
    check_new_eval_reference(trainer)            # evaluate(new set) with precomputed references
    with neftune(trainer): ...                   # NEFTune noise on the embeddings in train()
    with jit_checkpoint(trainer): ...            # SIGTERM: checkpoint after this step, stop
    watch_underflow_overflow(trainer)            # debug="underflow_overflow"
    batch_size_search(trainer, attempt)          # auto_find_batch_size: retry smaller on OOM
    with activation_offload(args, training, device): ...   # saved activations kept on the CPU
    scaler = fp16_scaler(args, device, sharded)  # fp16: a GradScaler on GPUs (None on the CPU)
    callback_states(trainer); restore_callback_states(trainer, saved)   # checkpointed callbacks
    eval_predictions_metrics(trainer, pairs, prefix)   # compute_metrics on TRL's EvalPrediction

Each function follows the named TRL 1.16 code path (trl/trainer/dpo_trainer.py) and raises the
same exception type with TRL's message where TRL raises. Tests: tests/test_trl_compat.py,
tests/test_trl_dropin.py, tests/test_trl_dropin_resume.py.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import warnings

import torch


def check_trl_arguments(args, model, ref_model, train_dataset, peft_config, eval_dataset) -> None:
    """The argument errors TRL's `DPOTrainer.__init__` raises before any model work."""
    import datasets

    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    streams = [d for d in (train_dataset, *evals) if isinstance(d, datasets.IterableDataset)]
    if streams and (args.precompute_ref_log_probs or args.ref_cache_dir):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a "
            "map-style Dataset or set `precompute_ref_log_probs=False` (a reference table, also "
            "ref_cache_dir, is indexed by row: a stream has no random access)."
        )

    if train_dataset is None:
        raise ValueError("`train_dataset` is required")
    if isinstance(train_dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise TypeError(
            "`train_dataset` must be a `Dataset` or `IterableDataset`, got "
            f"`{type(train_dataset).__name__}`."
        )
    if ref_model is not None and ref_model is model:
        raise ValueError(
            "`model` and `ref_model` cannot be the same object. In most cases you should omit "
            "`ref_model` and we'll initialize it to a copy of `model` for you."
        )
    if args.use_weighting and {"aot", "aot_unpaired"} & set(args.loss_type):
        raise NotImplementedError(
            "WPO-style weighting is not implemented for 'aot' or 'aot_unpaired' because those "
            "losses sort samples, which would misalign per-pair weights."
        )
    if args.sync_ref_model:
        if peft_config is not None or hasattr(model, "peft_config"):
            raise NotImplementedError(
                "sync_ref_model=True with a PEFT model: the reference is the policy with its "
                "adapters disabled, so there is no separate reference model to synchronize."
            )
        if args.precompute_ref_log_probs:
            raise ValueError(
                "You cannot use `sync_ref_model=True` together with "
                "`precompute_ref_log_probs=True`: the reference model changes during training, "
                "so precomputed reference log-probs would go stale."
            )
        if args.ref_cache_dir:
            raise ValueError(
                "sync_ref_model=True cannot use a cached reference (ref_cache_dir): TR-DPO "
                "updates the reference every ref_model_sync_steps steps, so cached log-probs "
                "would be those of a reference that no longer exists. Unset ref_cache_dir."
            )
    adapter = peft_config or getattr(model, "active_peft_config", None)
    if getattr(adapter, "is_prompt_learning", False):  # virtual tokens: csd_fast/prompt_learning
        from csd_fast.prompt_learning import check_prompt_learning

        check_prompt_learning(adapter, args)
    packed = args.padding_free or args.prefix_sharing or args.max_tokens_per_batch
    if args.neftune_noise_alpha is not None and packed:
        raise NotImplementedError(
            "neftune_noise_alpha with a packed layout (padding_free, prefix_sharing or "
            "max_tokens_per_batch): NEFTune scales its noise by the padded sequence length, "
            "which a packed row of several sequences does not have. Use the padded layout."
        )
    liger = args.liger_kernel_config or {}
    if args.use_liger_kernel and liger.get("fused_linear_cross_entropy"):
        raise ValueError(
            '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: the '
            "LM head is csd-fast's own fused log-prob head."
        )


def model_setup(trainer, args) -> tuple[float, bool]:
    """Post-load model steps of TRL's init; returns (router_aux_loss_coef, aux_loss_enabled)."""
    from csd_fast.forward import unwrap_causal_lm

    model = trainer.model
    lm = unwrap_causal_lm(model)
    # the model and the tokenizer agree on the pad token from construction on (TRL does this)
    from csd_fast.data.vision import text_tokenizer

    pad = text_tokenizer(trainer.processing_class).pad_token_id
    lm.config.get_text_config().pad_token_id = pad
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.pad_token_id = pad
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(trainer._tag_names)
    text_config = lm.config.get_text_config()
    coef = args.router_aux_loss_coef
    resolved = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if coef and not hasattr(text_config, "output_router_logits"):
        raise ValueError(
            f"`router_aux_loss_coef` is set to {coef} but {type(lm).__name__} is not a "
            "Mixture-of-Experts model that returns its router logits, so there is no auxiliary "
            "loss to weight."
        )
    # a config may declare the attribute as None (GLM-4-MoE): no coefficient, no aux loss
    resolved = float(resolved or 0.0)
    enabled = hasattr(text_config, "output_router_logits") and resolved != 0.0
    if args.sync_ref_model:
        trainer.add_callback(SyncRefModelCallback(trainer))
    if args.use_liger_kernel:
        _apply_liger(trainer, args)
    if args.torch_compile:
        _compile(trainer, args)
    return resolved, enabled


class SyncRefModelCallback:
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): every `ref_model_sync_steps` steps
    ref <- alpha * policy + (1 - alpha) * ref, alpha = `ref_model_mixup_alpha` (TRL's callback)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps != 0:
            return None
        ref = self.trainer.ref_model
        if ref is None:
            raise RuntimeError("sync_ref_model needs a reference model to update")
        policy = dict(self.trainer.model.named_parameters())
        alpha = args.ref_model_mixup_alpha
        with torch.no_grad():
            for name, p in ref.named_parameters():
                src = policy[name].detach().to(p.dtype)
                p.mul_(1.0 - alpha).add_(src, alpha=alpha)
        return None


def _apply_liger(trainer, args) -> None:
    from csd_fast.models import apply_liger_kernels

    warnings.warn(
        "`use_liger_kernel=True` is deprecated in TRL (removed in v2.0.0); csd-fast applies "
        "Liger's layer kernels (RMSNorm, RoPE, SwiGLU) and keeps its own fused LM head.",
        FutureWarning,
        stacklevel=4,
    )
    if trainer.device.type != "cuda":
        warnings.warn(
            f"use_liger_kernel=True on {trainer.device.type}: Liger's kernels are Triton GPU "
            "kernels and cannot run here, so the layers stay eager (the numbers are the same).",
            UserWarning,
            stacklevel=4,
        )
        return
    if args.fused:
        return  # prepare_models already applied them
    for m in (trainer.model, trainer.ref_model):
        if m is not None:
            apply_liger_kernels(m)


def _compile(trainer, args) -> None:
    """torch.compile the decoder stacks in place (parameter names, hence checkpoints, unchanged)."""
    from csd_fast.forward import backbone

    kwargs = {"backend": args.torch_compile_backend or "inductor"}
    if args.torch_compile_mode:
        kwargs["mode"] = args.torch_compile_mode
    for m in (trainer.model, trainer.ref_model):
        if m is not None:
            backbone(m).compile(**kwargs)


def check_new_eval_reference(trainer) -> None:
    """TRL's refusal: a new eval set, precomputed references, no reference model left."""
    a = trainer.args
    # csd-fast's extensions still have a reference: a stored table of the set (ref_cache_dir,
    # looked up after tokenizing) or a reference given by path, reloaded when needed
    if a.ref_cache_dir or getattr(trainer, "_ref_model_path", None) is not None:
        return
    if (
        a.precompute_ref_log_probs
        and trainer.ref_model is None
        and not hasattr(trainer.model, "disable_adapter")
        and trainer.state.global_step > 0
    ):
        raise ValueError(
            "Cannot compute reference log-probs for a dataset passed to `evaluate()` after "
            "training has started, because `precompute_ref_log_probs=True` and no `ref_model` "
            "was provided (full fine-tuning). In this setup the reference model is not kept in "
            "memory, so it is only available before training. Provide this dataset as "
            "`eval_dataset` at initialization, pass an explicit `ref_model`, or set "
            "`precompute_ref_log_probs=False`."
        )


def eval_predictions_metrics(trainer, pairs, prefix: str) -> dict:
    """`compute_metrics(EvalPrediction(logits, input_ids))` as TRL feeds it, keys prefixed."""
    from transformers.trainer_utils import EvalPrediction

    warnings.warn(
        "compute_metrics gets the logits of a second forward pass, as in TRL, where passing "
        "logits to compute_metrics is deprecated (removed in TRL 2.0).",
        FutureWarning,
        stacklevel=4,
    )
    logits, labels = trainer._eval_logits(pairs)
    out = trainer.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) or {}
    return {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in out.items()}


@contextlib.contextmanager
def neftune(trainer):
    """NEFTune (Jain et al. 2023, arXiv 2310.05914) for the length of `train()`, as transformers'
    Trainer does it: its own forward hook on the policy's input embeddings adds uniform noise
    of half-width alpha / sqrt(L * d) (L the padded length, d the width) in training forwards
    only (the reference and evaluation run in eval mode: no noise); removed afterwards."""
    alpha = trainer.args.neftune_noise_alpha
    if alpha is None:
        yield
        return
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    handle = activate_neftune(trainer.model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(trainer.model, handle)


def activation_offload(args, training: bool, device):
    """`activation_offloading`: the policy's saved activations go to (pinned) CPU memory in the
    forward and come back in the backward (torch's saved-tensor hooks); training passes only."""
    if not (args.activation_offloading and training):
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def fp16_scaler(args, device, sharded: bool = False):
    """fp16 as accelerate does it: fp16 compute plus dynamic loss scaling on an accelerator; on
    the CPU accelerate leaves fp16 off (plain fp32), and so do we. One process: fp16 autocast
    (trainer._autocast). FSDP2: fp16 gathered parameters (FsdpOptions.param_dtype) over fp32
    masters; torch's GradScaler then reads DTensor gradients, whose inf/nan check DTensor
    reduces over the mesh, so every rank skips the same steps (tests/distributed)."""
    if not args.fp16 or device.type == "cpu":
        return None
    if sharded and (args.fsdp_config or {}).get("cpu_offload"):
        raise NotImplementedError(
            "fp16 with FSDP2 CPU offload: the offloaded gradients live on the host, where the "
            "scaler's inf/nan check would need a collective NCCL cannot run; use bf16=True"
        )
    from csd_fast.distributed.deepspeed_config import scaler_options

    return torch.amp.GradScaler(device.type, **scaler_options(args))


class _JitCheckpointCallback:
    """Asks the loop for a checkpoint and a stop at the first step end after SIGTERM."""

    def __init__(self, trainer):
        self.trainer, self.requested = trainer, False
        self.stopping = False  # what every rank agreed on at the last step end

    def _requested_anywhere(self) -> bool:
        dist = self.trainer.dist
        if not dist.distributed:  # every rank must stop at the same step: agree on the flag
            return self.requested
        flag = torch.tensor([float(self.requested)], device=dist.device)
        return bool(dist.all_processes_sum(flag).item() > 0)  # tensor peers too

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = self._requested_anywhere()
        if self.stopping:
            control.should_save = control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopping:  # the step end above saved this state already (on every rank)
            control.should_save = False
        return control


@contextlib.contextmanager
def jit_checkpoint(trainer):
    """`enable_jit_checkpoint` (transformers 5): on SIGTERM (SLURM `--signal=TERM@<s>`, a
    Kubernetes preemption) the running optimizer step finishes, a regular (atomic) checkpoint
    is written and train() returns; `train(resume_from_checkpoint=True)` continues exactly.
    transformers waits 3 s for a SIGKILL first; csd-fast's checkpoints are atomic, so a kill
    during the save leaves the previous one intact and the flag is acted on at once."""
    if not trainer.args.enable_jit_checkpoint or threading.current_thread() is not (
        threading.main_thread()
    ):
        yield
        return
    callback = _JitCheckpointCallback(trainer)

    def handler(signum, frame):
        callback.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    trainer.callbacks.append(callback)  # last: after the user's own step-end callbacks
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        trainer.callbacks.remove(callback)


def _exportable(trainer) -> list:
    from transformers.trainer_callback import ExportableState

    return [cb for cb in [*trainer.callbacks, trainer.control] if isinstance(cb, ExportableState)]


def callback_states(trainer) -> dict:
    """transformers' `stateful_callbacks` of a checkpoint: class name -> `state()` (a list when
    several callbacks share a class), for every ExportableState callback and the control."""
    out: dict = {}
    for cb in _exportable(trainer):
        name = type(cb).__name__
        if name in out:
            out[name] = [*(out[name] if isinstance(out[name], list) else [out[name]]), cb.state()]
        else:
            out[name] = cb.state()
    return out


def restore_callback_states(trainer, saved: dict) -> None:
    """`restore_callback_states_from_checkpoint`, as transformers: each saved state rebuilds the
    callback of the same class (in order, for several), `type(cb)(**args)` then its attributes;
    saved callbacks the run no longer has are named in a warning."""
    missing = []
    for name, states in saved.items():
        states = states if isinstance(states, list) else [states]
        current = [cb for cb in _exportable(trainer) if type(cb).__name__ == name]
        if not current:
            missing.append(name)
        for cb, state in zip(current, states, strict=False):
            new = type(cb)(**state.get("args", {}))
            for attribute, value in state.get("attributes", {}).items():
                setattr(new, attribute, value)
            if cb is trainer.control:
                trainer.control = new
            else:
                trainer.callbacks[trainer.callbacks.index(cb)] = new
    if missing:
        warnings.warn(
            f"the checkpoint has callback states for {', '.join(missing)}, which this run does not "
            "have: ignored",
            UserWarning,
            stacklevel=2,
        )


def watch_underflow_overflow(trainer) -> None:
    """`debug="underflow_overflow"`: transformers' own DebugUnderflowOverflow on the policy (its
    forward hooks abort on the first inf/nan with a trace of the last frames), added once, at
    train() as transformers does ('tpu_metrics_debug' needs a TPU: no effect here)."""
    if "underflow_overflow" not in trainer.args.debug or getattr(trainer, "_debug_hooks", None):
        return
    from transformers.debug_utils import DebugUnderflowOverflow

    trainer._debug_hooks = DebugUnderflowOverflow(trainer.model)


def batch_size_search(trainer, attempt):
    """`auto_find_batch_size`, as transformers (through accelerate) does it: when a training
    start runs out of memory (accelerate's test of the error), retry from the start with
    per_device_train_batch_size * 0.9 until one fits; gradient_accumulation_steps is kept.
    Under torchrun the retry is a restart of the job (csd_fast/distributed/batch_size.py)."""
    args = trainer.args
    if not args.auto_find_batch_size:
        return attempt()
    from accelerate.utils.memory import should_reduce_batch_size

    if trainer.dist.distributed:  # the job restarts with the smaller size (distributed/)
        from csd_fast.distributed.batch_size import record_smaller_size

        try:
            return attempt()
        except Exception as e:
            if should_reduce_batch_size(e):
                record_smaller_size(trainer, e, resumed=trainer.resumed_from is not None)
            raise

    while True:
        try:
            return attempt()
        except Exception as e:
            if not should_reduce_batch_size(e):
                raise
        smaller = int(args.per_device_train_batch_size * 0.9)
        if smaller == 0:
            raise RuntimeError("No executable batch size found, reached zero.")
        warnings.warn(
            f"out of memory with per_device_train_batch_size={args.per_device_train_batch_size}"
            f": starting again with {smaller} (auto_find_batch_size)",
            UserWarning,
            stacklevel=3,
        )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trainer.restart_with_batch_size(smaller)


def resumed_batch_size(trainer, resume) -> None:
    """On resume with auto_find_batch_size, the batch size the checkpoint's run found (as
    transformers reads it back from the trainer state), so the resume check sees no change."""
    if not (trainer.args.auto_find_batch_size and resume):
        return
    from csd_fast.resume import read_record, select_checkpoint

    path = select_checkpoint(resume, trainer.args.output_dir, log=lambda *a, **k: None)
    found = (
        read_record(path).get("training", {}).get("per_device_train_batch_size") if path else None
    )
    if found:
        trainer.args.per_device_train_batch_size = int(found)
