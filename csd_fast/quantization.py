"""QLoRA: a bitsandbytes 4-bit / 8-bit base model under a trainable PEFT adapter, as TRL 1.16.

    init = quantized_init_kwargs(model, args, quantization_config)  # from_pretrained extras
    check_quantized_policy(model, peft_config)   # an adapter to train, a full-precision lm_head
    model = get_peft_model(...); adapters_to_bf16(model)   # TRL's QLoRA adapter dtype
    pin_train_mode(model)                        # bnb layers: one numeric path
    check_distributed(model, config, dist, args) # torchrun: what FSDP2 + bnb cannot do
    quantized_params(scorer, param_dtype)        # FSDP2's ignored_params (bnb weights kept whole)
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
without it. Under torchrun (FSDP2) 4-bit weights shard like any frozen weight (bitsandbytes
re-attaches their quant_state after each all-gather); 8-bit ones stay whole on every rank
(`quantized_params`); everything else shards as in LoRA (csd_fast/distributed/fsdp.py). Tests:
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

    CPU offload would move the adapters' shards (the small part) and leave an 8-bit base, or a
    4-bit one FSDP2 keeps whole, on the device where bitsandbytes put it; sync_module_states
    would broadcast bnb's packed tensors through a state dict they are not fully in. Every
    rank loads and quantizes the same base itself instead."""
    if not dist.distributed or (config is None and not is_quantized(model)):
        return
    from csd_fast.distributed.hf_options import as_bool

    fsdp = getattr(args, "fsdp_config", None) or {}
    for key, why in (
        ("cpu_offload", "bitsandbytes keeps its quantized weights where it loaded them, so "
                        "offloading would move only the adapters' shards"),
        ("sync_module_states", "every rank loads and quantizes the same base itself (a "
                               "PeftModel passed in must be built alike on every rank)"),
    ):  # fmt: skip
        if as_bool(fsdp.get(key, False), key):
            raise NotImplementedError(
                f"fsdp_config {key} with quantization_config (QLoRA under torchrun): {why}; "
                f"drop {key}"
            )


def bnb_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bitsandbytes Linear4bit / Linear8bitLt, sharded or not."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def quantized_params(
    module: nn.Module, param_dtype: torch.dtype | None = None, keep_whole=frozenset()
) -> set[nn.Parameter]:
    """The bitsandbytes weights FSDP2 must leave alone (`ignored_params`: whole on every rank,
    never all-gathered or reduced). 4-bit weights shard: FSDP2 all-gathers their packed bytes
    like any frozen tensor, and `Linear4bit.forward` re-wraps the gathered tensor as a
    `Params4bit` with the quant_state the module keeps (bitsandbytes' own FSDP path; the absmax
    blocks stay whole, 1/16 byte per weight). That needs the packed storage's dtype to be
    FSDP2's compute dtype (`bnb_4bit_quant_storage`, as FSDP1 + QLoRA needs), or no cast at
    all: FSDP2 would otherwise convert the packed bytes as numbers. Kept whole: 8-bit weights
    (their row scales live on the Int8Params, which a gather would lose), 4-bit ones of another
    storage dtype, and `keep_whole` (weights a frozen reference copy shares with the policy)."""
    if not any(is_quantized_tensor(p) for p in module.parameters()):
        return set()  # bitsandbytes is never imported for a full-precision model
    whole = set()
    for _, layer in bnb_layers(module):
        weight = layer.weight
        four_bit = type(weight).__name__ == "Params4bit"
        if four_bit and param_dtype in (None, weight.dtype) and weight not in keep_whole:
            layer.quant_state = weight.quant_state  # what the forward re-attaches after a gather
            layer.quant_storage = weight.dtype
        else:
            whole.add(weight)
    return whole | {p for p in module.parameters() if p in keep_whole}


def quantized_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantized base: the packed weights (sharded or whole) and their
    quant_state entries (`weight.absmax`, `weight.quant_map`, ..., 8-bit's `SCB` /
    `weight_format`). A checkpoint leaves them out: the base is reloaded (and quantized again,
    deterministically) from its path, as a single-process QLoRA checkpoint also expects."""
    prefixes = [f"{name}.weight" for name, _ in bnb_layers(model)]
    extras = {f"{name}.{k}" for name, _ in bnb_layers(model) for k in ("SCB", "weight_format")}
    return {k for k in model.state_dict()
            if k in extras or any(k == p or k.startswith(p + ".") for p in prefixes)}  # fmt: skip


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
