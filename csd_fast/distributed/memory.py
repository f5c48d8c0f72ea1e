"""`csd train --plan`: per-device memory of a run before it starts, with and without CPU offload.

    csd train --plan --model_name_or_path M --nproc 8 --max_tokens_per_batch 16384 ...

Counts come from the model's config built on the meta device (no weights read), so they are
exact for the architecture; the trainable set follows `trainable_params` / LoRA. Per device,
with W ranks, P parameters, P_t trainable, B = bytes of the compute dtype (2 for bf16):

    params       P * 4 / W                 fp32 master weights, sharded
    gathered     2 * U * B                 the largest FSDP unit (a decoder layer or the head)
                                           gathered, plus one prefetched
    grads        P_t * 4 / W               fp32 gradients, sharded
    optimizer    P_t * S / W               S = state bytes per parameter: AdamW 8 (exp_avg +
                                           exp_avg_sq), sgd 0 / 4 with momentum, adagrad 4,
                                           rmsprop 4 (+4 momentum, +4 centered)
    reference    P * B / W                 live reference in the compute dtype (0 when
                                           precomputed / cached, or with LoRA: adapters off)
    activations  per micro-batch of T tokens, L layers, hidden H, intermediate I:
                 checkpointed  T*H*B*L + T*(6H + 3I)*B   (layer inputs + one layer recomputed)
                 otherwise     T*(6H + 3I)*B*L
                 + the head: fused 0 (chunked), eager T*V*4*3 (logits, softmax, grad)
QLoRA (`quantized_bits` 4 or 8, bitsandbytes quantizing every linear layer of the blocks, Q of
the P parameters). 4-bit packed bytes shard when their storage dtype is the compute dtype
(`quantized_sharded`), their absmax blocks and 8-bit weights are whole on every rank:

    quantized    Q/2/W (or Q/2 whole) + 4Q/64 (Q/64 + 4Q/16384 double-quantized) in 4-bit,
                 Q + 4R in 8-bit (R output rows)
    params       (P - Q) * 4 / W           the full-precision rest, sharded
    gathered     2 * U' * B                U' the largest unit's full-precision part
With offload, params, grads and optimizer state live in CPU memory (the gathered units and the
activations stay on the device). These are estimates: allocator fragmentation, NCCL buffers and
the CUDA context (~1-3 GiB) come on top, which is why the check keeps a 10% margin.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    params: int  # total parameter count
    trainable: int
    largest_unit: int  # parameters of the largest FSDP unit
    bytes_per_component: dict[str, int]  # on the device, without offload
    offloaded: tuple[str, ...] = ("params", "grads", "optimizer")

    def device_total(self, offload: bool) -> int:
        return sum(
            v for k, v in self.bytes_per_component.items() if not (offload and k in self.offloaded)
        )

    def host_total(self) -> int:
        return sum(self.bytes_per_component[k] for k in self.offloaded)

    def render(self, device_bytes: int | None) -> str:
        rows = [f"memory plan: {self.params / 1e9:.3f}B params ({self.trainable / 1e9:.3f}B "
                f"trainable) sharded over {self.world_size} device(s), per device in "
                "GiB"]  # fmt: skip
        rows.append(f"  {'component':<12} {'no offload':>11} {'cpu offload':>12}")
        for k, v in self.bytes_per_component.items():
            off = 0 if k in self.offloaded else v
            rows.append(f"  {k:<12} {v / GIB:>11.2f} {off / GIB:>12.2f}")
        rows.append(
            f"  {'total':<12} {self.device_total(False) / GIB:>11.2f} "
            f"{self.device_total(True) / GIB:>12.2f}   (host with offload: "
            f"{self.host_total() / GIB:.2f} GiB per rank)"
        )
        if device_bytes:
            rows.append(f"  device memory: {device_bytes / GIB:.1f} GiB")
        return "\n".join(rows)

    def warnings(self, device_bytes: int | None, offload: bool) -> list[str]:
        if not device_bytes:
            return []
        need, limit = self.device_total(offload), 0.9 * device_bytes
        if need <= limit:
            return []
        hint = (
            "more ranks, a smaller micro-batch, gradient_checkpointing or LoRA"
            if offload
            else "fsdp_config={'cpu_offload': true}, more ranks or a smaller micro-batch"
        )
        return [
            f"WARNING: this run needs ~{need / GIB:.1f} GiB per device, more than 90% of the "
            f"{device_bytes / GIB:.1f} GiB available: it will not fit; try {hint}"
        ]


def count_params(config, trainable_patterns=None, lora_rank: int | None = None):
    """(total, trainable, largest FSDP unit) of the model `config` describes, on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    from csd_fast.distributed.fsdp import decoder_layers, head_is_tied
    from csd_fast.optim import select_trainable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if lora_rank:  # LoRA on every linear layer of the blocks: r * (in + out) each
        lora = sum(
            lora_rank * (m.in_features + m.out_features)
            for layer in decoder_layers(model)
            for m in layer.modules()
            if isinstance(m, torch.nn.Linear)
        )
        trainable = lora
    else:
        names = select_trainable(model, trainable_patterns)
        trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    units = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    if not head_is_tied(model):
        units.append(model.get_output_embeddings().weight.numel())
    return total, trainable, max(units)


def quantized_counts(config) -> tuple[int, int, int]:
    """(Q, R, U'): the weights bitsandbytes quantizes (every nn.Linear of the decoder layers;
    the head stays full precision), their output rows, and the largest FSDP unit's parameters
    that stay full precision (the unit a layer or the untied head), on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    from csd_fast.distributed.fsdp import decoder_layers, head_is_tied

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantized = rows = 0
    units = []
    for layer in decoder_layers(model):
        linear = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        q = sum(m.weight.numel() for m in linear)
        quantized, rows = quantized + q, rows + sum(m.out_features for m in linear)
        units.append(sum(p.numel() for p in layer.parameters()) - q)
    if not head_is_tied(model):
        units.append(model.get_output_embeddings().weight.numel())
    return quantized, rows, max(units)


def plan_memory(
    config,
    *,
    world_size: int,
    tokens_per_micro_batch: int,
    compute_bytes: int = 2,
    trainable_patterns=None,
    lora_rank: int | None = None,
    live_reference: bool = True,
    gradient_checkpointing: bool = True,
    fused_head: bool = True,
    quantized_bits: int | None = None,
    double_quant: bool = False,
    quantized_sharded: bool = True,
    optimizer_bytes: int = 8,
) -> MemoryPlan:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    total, trainable, unit = count_params(config, trainable_patterns, lora_rank)
    quantized, quantized_bytes = 0, 0
    if quantized_bits:
        quantized, rows, unit = quantized_counts(config)
        if quantized_bits == 8:
            quantized_bytes = quantized + 4 * rows
        else:  # two weights a byte, one fp32 absmax a block of 64 (double: uint8 + fp32 / 256)
            absmax = (
                quantized // 64 + 4 * quantized // 16384 if double_quant else 4 * quantized // 64
            )
            quantized_bytes = quantized // 2 // (world_size if quantized_sharded else 1) + absmax
    W, T, B = world_size, tokens_per_micro_batch, compute_bytes
    H, inter, L = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    per_layer = T * (6 * H + 3 * inter) * B
    acts = T * H * B * L + per_layer if gradient_checkpointing else per_layer * L
    if not fused_head:
        acts += T * text.vocab_size * 4 * 3
    reference = 0 if (not live_reference or lora_rank) else total * B // W
    components = {
        "params": (total - quantized) * 4 // W,
        "gathered": 2 * unit * B,
        "grads": trainable * 4 // W,
        "optimizer": trainable * optimizer_bytes // W,
        "reference": reference,
        "activations": acts,
    }
    if quantized_bits:  # whole on every rank (csd_fast.quantization.quantized_params)
        components["quantized"] = quantized_bytes
    return MemoryPlan(W, total, trainable, unit, components)


def optimizer_state_bytes(optim: str, optim_args: str | None) -> int:
    """fp32 state bytes per trainable parameter of the torch optimizers FSDP2 runs with."""
    options = dict(kv.split("=", 1) for kv in (optim_args or "").replace(" ", "").split(",") if kv)
    nonzero = lambda key: float(options.get(key, 0) or 0) != 0  # noqa: E731
    if optim == "sgd":
        return 4 if nonzero("momentum") else 0
    if optim == "adagrad":
        return 4
    if optim == "rmsprop":
        return 4 + 4 * nonzero("momentum") + 4 * (options.get("centered", "").lower() == "true")
    return 8  # AdamW (and an upper guess for anything else)


def device_memory_bytes() -> int | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
