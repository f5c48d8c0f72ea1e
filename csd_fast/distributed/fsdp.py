"""FSDP2 (`torch.distributed.fsdp.fully_shard`) wrapping of the policy and the live reference.

    scorer = shard_model(PairScorer(model), env, FsdpOptions.from_args(args, env))

Units, innermost first (what torchtitan and torchtune do for decoder LMs):
  1. every decoder layer (the classes the model lists in `_no_split_modules`);
  2. the output head when it is not tied to the input embeddings: its forward is the log-prob
     kernel (`csd_fast.forward.LogprobHead`), so the (V, H) weight is gathered once per call;
  3. the `PairScorer` root: embeddings, final norm, a tied head, anything left.
Mixed precision is bf16 parameters and compute with fp32 gradient reduce-scatter by default
(`fsdp_config={"param_dtype": ..., "reduce_dtype": ...}`), CPU offload with
`fsdp_config={"cpu_offload": true}`. Frozen parameters (LoRA, attention-only training, the
reference) shard like the rest; FSDP2 keeps them out of the gradient reduce. A bitsandbytes
4-bit base (QLoRA) shards its packed bytes too; 8-bit weights (and 4-bit ones whose storage
dtype is not the compute dtype) are FSDP2's `ignored_params`, whole on every rank. Under tensor
parallelism (`tp_size`, tensor_parallel.py) the model's tp_plan is applied first and these
units are sharded over the mesh's dp dimension (a 2-D mesh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from csd_fast.distributed.env import DistEnv

FSDP_CONFIG_KEYS = {
    "cpu_offload": "offload parameters, gradients and optimizer state to CPU memory",
    "reshard_after_forward": "free gathered layer weights after forward (ZeRO-3; default true)",
    "param_dtype": "compute dtype of gathered parameters (default bfloat16 with bf16 on GPU)",
    "reduce_dtype": "gradient reduce-scatter dtype (default float32)",
    "async_checkpoint": "write DCP checkpoints in a background thread (published when done)",
    "dp_replicate_size": "HSDP replica groups (an int, 'node': one per node, 'all': no_shard)",
    "dp_shard_size": "ranks per shard group; checked against world / dp_replicate_size",
    "layer_classes": "class names of the units to wrap (default: the model's _no_split_modules)",
    "meta_init": "other ranks build a model given by path on meta, rank 0 sends it (default)",
    "sync_module_states": "send rank 0's weights to every rank after sharding (any model)",
    "tp_size": "tensor-parallel ranks per model replica (tensor_parallel.py; default 1)",
}


@dataclass(frozen=True)
class FsdpOptions:
    param_dtype: torch.dtype | None = None  # None: the parameters' own dtype
    reduce_dtype: torch.dtype | None = torch.float32
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    replicas: int = 1  # > 1: HSDP, the mesh (replicas, world // replicas)
    layer_classes: tuple[str, ...] | None = None  # None: the model's _no_split_modules
    sync_module_states: bool = False

    @classmethod
    def from_args(cls, args, env: DistEnv) -> FsdpOptions:
        import os

        from csd_fast.distributed.hf_options import as_bool, layer_list, mesh_shape

        cfg = dict(getattr(args, "fsdp_config", None) or {})
        unknown = sorted(set(cfg) - set(FSDP_CONFIG_KEYS))
        if unknown:
            known = ", ".join(sorted(FSDP_CONFIG_KEYS))
            raise ValueError(f"fsdp_config: unknown key(s) {unknown}; known: {known}")
        # bf16 / fp16 compute on accelerators as autocast would give (fp16 with a GradScaler,
        # trl_compat.fp16_scaler); CPU runs keep the weights' dtype, as accelerate does
        default_param = None
        if env.device.type == "cuda" and (args.bf16 or args.fp16):
            default_param = torch.float16 if args.fp16 else torch.bfloat16
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.processes))
        replicas, _ = mesh_shape(cfg, env.processes, local_world)
        classes = layer_list(cfg["layer_classes"]) if cfg.get("layer_classes") else None
        flag = lambda key, default: as_bool(cfg.get(key, default), key)  # noqa: E731
        return cls(
            param_dtype=_dtype(cfg.get("param_dtype"), default_param),
            reduce_dtype=_dtype(cfg.get("reduce_dtype"), torch.float32),
            cpu_offload=flag("cpu_offload", False),
            reshard_after_forward=flag("reshard_after_forward", True),
            replicas=replicas,
            layer_classes=tuple(classes) if classes else None,
            sync_module_states=flag("sync_module_states", False),
        )


def _dtype(value, default: torch.dtype | None) -> torch.dtype | None:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(value, value)
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"fsdp_config: {value!r} is not a torch dtype")
    return dtype


def decoder_layers(model: nn.Module, classes: tuple[str, ...] | None = None) -> list[nn.Module]:
    """The decoder blocks, by the classes HF lists as never to be split across devices (or
    the class names given, transformers' transformer_layer_cls_to_wrap)."""
    names = set(classes or ())
    if classes:
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise ValueError(f"fsdp_config layer_classes {sorted(names)}: no such module in "
                             f"{type(model).__name__}")  # fmt: skip
        return layers
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # no declaration: the longest ModuleList is the layer stack
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    return layers


def head_is_tied(lm: nn.Module) -> bool:
    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    weight = getattr(getattr(head, "base_layer", head), "weight", None)
    return weight is not None and weight is getattr(embed, "weight", None)


def shard_model(
    scorer: nn.Module, env: DistEnv, opts: FsdpOptions, keep_whole=frozenset()
) -> nn.Module:
    """fully_shard the layers, the untied head and the scorer root, in place; returns the root.
    `keep_whole`: parameters left unsharded (a reference's quantized weights that the policy,
    sharded first, shares)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from csd_fast.forward import install_logprob_head, unwrap_causal_lm

    model = scorer.model
    if env.mesh is not None:  # tensor parallelism first, then FSDP2 over dp: a 2-D mesh
        from csd_fast.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, env.mesh["tp"])
        mesh = env.mesh["dp"]
    elif opts.replicas == 1:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    else:  # HSDP: reduce-scatter within a shard group, all-reduce across the replicas
        shape = (opts.replicas, env.world_size // opts.replicas)
        mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard"))
    from csd_fast.quantization import quantized_params

    whole = quantized_params(scorer, opts.param_dtype, keep_whole)
    unsharded_4bit = [p for p in whole if type(p).__name__ == "Params4bit" and p not in keep_whole]
    if unsharded_4bit and env.is_main:
        import warnings

        warnings.warn(
            f"QLoRA under torchrun: the 4-bit base stays whole on every rank, its packed "
            f"{unsharded_4bit[0].dtype} storage not being FSDP2's {opts.param_dtype} compute "
            f"dtype; set bnb_4bit_quant_storage='{str(opts.param_dtype).removeprefix('torch.')}' "
            "in quantization_config to shard it",
            UserWarning,
            stacklevel=2,
        )
    kwargs = {
        "mesh": mesh,
        # bitsandbytes weights FSDP2 cannot gather (csd_fast.quantization.quantized_params)
        "ignored_params": whole,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=opts.param_dtype, reduce_dtype=opts.reduce_dtype
        ),
        "offload_policy": CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy(),
    }
    lm = unwrap_causal_lm(model)
    head = install_logprob_head(model)  # before fully_shard swaps the class once more

    def shard(unit: nn.Module, reshard: bool) -> None:
        for odd in odd_dtype_modules(unit):  # their own units first: one dtype per unit
            fully_shard(odd, reshard_after_forward=reshard, **kwargs)
        fully_shard(unit, reshard_after_forward=reshard, **kwargs)

    for layer in decoder_layers(lm, opts.layer_classes):
        shard(layer, opts.reshard_after_forward)
    if not head_is_tied(lm):
        shard(head, opts.reshard_after_forward)
    # the root's weights are needed again right away in backward: keep them gathered
    shard(scorer, False)
    return scorer


def odd_dtype_modules(unit: nn.Module) -> list[nn.Module]:
    """Modules of `unit` holding trainable weights of another dtype than most of its trainable
    weights: FSDP2 requires one dtype across a unit's trainable parameters (it reduces their
    gradients in one buffer), and QLoRA mixes them (TRL's bf16 LoRA A/B beside DoRA's fp32
    magnitude vectors, or an fp32 norm switched on by trainable_params). Each such module
    becomes its own unit; it must be one whose forward runs (FSDP2 gathers on that call)."""
    from torch.distributed.fsdp import FSDPModule

    owners: dict[int, tuple[nn.Module, str, torch.dtype]] = {}
    sizes: dict[torch.dtype, int] = {}
    stack = [("", unit)]
    while stack:  # the modules of this unit, not of units sharded before it
        prefix, module = stack.pop()
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners[id(p)] = (module, prefix + name, p.dtype)
                sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        stack += [(f"{prefix}{n}.", c) for n, c in module.named_children()
                  if not isinstance(c, FSDPModule)]  # fmt: skip
    if len(sizes) <= 1:
        return []
    main = max(sizes, key=sizes.get)
    odd = []
    for module, name, dtype in owners.values():
        if dtype == main or any(module is m for m in odd):
            continue
        mixed = {p.dtype for p in module.parameters() if p.requires_grad}
        if type(module).forward is nn.Module.forward or len(mixed) > 1:
            raise ValueError(
                f"{type(unit).__name__}: trainable weights in {sorted(map(str, sizes))} "
                f"(e.g. {name}, {dtype}) where FSDP2 needs one dtype per unit, and "
                f"{type(module).__name__} cannot be a unit of its own; give the trainable "
                "weights one dtype"
            )
        odd.append(module)
    return odd


def rank0_source(scorer: nn.Module, env: DistEnv) -> dict | None:
    """Before sharding, rank 0's whole tensors by name (parameters and every buffer, persistent
    or not): what `broadcast_from_rank0` sends; None on the other ranks. References, not
    copies: rank 0 holds one full model, as it did before sharding."""
    if not env.is_main:
        return None
    source = dict(scorer.state_dict())
    source.update(dict(scorer.named_buffers()))
    return source


def broadcast_from_rank0(scorer: nn.Module, source: dict | None, env: DistEnv) -> None:
    """Fill a sharded model that only rank 0 loaded: the other ranks built it on the meta
    device (no weights read, no host copy), get storage for their shards here, and receive
    rank 0's values, one parameter at a time (peak: one full weight). A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # the same names, shapes and dtypes on every rank, or the collectives below would hang
    layout = [(n, tuple(t.shape), str(t.dtype)) for n, t in _tensors(scorer)]
    layouts = env.all_gather_objects(layout)
    for rank, other in enumerate(layouts):
        if other != layouts[0]:
            first = next((a, b) for a, b in zip(layouts[0], other, strict=False) if a != b)
            raise RuntimeError(
                f"rank {rank} built the model unlike rank 0 (first difference: rank 0 has "
                f"{first[0]}, rank {rank} {first[1]}); set CSD_FSDP_META_INIT=0 to load the "
                "weights on every rank instead"
            )
    if not env.is_main and any(t.is_meta for _, t in _tensors(scorer)):
        # storage for the meta-built shards; a model that has its own (sync_module_states, or
        # one on the host for CPU offload) keeps it and is overwritten in place
        scorer.to_empty(device=env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    keys = list(scorer.state_dict())
    weights = {k: source[k] for k in keys} if env.is_main else {}
    set_model_state_dict(scorer, weights, options=options)
    # non-persistent buffers (e.g. rotary inv_freq) are in no state dict: sent as they are
    for name, buf in scorer.named_buffers():
        if name not in keys:
            if env.is_main:
                buf.copy_(source[name])
            dist.broadcast(buf, src=0)


def _tensors(module: nn.Module):
    """(name, tensor) of every parameter (its global shape when sharded) and buffer."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it in order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module, *, to_cpu: bool = True, keep: bool = True) -> dict:
    """name -> full tensor on every rank (or on none when keep=False, for a rank that only
    takes part in the gathers); one tensor at a time so peak memory is one full weight."""
    out = {}
    for name, t in model.state_dict().items():
        full = full_tensor(t.detach())
        if keep:
            out[name] = full.cpu() if to_cpu else full
    return out
