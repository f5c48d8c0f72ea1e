"""Atomic training checkpoints that resume bit for bit.

    output_dir/checkpoint-<step>/
        model.safetensors, config.json   HF save_pretrained layout (load with from_pretrained)
        tokenizer files                  when a tokenizer was given
        optimizer.pt, scheduler.pt       optimizer and LR-schedule state
        rng_state.pth                    python, numpy, torch CPU and CUDA generators (tensors)
        trainer_state.json               step, epoch position, best eval loss, log history
        manifest.json                    size + sha256 of every file above (csd_fast.manifest)

A checkpoint is written into a hidden temporary directory beside its final name and renamed into
place only once every file is flushed: a crash mid-write leaves the previous checkpoint untouched
and only a `.tmp-*` directory behind (removed by the next save). State files hold only tensors
and plain values and are read with `torch.load(weights_only=True)` (`csd_fast.resume`).

Under torchrun (several ranks) the same atomic directory holds a sharded DCP checkpoint instead
(`csd_fast.distributed.checkpoint`); `load_checkpoint` reads either layout on any world size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from csd_fast.errors import corrupt_file
from csd_fast.manifest import write_manifest
from csd_fast.resume import CheckpointError, load_state_file
from csd_fast.rundir import apply_umask_tree, fsync_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainProgress:
    """Where training stands; everything `--resume` needs besides weights and optimizer state."""

    global_step: int = 0
    epoch: int = 0  # epoch being consumed
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    total_tokens: int = 0
    total_flos: float = 0.0  # transformers' flos estimate over all ranks (its TrainerState's)
    train_loss_sum: float = 0.0  # sum of every step's loss since step 0 (train_loss after resume)
    log_history: list[dict] = field(default_factory=list)
    grad_scaler: dict | None = None  # fp16: the GradScaler's state (scale, growth tracker)
    stateful_callbacks: dict = field(default_factory=dict)  # transformers' ExportableState


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_dir_atomically(final: Path, write) -> Path:
    """Call `write(tmp_dir)`, fsync, then move tmp_dir to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        apply_umask_tree(tmp)  # mkdtemp's 0700, safetensors' 0600 would survive the rename
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fsync_tree(root: Path) -> None:
    for f in Path(root).rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync everything under `tmp`, then rename it to `final`: the one commit point."""
    fsync_tree(tmp)
    if final.exists():
        # two renames keep a complete copy on disk at every instant
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_atomically(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    path: Path,
    *,
    model,
    optimizer,
    scheduler,
    progress: TrainProgress,
    tokenizer=None,
    config: dict | None = None,
    env=None,
    async_save: bool = False,
) -> Path:
    """Write a complete checkpoint directory atomically (sharded DCP when `env` is distributed)."""
    if env is not None and env.distributed:
        from csd_fast.distributed.checkpoint import save_sharded

        return save_sharded(
            path, env=env, model=model, optimizer=optimizer, scheduler=scheduler,
            progress=progress, tokenizer=tokenizer, config=config, async_save=async_save,
        )  # fmt: skip

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pth")
        write_json_atomically(tmp / STATE_FILE, asdict(progress))
        if config is not None:
            write_json_atomically(tmp / "training_config.json", config)
        required = [STATE_FILE, "rng_state.pth"]
        required += ["optimizer.pt"] if optimizer is not None else []
        required += ["scheduler.pt"] if scheduler is not None else []
        write_manifest(tmp, required=tuple(required))  # last: it vouches for the files above

    return write_dir_atomically(path, write)


def load_progress(path: Path) -> TrainProgress:
    file = Path(path) / STATE_FILE
    if not file.exists():
        raise CheckpointError(f"{file} is missing: not a complete checkpoint")
    with corrupt_file(file, fix="resume from an earlier checkpoint"):
        return TrainProgress(**json.loads(file.read_text()))


def load_training_state(path: Path, *, optimizer, scheduler) -> TrainProgress:
    """Restore optimizer, scheduler and RNG state from a checkpoint; the weights load separately.

    Every state file must be there (a missing one is refused, never started fresh) and is read
    with weights_only=True.
    """
    path = Path(path)
    progress = load_progress(path)
    if optimizer is not None:
        optimizer.load_state_dict(load_state_file(path / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(load_state_file(path / "scheduler.pt"))
    set_rng_state(load_state_file(path / "rng_state.pth"))
    return progress


def load_checkpoint(path: Path, *, model, optimizer, scheduler, env=None) -> TrainProgress:
    """Weights, optimizer, schedule and RNG of either layout, on any world size."""
    from csd_fast.distributed.checkpoint import is_sharded_checkpoint, load_sharded
    from csd_fast.distributed.env import DistEnv

    if is_sharded_checkpoint(path):
        return load_sharded(
            path, env=env or DistEnv(), model=model, optimizer=optimizer, scheduler=scheduler
        )
    load_weights(model, path)
    from csd_fast.distributed.fsdp import is_sharded

    if is_sharded(model) and optimizer is not None and (Path(path) / "optimizer.pt").exists():
        _load_full_optimizer(Path(path) / "optimizer.pt", model, optimizer)
        optimizer = None  # restored above; the scheduler and RNG load as usual
    return load_training_state(path, optimizer=optimizer, scheduler=scheduler)


def _load_full_optimizer(file: Path, model, optimizer) -> None:
    """A single-process optimizer.pt (state by parameter position) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = load_state_file(file)
    names = {id(p): n for n, p in model.named_parameters()}
    # the same builder made both optimizers, so positions line up group by group
    position = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {position[i]: s for i, s in saved["state"].items()}
    groups = [{**g, "params": [position[i] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def load_checkpoint_weights(model, path: Path) -> None:
    """Only the weights of a checkpoint of either layout (load_best_model_at_end)."""
    from csd_fast.distributed.checkpoint import is_sharded_checkpoint, load_sharded_weights

    if is_sharded_checkpoint(path):
        load_sharded_weights(path, model)
    else:
        load_weights(model, path)


def load_weights(model, path: Path) -> None:
    """Load a checkpoint's weights into an existing (possibly PEFT) model, in place."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        with corrupt_file(path / "adapter_model.safetensors", fix="resume from an earlier one"):
            adapter = load_file(path / "adapter_model.safetensors")
        set_peft_model_state_dict(model, adapter)
        return
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with corrupt_file(
            f,
            fix="resume from an earlier checkpoint (a bare --resume picks the newest complete one)",
        ):
            state.update(load_file(f))
    if not state:
        raise FileNotFoundError(f"no safetensors weights in checkpoint {path}")
    from csd_fast.distributed.fsdp import is_sharded

    if is_sharded(model):  # a single-process checkpoint resumed on several ranks
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        missing, unexpected = result.missing_keys, result.unexpected_keys
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are saved once; anything else missing means the wrong checkpoint
    real_missing = [k for k in missing if k not in tied_weight_keys(model)]
    if real_missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}: "
            f"missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )


def tied_weight_keys(model) -> set[str]:
    """State-dict names that alias another tensor (a tied head): the only keys allowed missing."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        local = getattr(t, "_local_tensor", t)  # a DTensor shard aliases like its full tensor
        by_storage.setdefault((local.data_ptr(), local.dtype, tuple(t.shape)), []).append(name)
    return {n for names in by_storage.values() if len(names) > 1 for n in names}


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: str | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, never the best one (`keep`)."""
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(output_dir)
    removable = [p for p in ckpts if keep is None or Path(keep).resolve() != p.resolve()]
    excess = len(ckpts) - limit
    for p in removable[: max(0, excess)]:
        shutil.rmtree(p, ignore_errors=True)
