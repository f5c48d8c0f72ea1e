"""Tensor parallelism: the model's own tp_plan on a (dp, tp) device mesh, FSDP2 over dp.

    DPOConfig(..., parallelism_config=ParallelismConfig(dp_shard_size=2, tp_size=2))
    torchrun --nproc_per_node 4 train.py          # 2 data-parallel groups x 2 tensor ranks

The mesh is (dp, tp), tensor ranks adjacent (global rank = dp_rank * tp + tp_rank, so a tensor
group stays inside a node). What each part does, as torchtitan does it for decoder LMs:
  * decoder layers: transformers' `base_model_tp_plan` (Llama / Qwen2 / Mistral...: q, k, v,
    gate, up "colwise"; o, down "rowwise") applied with torch's `parallelize_module`: each rank
    holds heads/tp attention heads and intermediate/tp MLP columns; the layer's output is
    all-reduced, so hidden states between layers are whole (replicated) on every tensor rank;
  * the LM head: its (V, H) weight sharded over the vocabulary (Shard(0)); its log-probs come
    from `vocab_parallel.vocab_parallel_logprob` (no rank ever holds whole logits); a head tied
    to the input embeddings shards the embedding table alike (a vocab-parallel lookup);
  * embeddings, norms, biases of rowwise layers: replicated (identical on the tensor ranks);
  * then FSDP2 (`fsdp.shard_model`) shards every parameter over dp: a 2-D mesh.
Tensor ranks of one dp group see the same batches: the trainer's `DistEnv` is the data-parallel
view (`rank`, `world_size`, collectives over the dp group); `process_rank` is the job's rank.

Refused, naming the option: a model without a tp_plan or with a plan style other than
colwise / rowwise, tp_size not dividing the attention heads, key-value heads, MLP width or
vocabulary, cpu_offload, dp_replicate_size > 1 (HSDP x TP), a LoRA adapter on lm_head (LoRA
on the layers works) and DoRA, quantization, context / sequence parallelism.
Tests: tests/distributed/test_tensor_parallel.py.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from csd_fast.distributed.env import DistEnv


def tensor_parallel_size(args) -> int:
    return int((getattr(args, "fsdp_config", None) or {}).get("tp_size") or 1)


def check_tensor_parallel_args(args) -> None:
    """Config-time refusals for what does not combine with tp_size > 1 (field named)."""
    tp = tensor_parallel_size(args)
    if tp == 1:
        return
    cfg = args.fsdp_config or {}
    refused = {
        "fsdp_config.cpu_offload": cfg.get("cpu_offload"),
        "fsdp_config.dp_replicate_size (HSDP)": cfg.get("dp_replicate_size") not in (None, 1),
    }
    for name, on in refused.items():
        if on:
            raise NotImplementedError(f"{name} with tensor parallelism (tp_size={tp}) is not "
                                      "supported")  # fmt: skip


def tensor_parallel_env(env: DistEnv, tp: int) -> DistEnv:
    """The data-parallel view of a job whose ranks form (world / tp) groups of `tp` tensor
    ranks; builds the (dp, tp) device mesh it carries."""
    from torch.distributed.device_mesh import init_device_mesh

    if env.world_size % tp or env.world_size < tp:
        raise ValueError(f"parallelism_config.tp_size={tp} needs a multiple of {tp} processes "
                         f"(torchrun --nproc_per_node), got {env.world_size}")  # fmt: skip
    dp = env.world_size // tp
    mesh = init_device_mesh(env.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return dataclasses.replace(
        env, rank=env.rank // tp, world_size=dp, process_rank=env.rank,
        process_world=env.world_size, mesh=mesh, data_group=mesh.get_group("dp"),
    )  # fmt: skip


# transformers' plan styles csd-fast applies; the head's colwise styles are its own (below)
_HEAD_STYLES = ("colwise", "colwise_rep", "colwise_gather_output")


def _layer_styles():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # embedding_rowwise (a vocabulary-sharded table, which transformers' plan adds when the head
    # is tied to it) is csd-fast's VocabParallelEmbedding
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "embedding_rowwise": None}


def layer_plan(lm: nn.Module) -> dict[str, str]:
    """The decoder's tp_plan (module path in the base model -> style), checked."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        raise NotImplementedError(
            f"{type(lm).__name__} has no tensor-parallel plan (config.base_model_tp_plan): "
            "parallelism_config.tp_size needs one"
        )
    unknown = {k: v for k, v in plan.items() if v not in _layer_styles()}
    if unknown:
        raise NotImplementedError(
            f"{type(lm).__name__}'s tp_plan styles {unknown}: csd-fast applies colwise / "
            "rowwise only (parallelism_config.tp_size)"
        )
    return plan


def check_divisible(lm: nn.Module, tp: int) -> None:
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None)
        or config.num_attention_heads,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": lm.get_output_embeddings().weight.shape[0],
    }
    for name, size in sizes.items():
        if size is not None and size % tp:
            raise ValueError(f"parallelism_config.tp_size={tp} does not divide the model's "
                             f"{name}={size}")  # fmt: skip


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard the decoder layers by the model's plan and the head over the vocabulary, in place
    (before fully_shard)."""
    from csd_fast.distributed.fsdp import head_is_tied
    from csd_fast.forward import backbone, unwrap_causal_lm
    from csd_fast.quantization import is_quantized

    lm = unwrap_causal_lm(model)
    if is_quantized(model):
        raise NotImplementedError("quantization_config (QLoRA) with parallelism_config.tp_size")
    if hasattr(lm.get_output_embeddings(), "base_layer"):
        raise NotImplementedError("a LoRA adapter on lm_head (peft_config target_modules) with "
                                  "parallelism_config.tp_size")  # fmt: skip
    tp = tp_mesh.size()
    check_divisible(lm, tp)
    base = backbone(model)
    tied = head_is_tied(lm)  # before the plan re-registers the embedding's weight
    for pattern, style in layer_plan(lm).items():
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        for name, module in base.named_modules():
            if regex.fullmatch(name) and style == "embedding_rowwise":
                _shard_embedding(module, tp_mesh)
            elif regex.fullmatch(name):
                _parallelize_projection(module, tp_mesh, style)
    head = lm.get_output_embeddings()
    if tied:  # one (V, H) table for both: the lookup becomes vocab-parallel too
        embed = lm.get_input_embeddings()
        if not isinstance(embed, VocabParallelEmbedding):
            _shard_embedding(embed, tp_mesh)
        head.weight = embed.weight
    else:
        head.weight = _vocab_sharded(head.weight, tp_mesh)
    if getattr(head, "bias", None) is not None:
        head.bias = _vocab_sharded(head.bias, tp_mesh)


def _parallelize_projection(module: nn.Module, tp_mesh, style: str) -> None:
    """A colwise / rowwise projection, or PEFT's LoRA layer around one: the base weight by the
    plan; of the adapter, the factor on the sharded side (B of a colwise layer: its output
    columns; A of a rowwise one: its input rows) the same way, the other factor replicated. The
    sum base(x) + B(A(x)) then has the base layer's own layout."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    styles = _layer_styles()
    base = getattr(module, "base_layer", None)
    if base is None:
        parallelize_module(module, tp_mesh, styles[style]())
        return
    if any(getattr(module, "use_dora", {}).values()):
        raise NotImplementedError("DoRA (peft_config use_dora) with parallelism_config.tp_size")
    if not hasattr(module, "lora_A") or getattr(module, "lora_embedding_A", None):
        raise NotImplementedError(
            f"{type(module).__name__} adapters with parallelism_config.tp_size (LoRA on "
            "linear layers is supported)"
        )
    parallelize_module(base, tp_mesh, styles[style]())
    for name in module.lora_A:
        if style == "colwise":
            parallelize_module(module.lora_B[name], tp_mesh, ColwiseParallel())
        else:
            parallelize_module(module.lora_A[name], tp_mesh, RowwiseParallel())


def _shard_embedding(embed: nn.Module, tp_mesh) -> None:
    embed.weight = _vocab_sharded(embed.weight, tp_mesh)
    embed.__class__ = type(f"VocabParallel{type(embed).__name__}",
                           (VocabParallelEmbedding, type(embed)), {})  # fmt: skip


def _vocab_sharded(param: nn.Parameter, tp_mesh) -> nn.Parameter:
    from torch.distributed.tensor import Shard, distribute_tensor

    return nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(0)]),
                        requires_grad=param.requires_grad)  # fmt: skip


class _SumOverGroup(torch.autograd.Function):
    """All-reduce in forward; identity in backward (every rank's loss is the same one)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class VocabParallelEmbedding:
    """Mixed into an nn.Embedding whose weight is vocabulary-sharded (a head tied to it): each
    rank looks up the ids in its rows (zeros elsewhere) and the lookups are summed. Its weight
    gradient stays the rank's shard, as the head's does (DTensor's own sharded embedding hands
    back a replicated one, which the tied head's shard cannot be accumulated with)."""

    def forward(self, input_ids):
        local = self.weight.to_local()  # (V / tp, H)
        mesh = self.weight.device_mesh
        rank = _tp_rank(mesh)
        group = _tp_group(mesh)
        start, rows_here = rank * local.shape[0], local.shape[0]
        shifted = input_ids - start
        inside = (shifted >= 0) & (shifted < rows_here)
        pad = self.padding_idx  # its row gets no gradient: only on the rank that holds it
        pad = pad - start if pad is not None and 0 <= pad - start < rows_here else None
        rows = torch.nn.functional.embedding(shifted.clamp(0, rows_here - 1), local, pad)
        return _SumOverGroup.apply(rows * inside[..., None].to(rows.dtype), group)


def is_vocab_sharded(weight) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(weight, DTensor) and any(
        isinstance(p, Shard) and p.dim == 0 for p in weight.placements
    )


def sharded_head_logprob(hidden, weight, bias, labels, *, logit_scale=1.0, softcap=None,
                         temperature=1.0, return_stats=False, impl="auto"):  # fmt: skip
    """The LM head's log-probs when its weight is a vocabulary-sharded DTensor (any `impl`:
    the shard always runs vocab_parallel's chunked torch path)."""
    from csd_fast.distributed.vocab_parallel import vocab_parallel_logprob

    del impl  # the Triton kernel takes no shard yet; the chunked path is exact
    mesh = weight.device_mesh
    local = weight.to_local()  # (V / tp, H); its gradient returns as the same DTensor shard
    b = bias.to_local() if bias is not None and hasattr(bias, "to_local") else bias
    rank = _tp_rank(mesh)
    group = _tp_group(mesh)
    return vocab_parallel_logprob(
        hidden, local, labels, vocab_start=rank * local.shape[0], vocab_size=weight.shape[0],
        group=group, bias=b, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
        return_stats=return_stats,
    )  # fmt: skip


def sharded_log_sum_sq_probs(hidden, weight, bias, logit_scale=1.0, softcap=None,
                             temperature=1.0):  # fmt: skip
    """WPO's per-token log sum p^2 with a vocabulary-sharded head weight (no grad)."""
    from csd_fast.distributed.vocab_parallel import vocab_parallel_log_sum_sq_probs

    b = bias.to_local() if bias is not None and hasattr(bias, "to_local") else bias
    return vocab_parallel_log_sum_sq_probs(
        hidden, weight.to_local(), group=_tp_group(weight.device_mesh), bias=b,
        logit_scale=logit_scale, softcap=softcap, temperature=temperature,
    )  # fmt: skip


def _tp_rank(mesh) -> int:
    """This rank's vocabulary slice. Inside the scorer's forward FSDP2 hands over the weight
    on the tp mesh alone; a (dp, tp) weight with dp > 1 is still sharded at rest (its local rows
    a dp x tp chunk), and slicing it by tp rank would be silently wrong."""
    if mesh.ndim == 1:
        return mesh.get_local_rank()
    if mesh["dp"].size() > 1:
        raise RuntimeError(
            "a tensor-parallel head or tied embedding used outside the scorer's forward while "
            "FSDP2 shards it over the data ranks: call trainer.scorer.unshard() first (and "
            "trainer.scorer.reshard() after)"
        )
    return mesh.get_local_rank("tp")


def _tp_group(mesh):
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


def sharded_logits(hidden, weight, bias):
    """Plain `head(hidden)` with a vocabulary-sharded weight: the whole logits, gathered."""
    from torch.distributed.tensor import DTensor, Replicate

    h = DTensor.from_local(hidden, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim)
    out = torch.nn.functional.linear(h, weight, bias)
    return out.full_tensor()
