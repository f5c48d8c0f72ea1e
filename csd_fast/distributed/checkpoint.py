"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), and the consolidated export.

    output_dir/checkpoint-<step>/
        dcp/                      DCP shards (*.distcp) + .metadata: model and optimizer state
                                  by parameter name, so any world size can load them
        rng_state_<rank>.pth      each rank's generators
        scheduler.pt, trainer_state.json, training_config.json, config.json, tokenizer files
        manifest.json             size + sha256 of every file above, all ranks' shards included

Every rank writes its shards into `.checkpoint-<step>.tmp-dcp/`; after a barrier rank 0 fsyncs
and renames the directory into place (with `fsdp_config={"async_checkpoint": true}` the shards are
written by a background thread and the rename waits for it). A kill -9 at any point before the
rename leaves only the hidden directory, which `list_checkpoints` never returns and the next save
removes. Resume on another world size: DCP reshards the named tensors on load (a single process
loads them into plain tensors); the count-based data plan of W ranks x b pairs matches 1 rank x
W*b, so the position `micro_in_epoch` carries over.

`export_hf` gathers the full weights (one tensor at a time) and rank 0 writes the HF
`save_pretrained` layout (safetensors + config + tokenizer) that `from_pretrained` and vLLM load;
`csd export CKPT OUT` does the same offline from a checkpoint directory.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from csd_fast import checkpoint as ckpt
from csd_fast.distributed.env import DistEnv
from csd_fast.manifest import write_manifest
from csd_fast.resume import check_dcp_metadata, load_state_file
from csd_fast.rundir import apply_umask_tree

DCP_DIR = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").exists()


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": model_state(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def model_state(model) -> dict:
    """The model's state as a checkpoint holds it (FSDP2: this rank's shards, by name). A
    bitsandbytes base's packed weights and quant_state entries are left out (QLoRA: the base is
    reloaded and quantized again from its path, as a single-process QLoRA checkpoint also
    needs; csd_fast.quantization); the module's own state_dict is read there, since DCP's
    `get_model_state_dict` cannot name bnb's extra keys (8-bit's `SCB` is no attribute)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from csd_fast.quantization import is_quantized, quantized_state_keys

    if not is_quantized(model):
        return get_model_state_dict(model)
    drop = quantized_state_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def _load_model_state(model, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from csd_fast.quantization import is_quantized, quantized_state_keys

    if not is_quantized(model):
        set_model_state_dict(model, state)
        return
    # a QLoRA checkpoint lacks the quantized base by design (model_state): those keys only
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - quantized_state_keys(model)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


_PENDING: list = []  # (future, env, tmp, final, required) of async saves not yet published
_GROUPS: dict = {}


def _checkpoint_group():
    """A gloo group of all ranks for the background writer's coordination, made once: the
    training's own (NCCL) group stays free for the next steps' collectives."""
    import torch.distributed as dist

    if "gloo" not in _GROUPS:
        _GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _GROUPS["gloo"]


def wait_for_saves() -> None:
    """Finish and publish every pending async checkpoint (call before reading or exiting)."""
    while _PENDING:
        future, env, tmp, final, required = _PENDING.pop(0)
        future.result()
        _publish(env, tmp, final, required)


def _publish(env: DistEnv, tmp: Path, final: Path, required: tuple[str, ...]) -> None:
    env.barrier()  # every rank's shards are on disk before rank 0 hashes and publishes them
    if env.is_main:
        write_manifest(tmp, required=required)  # every rank's shard and RNG files included
        apply_umask_tree(tmp)
        ckpt.publish_dir(tmp, final)
    env.barrier()


def save_sharded(
    path: Path,
    *,
    env: DistEnv,
    model,
    optimizer,
    scheduler,
    progress: ckpt.TrainProgress,
    tokenizer=None,
    config: dict | None = None,
    async_save: bool = False,
) -> Path:
    """Write a DCP checkpoint from every rank; atomic by a final rename on rank 0.

    With `async_save` the state is staged to CPU memory and written by a background thread
    while training goes on; the directory is renamed into place when the write has finished, at
    the next save or at `wait_for_saves()` (the end of training), never before."""
    import torch.distributed.checkpoint as dcp

    from csd_fast.forward import unwrap_causal_lm

    wait_for_saves()  # one checkpoint in flight at a time
    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp-dcp"
    if env.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    env.barrier()
    future = None
    if async_save:
        future = dcp.async_save(
            _state(model, optimizer),
            checkpoint_id=str(tmp / DCP_DIR),
            process_group=_checkpoint_group(),
        )
    else:
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(ckpt.rng_state(), tmp / f"rng_state_{env.global_rank}.pth")
    if env.is_main:  # the small files describe this step: written now, whatever comes later
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        lm = unwrap_causal_lm(model)
        lm.config.save_pretrained(tmp)
        if hasattr(model, "peft_config"):  # what `csd export` needs to rebuild the adapters
            model.peft_config[model.active_adapter].save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if config is not None:
            ckpt.write_json_atomically(tmp / "training_config.json", config)
        ckpt.write_json_atomically(tmp / ckpt.STATE_FILE, asdict(progress))
    required = [ckpt.STATE_FILE, f"{DCP_DIR}/.metadata", "rng_state_0.pth"]
    required += ["scheduler.pt"] if scheduler is not None else []
    if future is not None:
        _PENDING.append((future, env, tmp, final, tuple(required)))
    else:
        _publish(env, tmp, final, tuple(required))
    return final


def load_sharded(path: Path, *, env: DistEnv, model, optimizer, scheduler) -> ckpt.TrainProgress:
    """Restore weights, optimizer, schedule and RNG from a DCP checkpoint, any world size."""
    import torch.distributed.checkpoint as dcp

    wait_for_saves()
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    check_dcp_metadata(path / DCP_DIR / ".metadata")  # DCP unpickles it without restriction
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    _load_model_state(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if scheduler is not None:  # a missing one is refused, never started fresh
        scheduler.load_state_dict(load_state_file(path / "scheduler.pt"))
    rng = path / f"rng_state_{env.global_rank}.pth"
    if not rng.exists():  # more ranks than when saved: rank 0's generators
        rng = path / "rng_state_0.pth"
    ckpt.set_rng_state(load_state_file(rng))
    return ckpt.load_progress(path)


def load_sharded_weights(path: Path, model, partial: bool = False) -> None:
    """Only the weights of a DCP checkpoint (load_best_model_at_end, export). `partial`: the
    checkpoint holds a subset (a QLoRA run's: no base weights), every one of which must load,
    and each adapter weight of `model` must be among them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    check_dcp_metadata(Path(path) / DCP_DIR / ".metadata")
    state = {"model": model_state(model)}
    if partial:
        saved = FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata().state_dict_metadata
        have = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
        lacking = [k for k in state["model"] if k not in have and "lora_" in k]
        if lacking:
            raise ValueError(f"{path}: the checkpoint lacks adapter weights, e.g. {lacking[0]}")
        state = {"model": {k: v for k, v in state["model"].items() if k in have}}
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        return
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    _load_model_state(model, state["model"])


def export_hf(model, out: Path, *, env: DistEnv, tokenizer=None) -> Path:
    """Consolidated HF layout of a (possibly sharded) model, written by rank 0 atomically.

    A PEFT model is written as its adapter (`adapter_model.safetensors`), as `save_pretrained`
    of a PeftModel does; a plain model as full safetensors weights."""
    from csd_fast.distributed.fsdp import full_state_dict
    from csd_fast.forward import unwrap_causal_lm

    target = model if hasattr(model, "peft_config") else unwrap_causal_lm(model)
    full = full_state_dict(target, keep=env.is_main)  # every rank takes part in the gathers
    out = Path(out)
    if env.is_main:

        def write(tmp: Path) -> None:
            target.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        if out.is_dir() and any(out.iterdir()):
            write(out)  # a directory that holds more (output_dir): each file atomic, in place
        else:
            ckpt.write_dir_atomically(out, write)
    env.barrier()
    return out


def export_checkpoint(
    checkpoint: Path, out: Path, dtype: str | None = None, base_model: str | None = None
) -> Path:
    """`csd export`: a training checkpoint -> consolidated HF model dir.

    A DCP checkpoint is rebuilt from its config.json on meta and filled from its shards; a LoRA
    run's (sharded, or the single-process adapter directory) has its adapters merged into the
    base weights, so the result loads with `from_pretrained` and vLLM like any full model."""
    checkpoint, out = Path(checkpoint), Path(out)
    adapter = (checkpoint / "adapter_config.json").exists()
    if adapter and not is_sharded_checkpoint(checkpoint):
        model = _merged_adapter_checkpoint(checkpoint, base_model)
    else:
        if not (checkpoint / "config.json").exists():
            raise FileNotFoundError(f"{checkpoint}: no config.json (not a csd-fast checkpoint)")
        quantized = is_sharded_checkpoint(checkpoint) and _saved_quantized(checkpoint)
        if base_model and not quantized:
            raise ValueError(
                f"--base_model is for a LoRA checkpoint without its base weights (a single-"
                f"process adapter directory, or a QLoRA run's); {checkpoint} holds them itself"
            )
        # a QLoRA checkpoint holds no base weights (model_state): the full-precision base
        # is read from its path, and the adapters merge into it as one process's export does
        model = _full_precision_base(checkpoint, base_model) if quantized else (
            _empty_model(checkpoint))  # fmt: skip
        if is_sharded_checkpoint(checkpoint):
            if adapter or _has_adapter_keys(checkpoint):
                model = _lora_model(model, checkpoint)
            load_sharded_weights(checkpoint, model, partial=quantized)
            if hasattr(model, "merge_and_unload"):
                model = merge_adapters(model)
        else:
            ckpt.load_weights(model, checkpoint)
    if dtype:
        model.to(getattr(torch, dtype))
        model.config.dtype = getattr(torch, dtype)
    tokenizer = None
    if (checkpoint / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_hf(model, out, env=DistEnv(), tokenizer=tokenizer)


def _saved_quantized(checkpoint: Path) -> bool:
    import json

    return "quantization_config" in json.loads((checkpoint / "config.json").read_text())


def _recorded_base(checkpoint: Path, base_model: str | None, what: str) -> str:
    """`--base_model`, else the base an adapter checkpoint records (adapter_config.json)."""
    import json

    config = checkpoint / "adapter_config.json"
    recorded = json.loads(config.read_text()) if config.exists() else {}
    base = base_model or recorded.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{checkpoint}: {what} whose base model is not recorded: name it with --base_model PATH"
        )
    return base


def _full_precision_base(checkpoint: Path, base_model: str | None):
    """The base model a QLoRA checkpoint's adapter was trained over, unquantized (fp32)."""

    from transformers import AutoModelForCausalLM

    base = _recorded_base(checkpoint, base_model, "a QLoRA checkpoint (quantized base, not saved)")
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _empty_model(checkpoint: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave a tied head its own storage
    return model


def merge_adapters(peft_model):
    """`merge_and_unload`, except that a tied head with an adapter of its own is untied first:
    the adapter changes the output projection only, and merged into a shared weight it would
    change the input embeddings too."""
    from torch import nn

    base = peft_model.get_base_model()
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    layer = getattr(head, "base_layer", head)
    if layer is not head and layer.weight is getattr(embed, "weight", None):
        layer.weight = nn.Parameter(layer.weight.detach().clone())
        base.config.tie_word_embeddings = False
        text = getattr(base.config, "get_text_config", lambda: None)()
        if text is not None:
            text.tie_word_embeddings = False
    return peft_model.merge_and_unload()


def _has_adapter_keys(checkpoint: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint / DCP_DIR)).read_metadata().state_dict_metadata
    return any("lora_" in k for k in keys)


def _lora_model(base, checkpoint: Path):
    """The PEFT model a sharded LoRA checkpoint was saved from (its keys), empty."""
    from peft import PeftConfig, get_peft_model

    if not (checkpoint / "adapter_config.json").exists():
        raise ValueError(
            f"{checkpoint} holds LoRA adapters but no adapter_config.json (written by csd-fast "
            "since sharded LoRA export landed): export the run's final/ instead"
        )
    return get_peft_model(base, PeftConfig.from_pretrained(str(checkpoint)))


def _merged_adapter_checkpoint(checkpoint: Path, base_model: str | None):
    """A single-process LoRA checkpoint (an adapter directory) merged into its base model."""

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _recorded_base(
        checkpoint, base_model, "a LoRA adapter (the run was given a model object)"
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return merge_adapters(PeftModel.from_pretrained(model, str(checkpoint)))
