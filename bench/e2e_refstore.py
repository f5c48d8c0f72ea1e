"""The reference store: a beta sweep sharing it vs independent runs; cached vs live reference.

    python -m bench --only ref_sweep,ref_step --quick

`ref_sweep` (mode sweep): the wall time of a 4-point beta sweep, every run `steps` optimizer
steps on the same model and data, through the Python API in one process (so process start-up,
the same for both, is not measured):
  independent    each run computes its own reference table (precompute_ref_log_probs)
  shared-store   the runs share one ref_cache_dir: the first computes the table, the others
                 read it (what `csd sweep` does)
`ref_step` (mode train): per-step time and peak memory of training with
  live           the reference model in memory, a no-grad reference forward every micro-batch
  cached         a complete store: no reference model is built, no reference forward runs
plus `trainer_mem` (MiB): RSS growth while building the trainer (the reference copy shows here,
as `peak_mem` is measured above the built trainer).
Model and data: bench/e2e_dpo.py's random 2-layer Llama (V=32000) and word-level pairs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Case, _proc_kb
from bench.e2e_dpo import _assets, _config

NAME = "ref_sweep"
MODES = ("sweep", "train")
PROVIDERS = ("independent", "shared-store", "live", "cached")
_BY_MODE = {"sweep": ("independent", "shared-store"), "train": ("live", "cached")}


def _both(shape: dict) -> list[dict]:
    return [{**shape, "modes": (m,), "providers": p} for m, p in _BY_MODE.items()]


PRESETS = {  # B pairs per step, prompt ~P words, completions ~C words; N pairs in the data
    "smoke": _both({"model": "tiny", "B": 2, "P": 16, "C": 8, "N": 8, "points": 2, "steps": 1}),
    "quick": _both({"model": "tiny", "B": 4, "P": 128, "C": 64, "N": 64, "points": 4, "steps": 2}),
    "gpu": _both({"model": "1b", "B": 8, "P": 512, "C": 256, "N": 512, "points": 4, "steps": 4}),
}
BETAS = (0.05, 0.1, 0.2, 0.5)


def _trainer(model_dir, rows, device, out, steps, batch, **extra):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from csd_fast import DPOConfig, DPOTrainer

    args = _config(DPOConfig, device, steps, batch, out, {"dataset_cache_dir": None, **extra})
    return DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir))  # fmt: skip


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    from bench.common import Skip

    if provider not in _BY_MODE[mode]:
        raise Skip(f"{provider} is a {'train' if mode == 'sweep' else 'sweep'} provider")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import TrainerCallback

    batch, steps = shape["B"], shape["steps"]
    case, state = Case(), {}
    model_dir, rows = _assets(shape, shape["N"])
    tmp = Path(tempfile.mkdtemp(prefix="csd-bench-ref-"))
    if mode == "sweep":  # one wall time for the whole sweep: no per-item rate

        def timer() -> list[float]:
            t0 = time.perf_counter()
            for i, beta in enumerate(BETAS[: shape["points"]]):
                store = ({"ref_cache_dir": str(tmp / "store")} if provider == "shared-store"
                         else {"precompute_ref_log_probs": True})  # fmt: skip
                trainer = _trainer(model_dir, rows, device, str(tmp / f"run{i}"), steps, batch,
                                   beta=beta, **store)  # fmt: skip
                trainer.train()
                del trainer
            wall = time.perf_counter() - t0
            shutil.rmtree(tmp, ignore_errors=True)
            return [wall]

        case.timer = timer
        return case

    case.items = {"pairs": batch}
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    extra = {"ref_cache_dir": str(tmp / "store")} if provider == "cached" else {}

    def prepare(warmup: int, reps: int) -> None:
        state["warmup"] = warmup = max(warmup, 1)
        state["steps"] = total = warmup + reps
        if provider == "cached":  # fill the store first; the measured trainer finds it complete
            _trainer(model_dir, rows, device, str(tmp / "fill"), total, batch, **extra)
        import gc

        gc.collect()
        before = _proc_kb("VmRSS")
        state["trainer"] = _trainer(model_dir, rows, device, str(tmp / "run"), total, batch,
                                    **extra)  # fmt: skip
        case.extra = {"trainer_mem": ("MiB", (_proc_kb("VmRSS") - before) / 1024)}
        state["trainer"].add_callback(Stamp())

    def timer() -> list[float]:
        state["trainer"].train()
        shutil.rmtree(tmp, ignore_errors=True)
        w = state["warmup"]
        return [b - a for a, b in zip(stamps[w - 1 : -1], stamps[w:], strict=True)]

    case.prepare, case.timer = prepare, timer
    return case
