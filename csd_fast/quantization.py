"""QLoRA: a bitsandbytes 4-bit / 8-bit base model under a trainable PEFT adapter, as TRL 1.16.

    init = quantized_init_kwargs(model, args, quantization_config)  # from_pretrained extras
    check_quantized_policy(model, peft_config)   # an adapter to train, a full-precision lm_head
    model = get_peft_model(...); adapters_to_bf16(model)   # TRL's QLoRA adapter dtype
    pin_train_mode(model)                        # bnb layers: one numeric path
    check_distributed(model, config, dist, args) # torchrun: what FSDP2 + bnb cannot do
    quantized_params(model)                      # FSDP2's ignored_params (the bnb weights)
    quantization_key(model)                      # the reference-cache component (None: none)

The rules follow trl/trainer/dpo_trainer.py (1.16): `quantization_config` is a trainer argument
or `model_init_kwargs["quantization_config"]` (not both), only for a model given by path; a
quantized model trains only through an adapter (transformers' `validate_quantization_for_training`
refuses a bare one); the trainable adapter weights are cast to bf16 after `get_peft_model` (the
QLoRA paper's choice; DoRA's magnitude vector stays fp32); the reference is the quantized base
with the adapter disabled (no second copy). bitsandbytes is imported only when quantization is
asked for, so csd-fast imports and trains without it.

The LM head must stay full precision: every head implementation (eager and fused) reads
`lm_head.weight` as a matrix, which bnb keeps unquantized unless `llm_int8_skip_modules` is set
without it. Under torchrun (FSDP2) the quantized weights are kept out of the sharding, whole on
every rank, and everything else shards as in LoRA (csd_fast/distributed/fsdp.py). Tests:
tests/test_qlora.py, tests/test_qlora_trl.py, tests/distributed/test_qlora_fsdp.py.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

INSTALL_HINT = "pip install 'csd-fast[qlora]' (or bitsandbytes>=0.46)"


def requested_config(args, quantization_config=None, model=None):
    """The quantization config asked for: the trainer argument, else model_init_kwargs' (read,
    as TRL reads them, only for a model given by path), else the one a checkpoint given by path
    was saved with (a pre-quantized `*-bnb-4bit` model)."""
    if quantization_config is not None:
        return quantization_config
    if model is not None and not isinstance(model, str):
        return None
    kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    if kwargs.get("quantization_config") is not None or model is None:
        return kwargs.get("quantization_config")
    return saved_config(model, args)


def saved_config(path: str, args):
    """The quantization_config in a local checkpoint's config.json, if any (no weights read)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():  # a Hub id: transformers reads it when it loads
        return None
    try:
        return json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def quantized_init_kwargs(model, args, quantization_config) -> dict:
    """Extra from_pretrained kwargs for the policy (and a reference given by path), TRL's checks."""
    in_kwargs = isinstance(args.model_init_kwargs, dict) and (
        args.model_init_kwargs.get("quantization_config") is not None
    )
    if quantization_config is None:
        return {}
    if not isinstance(model, str):
        raise ValueError(
            "You passed `quantization_config` to the trainer, but your model is already "
            "instantiated. Quantization can only be applied when the model is loaded from a model "
            "identifier (`str`). Either pass the model as a model identifier, or omit "
            "`quantization_config`."
        )
    if in_kwargs:
        raise ValueError(
            "You set `quantization_config` both as a trainer argument and in "
            "`args.model_init_kwargs`. Please set it in only one place, preferably as a trainer "
            "argument."
        )
    return {"quantization_config": quantization_config}


def bnb_config(config):
    """A `BitsAndBytesConfig` from one or its dict form (a YAML / JSON `model_init_kwargs`),
    with bitsandbytes checked first: a clear error where it is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"quantization_config needs bitsandbytes: {INSTALL_HINT}") from e
    from transformers import BitsAndBytesConfig

    given = config.get("quant_method") if isinstance(config, dict) else (
        getattr(config, "quant_method", "bitsandbytes"))  # fmt: skip
    method = str(getattr(given, "value", given) or "bitsandbytes")
    method = method.removeprefix("QuantizationMethod.").lower()
    if method not in ("bitsandbytes", "bits_and_bytes"):  # GPTQ, AWQ, torchao, HQQ, ...
        raise NotImplementedError(
            f"quantization_config quant_method {given!r}: csd-fast trains bitsandbytes 4-bit / "
            "8-bit bases (QLoRA) only"
        )
    if isinstance(config, dict):
        return BitsAndBytesConfig.from_dict(dict(config))
    return config


def default_device_map(args):
    """bnb quantizes as weights reach their device, so on a GPU the load names it (one process:
    the current device); on the CPU the weights are quantized where they load."""
    if torch.cuda.is_available() and not getattr(args, "use_cpu", False):
        return {"": torch.cuda.current_device()}
    return None


def is_quantized(model: nn.Module | None) -> bool:
    """A bitsandbytes-quantized model, or a PEFT model over one (PeftModel forwards attributes)."""
    if model is None:
        return False
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def is_quantized_tensor(t) -> bool:
    return type(t).__name__ in ("Params4bit", "Int8Params") or not t.dtype.is_floating_point


def check_quantized_policy(model: nn.Module, peft_config) -> None:
    """A quantized policy needs an adapter to train and a full-precision output head."""
    if not is_quantized(model):
        return
    if peft_config is None and not hasattr(model, "peft_config"):
        raise ValueError(
            "You cannot perform fine-tuning on purely quantized models. Please attach trainable "
            "adapters on top of the quantized model to correctly perform fine-tuning: pass "
            "peft_config (e.g. peft.LoraConfig) or a PeftModel (QLoRA)."
        )
    from csd_fast.forward import unwrap_causal_lm

    head = unwrap_causal_lm(model).get_output_embeddings()
    head = getattr(head, "base_layer", head)
    weight = getattr(head, "weight", None)
    if weight is not None and is_quantized_tensor(weight):
        raise ValueError(
            f"the LM head ({type(head).__name__}) is quantized: csd-fast's log-prob head reads "
            "lm_head.weight as a full-precision matrix. Leave it unquantized: omit "
            "`llm_int8_skip_modules` (bitsandbytes then skips the output head) or list "
            '"lm_head" in it.'
        )


def check_trainable_patterns(model: nn.Module, patterns: list[str] | None) -> None:
    """`trainable_params` may not name quantized weights: they have no gradient to train on."""
    if not patterns or not is_quantized(model):
        return
    compiled = [re.compile(p) for p in patterns]
    hits = [n for n, p in model.named_parameters()
            if is_quantized_tensor(p) and any(c.search(n) for c in compiled)]  # fmt: skip
    if hits:
        raise ValueError(
            f"trainable_params {patterns} match {len(hits)} quantized weight(s) (e.g. {hits[0]}): "
            "4-bit / 8-bit weights cannot be trained; match the adapter's parameters instead "
            "(e.g. r'lora_')"
        )


def adapters_to_bf16(model: nn.Module) -> None:
    """TRL's QLoRA step: trainable adapter weights in bf16, DoRA's magnitude vector excepted
    (its updates can be smaller than bf16 resolves, which would freeze it)."""
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)


def pin_train_mode(model: nn.Module | None) -> None:
    """Keep bitsandbytes' layers on their training path in every pass (reference, evaluation).

    On the CPU their eval mode computes differently: a `Linear4bit` (AVX512-BF16 CPUs) rewrites
    its weight, for good, into an inference layout whose matmul has no backward, so the training
    passes after it get no gradient through the base layers; a `Linear8bitLt` switches from the
    dequantized matmul to int8 activations, so a reference pass in eval mode would score other
    log-probs than the policy it stands for (nonzero rewards at step 0). TRL's reference passes
    run in training mode, which this keeps. On a GPU both modes share one kernel: no change."""
    if model is None:
        return
    import bitsandbytes as bnb

    for module in model.modules():
        cls = type(module)
        if (
            isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
            and cls not in _PINNED.values()
        ):
            if cls not in _PINNED:
                _PINNED[cls] = type(f"TrainMode{cls.__name__}", (cls,), {"train": _stay_training})
            module.__class__ = _PINNED[cls]
            module.training = True


_PINNED: dict[type, type] = {}


def _stay_training(self, mode: bool = True):
    self.training = True  # a leaf: no children to pass `mode` on to
    return self


def check_distributed(model: nn.Module | None, config, dist, args) -> None:
    """QLoRA under torchrun: what the FSDP2 layout (`quantized_params`) cannot do is refused.

    The quantized base is kept out of the sharding (each rank holds it whole: 0.5 byte per
    parameter in 4-bit, 1 in 8-bit) and only the trainable and full-precision weights are
    sharded. CPU offload would move those (the small part) and leave the base on the device,
    where bitsandbytes placed it at load: refused rather than promised."""
    if not dist.distributed or (config is None and not is_quantized(model)):
        return
    from csd_fast.distributed.hf_options import as_bool

    fsdp = getattr(args, "fsdp_config", None) or {}
    if as_bool(fsdp.get("cpu_offload", False), "cpu_offload"):
        raise NotImplementedError(
            "fsdp_config cpu_offload with quantization_config (QLoRA under torchrun): the "
            "4-bit / 8-bit base is not sharded by FSDP2 and stays where bitsandbytes loaded it, "
            "so offloading would move only the adapters' shards; drop cpu_offload (a 4-bit 8B "
            "base takes about 4.5 GB per device)"
        )


def quantized_params(module: nn.Module) -> set[nn.Parameter]:
    """The bitsandbytes weights (Params4bit / Int8Params) FSDP2 leaves alone (`ignored_params`):
    frozen, whole on every rank, never all-gathered or reduced. Their packed storage and
    quant_state (absmax blocks, the code table) stay bitsandbytes' own objects, which sharding
    the packed bytes would have to rebuild after every all-gather."""
    return {p for p in module.parameters() if is_quantized_tensor(p)}


def quantized_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantized base: the packed weights and their quant_state entries
    (`weight.absmax`, `weight.quant_map`, ..., 8-bit's `SCB` / `weight_format`). A checkpoint
    leaves them out: the base is reloaded (and quantized again, deterministically) from its
    path, as the single-process QLoRA checkpoint (an adapter directory) also expects."""
    kept = {n for n, p in model.named_parameters() if not is_quantized_tensor(p)}
    kept |= {n for n, b in model.named_buffers()}
    return {k for k in model.state_dict() if k not in kept}


def quantization_key(model: nn.Module | None, config=None) -> str | None:
    """The reference's quantization as the cache key sees it (None: full precision).

    The weight hash alone would tell 4-bit from full precision, but not compute dtypes, and not a
    reference given by path (hashed from its files); this names the whole config."""
    if config is None and is_quantized(model):
        from csd_fast.forward import unwrap_causal_lm

        config = getattr(unwrap_causal_lm(model).config, "quantization_config", None)
    if config is None:
        return None
    if isinstance(config, dict):  # the dict form and the object give the same key
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(dict(config))
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    return json.dumps(fields, sort_keys=True, default=lambda v: getattr(v, "value", str(v)))
