"""Resuming safely: a verified checkpoint, the same run's configuration, state loaded without code.

    with guarded_training(trainer, resume_from_checkpoint) as path:   # lock + policy + checks
        run_training(trainer, path)
    path = select_checkpoint(True, "out")            # newest complete checkpoint, says why
    changes = check_resume(saved_record, new_record, allow_changes=False)  # ResumeMismatch
    state = load_state_file(path / "optimizer.pt")   # torch.load(weights_only=True), clear errors

What `--resume` checks, in order:
  1. the checkpoint is complete: its manifest lists every file with size and sha256
     (`csd_fast.manifest`); a bare `--resume` takes the newest complete one and names each newer
     one it skipped and why; an explicit path that does not verify is refused, naming the newest
     complete one;
  2. the run is the same: the checkpoint's saved record (resolved `DPOConfig`, model and
     reference names, a fingerprint of the tokenized training and eval pairs) is compared with
     the new one. A field that changes the trajectory (everything outside `RUN_NEUTRAL`: lr,
     batch sizes, schedule length, loss, data, ...) is refused, each one named, unless
     `resume_with_changes` is set; then the changes are logged and applied (the optimizer's
     hyperparameters and the schedule's base rate follow the new values; the step counter and
     the data position are kept);
  3. the state files exist and load with `weights_only=True` (tensors and plain containers only:
     a checkpoint from someone else cannot run code). A missing optimizer.pt/scheduler.pt is
     refused, never silently started fresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np

from csd_fast.errors import UserError, corrupt_file
from csd_fast.manifest import newest_complete, verify_checkpoint

RECORD_FILE = "training_config.json"
# Fields that do not change what the optimizer steps compute: where and how results are
# reported, how often checkpoints/evaluations happen, caches' locations, hub/logging knobs.
RUN_NEUTRAL = frozenset(
    """output_dir overwrite_output_dir do_train do_eval do_predict resume_from_checkpoint
    resume_with_changes logging_strategy logging_steps logging_first_step logging_dir report_to
    run_name disable_tqdm project trackio_space_id trackio_bucket_id trackio_static_space_id
    eval_strategy eval_steps per_device_eval_batch_size save_strategy save_steps save_total_limit
    save_on_each_node dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers
    dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order log_level
    log_level_replica log_on_each_node include_num_input_tokens_seen prediction_loss_only
    eval_do_concat_batches eval_use_gather_object eval_accumulation_steps include_for_metrics
    batch_eval_metrics skip_memory_metrics local_rank ddp_timeout ddp_backend hub_token
    hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision torch_empty_cache_steps
    dataset_cache_dir ref_cache_dir dataset_num_proc use_cpu eval_on_start eval_delay
    save_only_model enable_jit_checkpoint bf16_full_eval fp16_full_eval activation_offloading
    label_smoothing_factor ignore_data_skip restore_callback_states_from_checkpoint fsdp""".split()
)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from: incomplete, corrupt, unsafe or missing state."""


class ResumeMismatch(UserError, ValueError):
    """The new configuration differs from the checkpoint's in a way that changes the run."""


# ------------------------------------------------------------------------ which checkpoint
def select_checkpoint(resume, output_dir, *, log=print) -> Path | None:
    """The checkpoint `resume` names (True: the newest complete one in output_dir), verified."""
    if not resume:
        return None
    if resume is True or str(resume).lower() == "true":
        path, skipped = newest_complete(output_dir)
        for bad, why in skipped:
            log(f"[csd-fast] resume: skipping {bad.name}: {why}")
        if path is None:
            what = "no complete checkpoint" if skipped else "no checkpoint"
            raise CheckpointError(f"--resume: {what} in {output_dir} to resume from")
        if skipped:
            log(f"[csd-fast] resume: using {path.name}, the newest complete checkpoint")
        return path
    path = Path(resume)
    problems = verify_checkpoint(path)
    if problems:
        fallback, _ = newest_complete(path.parent)
        hint = (
            f"resume from {fallback} (the newest complete checkpoint) or with a bare --resume"
            if fallback
            else "no complete checkpoint is left beside it"
        )
        raise CheckpointError(f"checkpoint {path} is incomplete: {'; '.join(problems)}; {hint}")
    return path


# --------------------------------------------------------------------- what the run is
def pairs_fingerprint(pairs) -> str | None:
    """sha256 over the tokenized pairs (ids, offsets, rows, CLO columns); None without pairs.

    Named eval sets (a dict) hash each set under its name; a stream (no rows held) has none."""
    if pairs is None:
        return None
    if isinstance(pairs, dict):
        parts = {name: pairs_fingerprint(p) for name, p in sorted(pairs.items())}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    if not hasattr(pairs, "rows"):  # a streamed set: its rows are not in memory to hash
        return None
    cached = getattr(pairs, "_run_fingerprint", None)
    if cached is not None:  # once per tokenized set, not once per checkpoint
        return cached
    h = hashlib.sha256()
    for arrays in (getattr(pairs, "flat", {}), getattr(pairs, "offsets", {})):
        for key in sorted(arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arrays[key]).tobytes())
    for extra in (pairs.rows, getattr(pairs, "group", None), getattr(pairs, "sft", None)):
        h.update(b"-" if extra is None else np.ascontiguousarray(extra).tobytes())
    digest = h.hexdigest()
    with contextlib.suppress(AttributeError):  # a read-only container: recompute next time
        pairs._run_fingerprint = digest
    return digest


def run_identity(trainer) -> dict:
    """What identifies a trainer's run besides its options: model names, data fingerprints."""
    from csd_fast.quantization import quantization_key

    names = getattr(trainer, "source_names", {}) or {}
    dist = getattr(trainer, "dist", None)
    # QLoRA: an adapter resumed over another quantization of its base trains another model
    quantization = quantization_key(getattr(trainer, "model", None)) or "none"
    return {
        "world_size": getattr(dist, "world_size", 1),
        "model": names.get("model"),
        "ref_model": names.get("ref_model"),
        "quantization": quantization,
        # a checkpoint's adapter loads non-strictly: resumed under another alpha or target
        # set (`csd train --peft_config`) it would train another model without a word
        "adapter": adapter_key(getattr(trainer, "model", None)) or "none",
        "train_data": pairs_fingerprint(trainer.train_pairs),
        "eval_data": pairs_fingerprint(trainer.eval_pairs),
    }


# PeftConfig fields that say where or how an adapter is used, not what it is
_ADAPTER_RUNTIME = ("base_model_name_or_path", "revision", "inference_mode", "peft_version",
                    "runtime_config")  # fmt: skip


def adapter_key(model) -> str | None:
    """The PEFT adapters' configurations, canonical (None: no adapter)."""
    import json

    configs = getattr(model, "peft_config", None)
    if not configs:
        return None

    def plain(v):
        if isinstance(v, set | frozenset):
            return sorted(map(str, v))
        return getattr(v, "value", v)

    out = {}
    for name in sorted(configs):
        fields = configs[name].to_dict()
        out[name] = {k: plain(v) for k, v in sorted(fields.items()) if k not in _ADAPTER_RUNTIME}
    return json.dumps(out, sort_keys=True, default=str)


def run_record(args, run: dict) -> dict:
    """What a checkpoint records about the run that wrote it (its training_config.json)."""
    return {"training": args.to_dict(), "run": dict(run)}


def read_record(checkpoint: Path) -> dict:
    """The record saved in a checkpoint (older flat files: the training config alone)."""
    path = Path(checkpoint) / RECORD_FILE
    if not path.exists():
        return {}
    with corrupt_file(path, fix="resume from another checkpoint"):
        data = json.loads(path.read_text())
    return data if "training" in data else {"training": data}


# fsdp_config keys that change memory or checkpoint writing, not the training numbers
FSDP_NEUTRAL = frozenset({"async_checkpoint", "cpu_offload", "reshard_after_forward", "tp_size"})
# options that are per device; compared as global sizes when the world size changes
PER_DEVICE_SIZES = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "max_tokens_per_batch",
)


def _fmt(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def diff_records(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(name, saved value, new value) of every run-changing difference."""
    out = []
    old_t, new_t = saved.get("training", {}), new.get("training", {})
    old_r, new_r = saved.get("run", {}), new.get("run", {})
    # per-device sizes: the run is the same when the global size is (2 ranks x b == 1 rank x 2b)
    ranks = (old_r.get("world_size") or 1, new_r.get("world_size") or 1)
    for key in sorted(set(old_t) | set(new_t)):
        if key in RUN_NEUTRAL or key not in old_t or key not in new_t:
            continue  # a field one version does not have cannot be compared
        if key == "parallelism_config":  # the mesh's shape: the global batch is compared below
            continue
        a, b = old_t[key], new_t[key]
        if key == "fsdp_config":  # how state is sharded and saved does not change the numbers
            a, b = (
                {k: v for k, v in (c or {}).items() if k not in FSDP_NEUTRAL} or None
                for c in (a, b)
            )
        if key in PER_DEVICE_SIZES and isinstance(a, int) and isinstance(b, int):
            if ranks[0] == ranks[1] and a != b:
                out.append((key, a, b))
            elif a * ranks[0] != b * ranks[1]:
                out.append((f"{key} x world_size", f"{a} x {ranks[0]}", f"{b} x {ranks[1]}"))
            continue
        if a != b and not (
            isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
        ):
            out.append((key, a, b))
    labels = {
        "train_data": "training data",
        "eval_data": "eval data",
        "model": "model",
        "ref_model": "reference model",
        "quantization": "quantization_config",
        "adapter": "peft_config",
    }
    for key, label in labels.items():
        a, b = old_r.get(key), new_r.get(key)
        if a is not None and b is not None and a != b:
            out.append((label, a, b))
    return out


def check_resume(
    saved: dict,
    new: dict,
    *,
    allow_changes: bool,
    where: str = "",
    flag: str = "--resume_with_changes",
) -> list[str]:
    """Refuse run-changing differences (each named) unless allowed; returns them as text."""
    diffs = diff_records(saved, new)
    changes = [f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs]
    # AdamW fused or not keeps the same state: only another optimizer cannot carry it on
    adamw = {"adamw_torch", "adamw_torch_fused"}
    other = [(a, b) for k, a, b in diffs if k == "optim" and not {a, b} <= adamw]
    if other:  # the saved state is another optimizer's (AdamW's moments are no SGD momentum)
        raise ResumeMismatch(
            f"{where or 'the checkpoint'} holds the state of optim={other[0][0]!r}, not "
            f"{other[0][1]!r}: an optimizer's state cannot become another's, even with {flag}. "
            "Resume with the saved optim, or start a new run from the checkpoint's weights"
        )
    if changes and not allow_changes:
        raise ResumeMismatch(
            f"{where or 'the checkpoint'} was written by a run with a different configuration; "
            f"these change the run: {'; '.join(changes)}. Resume with the saved values, or pass "
            f"{flag} to apply the changes"
        )
    return changes


@contextlib.contextmanager
def guarded_training(trainer, resume):
    """Lock output_dir, apply the used-directory policy, choose and check the checkpoint."""
    from csd_fast.rundir import RunDirLock, check_output_dir

    args = trainer.args
    lock = RunDirLock(args.output_dir, command="DPOTrainer.train").acquire()
    try:
        if lock.stale is not None:
            print(
                f"[csd-fast] {args.output_dir}: took over a stale lock of {lock.stale.describe()}"
            )
        if not resume and not getattr(trainer, "owns_output_dir", False):
            check_output_dir(
                args.output_dir,
                resume=False,
                # an out-of-memory restart replaces its own failed attempt's results
                overwrite=args.overwrite_output_dir or getattr(trainer, "oom_restart", False),
                flags=("resume_from_checkpoint=True", "overwrite_output_dir=True"),
            )
        path = select_checkpoint(resume, args.output_dir)
        trainer.resume_changes = []
        if path is not None:
            allow = bool(getattr(args, "resume_with_changes", False))
            saved = read_record(path)
            new = run_record(args, run_identity(trainer))
            changes = check_resume(saved, new, allow_changes=allow, where=str(path))
            for change in changes:
                print(f"[csd-fast] resume from {path.name} with a change: {change}")
            trainer.resume_changes = changes
        yield path
    finally:
        lock.release()


# -------------------------------------------------------------------- state, safely loaded
def load_state_file(path: Path):
    """torch.load with weights_only=True: tensors, numbers, strings, containers; never code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: the checkpoint cannot resume exactly (starting that state "
            "fresh would restart the schedule/moments); resume from a complete checkpoint"
        )
    with corrupt_file(
        path,
        fix="resume from an earlier checkpoint (a bare --resume picks the newest complete one)",
    ):
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            if "weights_only" in str(e) or type(e).__name__ == "UnpicklingError":
                raise CheckpointError(
                    f"{path} holds objects other than tensors and plain values, which could run "
                    "code when loaded; csd-fast loads checkpoint state with weights_only=True. "
                    "Resume only from checkpoints written by csd-fast >= this version"
                ) from None
            raise


_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes DCP's `.metadata` consists of (DCP itself reads it with plain pickle)."""

    def find_class(self, module: str, name: str):
        import torch

        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (
            (module, name) in _SAFE_GLOBALS
            or dtype
            or module.startswith("torch.distributed.checkpoint.")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_dcp_metadata(path: Path) -> None:
    """Refuse a DCP `.metadata` that would run code when `torch.distributed.checkpoint` loads it."""
    path = Path(path)
    with corrupt_file(path, fix="resume from an earlier checkpoint"), open(path, "rb") as fh:
        try:
            _MetadataUnpickler(fh).load()
        except pickle.UnpicklingError as e:
            if "is not allowed" not in str(e):
                raise
            raise CheckpointError(
                f"{path} holds {e}: only DCP's own metadata classes are loaded, so a checkpoint "
                "from someone else cannot run code"
            ) from None


def hyperparameters(optimizer) -> list[dict]:
    """The optimizer's per-group settings (everything but the parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_new_hyperparameters(optimizer, scheduler, fresh: list[dict]) -> None:
    """After loading saved state: the new run's settings, at the saved step of the schedule."""
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    scheduler.base_lrs = [new.get("initial_lr", new["lr"]) for new in fresh]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
