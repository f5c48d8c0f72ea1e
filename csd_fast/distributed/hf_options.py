"""transformers' and accelerate's distributed options, read as csd-fast's own FSDP2 options.

    cfg = DPOConfig(output_dir="out", fsdp="hybrid_shard auto_wrap",
                    fsdp_config={"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    cfg.fsdp_config  # {'reshard_after_forward': True, 'dp_replicate_size': 'node',
                     #  'layer_classes': ['LlamaDecoderLayer']}

A TRL script sets FSDP through transformers' words (`fsdp="full_shard offload"`), transformers'
`fsdp_config` keys (with or without their `fsdp_` prefix), accelerate's `ParallelismConfig`
(`parallelism_config`) or a DeepSpeed ZeRO config (`deepspeed`, see deepspeed_config.py). Each
is translated here, once, at config time, into the keys of `fsdp.FSDP_CONFIG_KEYS`; the engine
reads only those. Where an option has no meaning under FSDP2 (an FSDP1 knob whose behaviour FSDP2
always has) it is accepted and named in `FSDP1_ONLY`; where csd-fast cannot do what it asks
(size-based wrapping, context / sequence parallelism, XLA) it raises NotImplementedError naming
the option. Nothing is ignored silently.

Sharding layouts (FSDP2's HSDP when the mesh has two dimensions):
    full_shard / shard_grad_op   mesh (world,)                 every rank holds 1/world
    hybrid_shard[_zero2]         mesh (nodes, ranks per node)  shard in a node, replicate across
    no_shard                     mesh (world, 1)               whole copies, gradients all-reduced
    dp_replicate_size=R          mesh (R, world / R)           accelerate's dp_replicate_size
"""

from __future__ import annotations

import warnings

# transformers' `fsdp` words -> csd-fast fsdp_config keys
FSDP_WORDS = {
    "full_shard": {"reshard_after_forward": True},
    "shard_grad_op": {"reshard_after_forward": False},
    "hybrid_shard": {"reshard_after_forward": True, "dp_replicate_size": "node"},
    "hybrid_shard_zero2": {"reshard_after_forward": False, "dp_replicate_size": "node"},
    "no_shard": {"dp_replicate_size": "all"},
    "offload": {"cpu_offload": True},
    "auto_wrap": {},  # csd-fast always wraps each decoder layer
}
LAYOUT_WORDS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
# FSDP1 knobs whose behaviour FSDP2 always has, so any value gives the same training
FSDP1_ONLY = {
    "backward_prefetch": "FSDP2 prefetches the next unit's all-gather in backward",
    "forward_prefetch": "FSDP2 overlaps the next unit's all-gather with compute",
    "limit_all_gathers": "FSDP2 bounds in-flight all-gathers by its stream design",
    "use_orig_params": "FSDP2 keeps every original parameter (as a DTensor)",
}
# transformers' fsdp_config keys with a csd-fast counterpart (renamed or converted below)
_RENAMED = {
    "offload_params": "cpu_offload",
    "transformer_layer_cls_to_wrap": "layer_classes",
    "cpu_ram_efficient_loading": "meta_init",
}
_REFUSED = {
    "min_num_params": "size-based wrapping: csd-fast wraps each decoder layer "
    "(transformer_layer_cls_to_wrap names the classes)",
    "xla": "XLA / TPU FSDP",
    "xla_fsdp_settings": "XLA / TPU FSDP",
    "xla_fsdp_grad_ckpt": "XLA / TPU FSDP",
    "compute_dtype": "XLA FSDP's dtypes (use param_dtype / reduce_dtype)",
    "buffer_dtype": "XLA FSDP's dtypes (use param_dtype / reduce_dtype)",
}


BOOL_KEYS = ("cpu_offload", "reshard_after_forward", "meta_init", "sync_module_states",
             "async_checkpoint")  # fmt: skip
# FSDP1's sharding strategies (FULL_SHARD, ..., and torch's _HYBRID_SHARD_ZERO2), given where
# FSDP2 has reshard_after_forward: the same layouts as transformers' words
_STRATEGIES = {w.upper(): FSDP_WORDS[w] for w in LAYOUT_WORDS}
_STRATEGIES["_HYBRID_SHARD_ZERO2"] = FSDP_WORDS["hybrid_shard_zero2"]


def as_bool(value, key: str) -> bool:
    """A config boolean, also as text ("false", "0", "no"...), as transformers' str_to_bool."""
    if isinstance(value, bool | int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on", "t"):
        return True
    if text in ("0", "false", "no", "n", "off", "f", "none", ""):
        return False
    raise ValueError(f"fsdp_config.{key}={value!r} is not a boolean")


def fsdp_words_config(fsdp) -> dict:
    """transformers' `fsdp` words ("full_shard auto_wrap offload", or a list of them, or
    FSDPOption members; `True` is full_shard, as transformers 5 reads it) as csd-fast keys."""
    if fsdp is True:
        fsdp = "full_shard"
    words = fsdp.split() if isinstance(fsdp, str) else list(fsdp or [])
    words = [str(getattr(w, "value", w)) for w in words]
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown:
        raise NotImplementedError(
            f"DPOConfig.fsdp={unknown} is not supported: csd-fast's FSDP2 knows "
            f"{', '.join(FSDP_WORDS)}"
        )
    layouts = [w for w in words if w in LAYOUT_WORDS]
    if len(layouts) > 1:
        raise ValueError(f"DPOConfig.fsdp: choose one sharding strategy, got {layouts}")
    mapped: dict = {}
    for w in words:
        mapped.update(FSDP_WORDS[w])
    return mapped


def transformers_fsdp_config(cfg: dict, known: set[str]) -> tuple[dict, bool]:
    """transformers' fsdp_config keys (prefix `fsdp_` optional) as csd-fast keys; csd-fast's own
    keys pass through. Returns (config, activation_checkpointing asked for)."""
    out: dict = {}
    checkpointing = False
    for key, value in cfg.items():
        name = key if key in known else key.removeprefix("fsdp_")
        name = _RENAMED.get(name, name)  # transformers' name of one of csd-fast's keys
        if name == "reshard_after_forward" and str(value).upper() in _STRATEGIES:
            out.update(_STRATEGIES[str(value).upper()])  # an FSDP1 sharding strategy's name
        elif name in BOOL_KEYS:
            out[name] = as_bool(value, key)
        elif name == "layer_classes":
            out[name] = layer_list(value)
        elif name in known:
            out[name] = value
        elif name in ("version", "fsdp_version"):
            if int(value) not in (1, 2):
                raise ValueError(f"fsdp_config.{key}={value!r}: FSDP versions are 1 and 2")
            if int(value) == 1:
                warnings.warn("fsdp_config.version=1: csd-fast shards with FSDP2 (fully_shard); "
                              "the training is the same", UserWarning, stacklevel=4)  # fmt: skip
        elif name == "activation_checkpointing":
            checkpointing = as_bool(value, key)
        elif name == "auto_wrap_policy":
            if str(value).upper() not in ("TRANSFORMER_BASED_WRAP", "NONE"):
                raise NotImplementedError(
                    f"fsdp_config.{key}={value!r}: csd-fast wraps each decoder layer "
                    "(TRANSFORMER_BASED_WRAP)"
                )
        elif name == "state_dict_type":
            if str(value).upper() not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
                raise ValueError(f"fsdp_config.{key}={value!r}: unknown state dict type")
            # checkpoints are always DCP-sharded (resumable at any world size) and save_model
            # always writes one full HF model: what either type gives a user, with no choice
        elif name in FSDP1_ONLY:
            pass  # see FSDP1_ONLY: the same training whatever the value
        elif name in _REFUSED or name == "xla_fsdp_v2":
            if value not in (None, False, 0, {}, "", "false", "False"):  # transformers' defaults
                why = _REFUSED.get(name, "XLA / TPU FSDP")
                raise NotImplementedError(f"fsdp_config.{key}={value!r}: {why} is not supported")
        else:
            raise ValueError(
                f"fsdp_config: unknown key {key!r}; csd-fast's keys: {', '.join(sorted(known))}"
                f"; transformers' keys accepted: {', '.join(sorted(_TRANSFORMERS_KEYS))}"
            )
    return out, checkpointing


_TRANSFORMERS_KEYS = {*_RENAMED, *FSDP1_ONLY, "version", "activation_checkpointing",
                      "auto_wrap_policy", "state_dict_type", "sync_module_states", *_REFUSED,
                      "xla_fsdp_v2"}  # fmt: skip


def layer_list(value) -> list[str]:
    """Class names as a list ("A, B" as transformers writes them, or a list)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def parallelism_config(pc) -> dict:
    """accelerate's ParallelismConfig (or a dict of its fields) as csd-fast keys: data-parallel
    replicate x shard and tensor parallelism (tp_size); context and sequence parallelism are
    refused."""
    if pc is None:
        return {}
    fields = pc if isinstance(pc, dict) else vars(pc)
    if all((fields.get(n) or 1) == 1 for n in ("dp_replicate_size", "dp_shard_size")):
        fields = {
            k: v for k, v in fields.items() if k not in ("dp_replicate_size", "dp_shard_size")
        }
    for name, what in (("cp_size", "context"), ("sp_size", "sequence")):
        if (fields.get(name) or 1) > 1:
            raise NotImplementedError(
                f"parallelism_config.{name}={fields[name]}: {what} parallelism is not supported "
                "(csd-fast has dp_replicate_size x dp_shard_size data parallelism and tp_size)"
            )
    out: dict = {}
    for name in ("dp_replicate_size", "dp_shard_size", "tp_size"):
        if fields.get(name) and (name != "tp_size" or int(fields[name]) > 1):
            out[name] = int(fields[name])
    return out


def parallelism_sizes(pc) -> dict | None:
    """The sizes a ParallelismConfig (or its dict) was given, as a plain dict (None if none)."""
    if pc is None:
        return None
    fields = pc if isinstance(pc, dict) else vars(pc)
    names = ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")
    return {n: fields[n] for n in names if fields.get(n) is not None}


def mesh_shape(cfg: dict | None, world: int, local_world: int) -> tuple[int, int]:
    """(replicas, ranks per shard group) of the FSDP2 mesh for `world` ranks, `local_world` of
    them per node. dp_shard_size, when given, must agree with the world size (divided by
    tp_size: tensor ranks of a replica hold the same data)."""
    cfg = cfg or {}
    tp = int(cfg.get("tp_size") or 1)
    if world % tp:
        raise ValueError(f"parallelism_config.tp_size={tp} does not divide the {world} ranks")
    world, local_world = world // tp, max(1, local_world // tp)
    value = cfg.get("dp_replicate_size", 1)
    if value == "node":
        if world % local_world:
            raise ValueError(f"hybrid_shard: {world} ranks are not whole nodes of {local_world}")
        replicas = world // local_world
    elif value == "all":
        replicas = world
    else:
        replicas = int(value)
    if replicas < 1 or world % replicas:
        raise ValueError(f"dp_replicate_size={value!r} does not divide the {world} ranks")
    shard = world // replicas
    want = cfg.get("dp_shard_size")
    if want not in (None, -1) and int(want) != shard:
        raise ValueError(
            f"dp_replicate_size x dp_shard_size = {replicas} x {want} != {world} ranks"
            + (f" (of {world * tp} / tp_size {tp})" if tp > 1 else "")
        )
    return replicas, shard


# accelerate's AcceleratorConfig fields (transformers' `accelerator_config`): what csd-fast does
# with each. The batches are built by csd-fast's own planner on every rank, so the data-loading
# switches change how rows reach a rank, never which pairs form a step.
ACCELERATOR_KEYS = {
    "split_batches": "per_device_*_batch_size is the global batch, split over the ranks",
    "dispatch_batches": "accepted: every rank plans the same global batches itself",
    "even_batches": "accepted: an uneven last batch gets zero-weight stand-ins, never repeats",
    "use_seedable_sampler": "accepted: the order is always seeded (data_seed, else seed)",
    "non_blocking": "accepted: host-to-device copies of pinned batches",
    "gradient_accumulation_kwargs": "num_steps sets gradient_accumulation_steps",
    "use_configured_state": "accepted: an initialised process group is reused",
}
_GA_KEYS = {"num_steps", "adjust_scheduler", "sync_with_dataloader", "sync_each_batch"}


def read_json_option(name: str, value) -> dict:
    """A dict option given as a JSON file's path (transformers' form), read and checked."""
    import json
    from pathlib import Path

    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{name}: {path} is not a JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: {path} is not valid JSON: {e}") from e


def accelerator_options(value) -> dict:
    """accelerator_config (a dict, accelerate's AcceleratorConfig, or a JSON file's path, as
    transformers takes it) as a plain dict of its set fields, checked."""
    import dataclasses
    from pathlib import Path

    if value is None:
        return {}
    if isinstance(value, str | Path):
        value = read_json_option("accelerator_config", value)
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    unknown = sorted(set(value) - set(ACCELERATOR_KEYS))
    if unknown:
        raise ValueError(f"accelerator_config: unknown key(s) {unknown}; known: "
                         f"{', '.join(ACCELERATOR_KEYS)}")  # fmt: skip
    ga = dict(value.get("gradient_accumulation_kwargs") or {})
    if set(ga) - _GA_KEYS:
        raise ValueError(f"accelerator_config.gradient_accumulation_kwargs: unknown key(s) "
                         f"{sorted(set(ga) - _GA_KEYS)}; known: {sorted(_GA_KEYS)}")  # fmt: skip
    # csd-fast steps the schedule once per optimizer step and ends an epoch's accumulation at
    # the epoch's end, as accelerate's defaults do; the other settings it cannot give
    for key in ("adjust_scheduler", "sync_with_dataloader"):
        if ga.get(key, True) is not True:
            raise NotImplementedError(
                f"accelerator_config.gradient_accumulation_kwargs.{key}={ga[key]!r} is not "
                "supported (only accelerate's default True)"
            )
    return dict(value)
