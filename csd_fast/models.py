"""Loading and preparing the policy and reference models for preference training.

* `load_model`: a path or hub id -> `AutoModelForCausalLM` with `model_init_kwargs`;
* `prepare_models`: PEFT wrapping (the reference is then the policy with adapters disabled, no
  second copy), a frozen reference copy of an in-memory policy in the compute dtype (TRL 1.16
  instead reloads it from `config._name_or_path`, which fails for a model never saved), dropout
  off, gradient checkpointing, the packed attention function for padding-free layouts, and on GPU
  with `fused` Liger-Kernel's RMSNorm / RoPE / SwiGLU kernels where Liger supports the architecture.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

# model_init_kwargs a model built from its config alone honours; any other (a revision, a
# quantization config, a device map) needs the weights read, so such a load is never on meta
_META_KWARGS = {"trust_remote_code", "attn_implementation"}


def load_model(path: str, args, *, on_meta: bool = False, extra_kwargs=None) -> nn.Module:
    """`path` as a causal LM in TRL's dtype; `on_meta`: only its structure, on the meta device
    (no weights read: an FSDP rank other than 0, whose shards come from rank 0 after sharding,
    `csd_fast.distributed.fsdp.broadcast_from_rank0`). See `loads_on_meta`. `extra_kwargs`: the
    trainer's own additions (a `quantization_config` argument: csd_fast.quantization)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(args.model_init_kwargs or {}) if isinstance(args.model_init_kwargs, dict) else {}
    kwargs.update(extra_kwargs or {})
    if kwargs.get("quantization_config") is not None:
        from csd_fast.quantization import bnb_config, default_device_map

        kwargs["quantization_config"] = bnb_config(kwargs["quantization_config"])
        if "device_map" not in kwargs:
            kwargs["device_map"] = default_device_map(args)
    # TRL loads float32 unless told otherwise: bf16 master weights would round away small updates
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "float32"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs["trust_remote_code"])
    auto = AutoModelForCausalLM
    if is_vision_language(config):  # TRL builds the config's own architecture: the VLM class
        from transformers import AutoModelForImageTextToText as auto
    if not on_meta:
        return auto.from_pretrained(path, dtype=dtype, **kwargs)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, **kwargs)
    _keep_in_fp32(model, dtype)
    model.config._name_or_path = str(path)  # what from_pretrained records, for names and cards
    return model


def _keep_in_fp32(model: nn.Module, dtype) -> None:
    """The modules from_pretrained keeps in fp32 under a half dtype (a model's
    `_keep_in_fp32_modules_strict`, and `_keep_in_fp32_modules` under fp16), which from_config
    does not: every rank must hold the same dtypes as rank 0."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep or dtype not in (torch.float16, torch.bfloat16):
        return
    for module_name, module in model.named_modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                full = f"{module_name}.{name}" if module_name else name
                if t is not None and any(k in full for k in keep):  # HF's substring match
                    if isinstance(t, nn.Parameter):
                        group[name] = nn.Parameter(t.float(), requires_grad=t.requires_grad)
                    else:
                        group[name] = t.float()


def loads_on_meta(args) -> bool:
    """Whether `load_model(..., on_meta=True)` can stand in for reading the weights: not with
    model_init_kwargs that need them, nor with FSDP's CPU offload (whose shards must start on
    the host, where rank 0's own load puts them); CSD_FSDP_META_INIT=0 turns it off."""
    import os

    if os.environ.get("CSD_FSDP_META_INIT", "1") == "0":  # every rank reads the weights
        return False
    kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    fsdp = getattr(args, "fsdp_config", None) or {}
    from csd_fast.distributed.hf_options import as_bool

    if not as_bool(fsdp.get("meta_init", True), "meta_init"):  # cpu_ram_efficient_loading
        return False
    if int(fsdp.get("tp_size") or 1) > 1:
        # parallelize_module distributes each weight from rank 0 (a collective over real
        # values): every rank reads the weights
        return False
    offload = as_bool(fsdp.get("cpu_offload", False), "cpu_offload")
    return set(kwargs) - {"dtype", "torch_dtype"} <= _META_KWARGS and not offload


def is_on_meta(module: nn.Module | None) -> bool:
    return module is not None and any(p.is_meta for p in module.parameters())


def to_device(module: nn.Module | None, device) -> None:
    """Move to `device`, except a model on meta (it gets storage when it is sharded) and a
    bitsandbytes-quantized one (placed by its load's device_map; bnb weights are not moved)."""
    from csd_fast.quantization import is_quantized

    if module is not None and not is_on_meta(module) and not is_quantized(module):
        module.to(device)


def is_vision_language(config) -> bool:
    """A vision-language model's config: it carries a vision tower's config."""
    return getattr(config, "vision_config", None) is not None


def load_tokenizer(model: nn.Module, path: str | None, args):
    """The tokenizer saved with the model, or its processor for a vision-language model (as
    TRL loads AutoProcessor)."""
    from transformers import AutoProcessor, AutoTokenizer

    source = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ValueError("processing_class is required when the model was not loaded from a path")
    if is_vision_language(getattr(unwrap(model), "config", None)):
        return AutoProcessor.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)


def unwrap(model):
    from csd_fast.forward import unwrap_causal_lm

    return unwrap_causal_lm(model)


def ensure_pad_token(tokenizer, args) -> None:
    """TRL's rule: `args.pad_token` if given, else the tokenizer's own, else EOS."""
    if getattr(args, "pad_token", None) is not None:
        tokenizer.pad_token = args.pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reference_dtype(model: nn.Module, args) -> torch.dtype:
    """The dtype the reference computes in: bf16 on an accelerator with bf16, else the model's.

    The reference never steps, so fp32 master weights buy it nothing; under bf16 autocast (or
    FSDP's bf16 policy) its matmuls run in bf16 either way. On CPU it stays in the model's dtype,
    which keeps CPU runs exactly as before."""
    dtype = next(model.parameters()).dtype
    on_accelerator = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    return torch.bfloat16 if on_accelerator and args.bf16 and dtype.is_floating_point else dtype


def frozen_copy(
    model: nn.Module, dtype: torch.dtype | None, share_frozen: bool = False
) -> nn.Module:
    """A deep copy whose parameters are made directly in `dtype` (no full-precision second copy
    exists at any point: peak memory is the policy plus the reference in its own dtype).
    `share_frozen`: quantized weights (which never train) are shared, not copied (a quantized
    PEFT model: its reference is the same 4-bit base under a frozen copy of the adapter); `dtype`
    None keeps each copied parameter's own dtype."""
    from csd_fast.quantization import is_quantized_tensor

    memo = {}
    for p in model.parameters():  # a tied parameter appears once: one copy, still tied
        # only quantized weights are shared: a full-precision frozen one (a norm, the head)
        # may still be switched on by trainable_params, and the reference must not move
        if share_frozen and is_quantized_tensor(p):
            memo[id(p)] = p
        else:
            value = p.detach().to(dtype or p.dtype, copy=True)
            memo[id(p)] = nn.Parameter(value, requires_grad=False)
    return copy.deepcopy(model, memo)


def prepare_models(model: nn.Module, ref_model: nn.Module | None, peft_config, args):
    """Return (policy, reference or None) ready for training; see the module docstring."""
    from csd_fast.quantization import (
        adapters_to_bf16,
        check_quantized_policy,
        is_quantized,
        pin_train_mode,
    )

    check_quantized_policy(model, peft_config)  # QLoRA: an adapter, a full-precision head
    if peft_config is not None:
        try:
            from peft import get_peft_model
        except ImportError as e:
            raise ImportError("peft_config needs `pip install peft`") from e
        model = get_peft_model(model, peft_config)
    quantized = is_quantized(model)
    if quantized:  # TRL's QLoRA adapter dtype, also for a PeftModel passed in
        adapters_to_bf16(model)
        pin_train_mode(model)
    pin_train_mode(ref_model if is_quantized(ref_model) else None)
    if peft_config is not None:
        pass  # the reference is the policy with its adapters disabled
    elif ref_model is None and not (args.precompute_ref_log_probs or args.ref_cache_dir):
        # a PeftModel passed in: the reference is its initial adapter (TRL copies it into a
        # "ref" adapter); over a quantized base that base is shared, never copied
        dtype = None if quantized else reference_dtype(model, args)
        ref_model = frozen_copy(model, dtype, share_frozen=quantized)
    # with precomputed reference log-probs the untrained policy scores the data once: no copy
    if ref_model is not None:
        freeze(ref_model)
    if args.disable_dropout:
        disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
    if args.gradient_checkpointing:
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()
    if args.padding_free or args.prefix_sharing or args.max_tokens_per_batch:
        from csd_fast.attention import enable_packed_attention

        for m in (model, ref_model):
            if m is not None:
                enable_packed_attention(m)
    if args.fused and torch.cuda.is_available():
        for m in (model, ref_model):
            if m is not None:
                apply_liger_kernels(m)
    model.train()
    return model, ref_model


def prepare_reference(ref_model: nn.Module, args) -> nn.Module:
    """A reference loaded later (lazily, by path) made ready as `prepare_models` would."""
    from csd_fast.quantization import is_quantized, pin_train_mode

    freeze(ref_model)
    if is_quantized(ref_model):  # bitsandbytes' eval path differs on CPU: as the eager one
        pin_train_mode(ref_model)
    if args.disable_dropout:
        disable_dropout(ref_model)
    if args.padding_free or args.prefix_sharing or args.max_tokens_per_batch:
        from csd_fast.attention import enable_packed_attention

        enable_packed_attention(ref_model)
    if args.fused and torch.cuda.is_available():
        apply_liger_kernels(ref_model)
    return ref_model


def apply_liger_kernels(model: nn.Module) -> bool:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels (GPU only; not the LM head).

    The LM head stays ours (the fused log-prob kernel), so Liger's fused linear cross-entropy is
    always off. Returns False, with a warning, where Liger is missing or lacks the architecture.
    """
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        warnings.warn(
            "fused=True on GPU: liger-kernel is not installed, layers stay eager", stacklevel=2
        )
        return False
    from csd_fast.forward import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    if lm.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        # Liger itself only logs and returns here; say it where a user will see it
        warnings.warn(
            f"Liger has no kernels for {lm.config.model_type!r}: layers stay eager", stacklevel=2
        )
        return False
    try:
        _apply_liger_kernel_to_instance(
            model=lm, fused_linear_cross_entropy=False, cross_entropy=False
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        warnings.warn(f"Liger kernels not applied to {lm.config.model_type}: {e}", stacklevel=2)
        return False
    return True
