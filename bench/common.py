"""Benchmark harness: providers side by side, each case timed and memory-measured in its own process

A benchmark module (`bench/ops_*.py`, `bench/e2e_*.py`) declares

    NAME = "fused_linear_logprob"            # op_or_scenario column
    PROVIDERS = ("eager", "ours", ...)        # measured in this order, in the same run
    MODES = ("fwd", "fwd+bwd")
    PRESETS = {"quick": [shape, ...], "gpu": [...]}   # shape: a dict of ints / strings
    def setup(provider, mode, shape, device) -> Case   # raise Skip("why") if it cannot run

and `run_bench` spawns `python -m bench.common '<json>'` once per (shape, mode, provider). The child
builds the inputs, runs the case once (warm-up, compile), measures the peak memory of one more run
above the baseline (inputs allocated, imports done), then times it:

* CPU: `warmup` untimed runs, then `reps` runs timed with time.perf_counter -> p50 / p20 / p80.
  Peak memory: VmHWM from /proc/self/status after resetting it through /proc/self/clear_refs,
  minus VmRSS at the baseline. glibc keeps freed heap pages resident, so the child fixes the mmap
  threshold (MALLOC_MMAP_THRESHOLD_) and big tensors go back to the OS when freed; otherwise the
  warm-up run would hide the measured run's peak inside the baseline.
* GPU: triton.testing.do_bench (CUDA events) quantiles; torch.cuda.max_memory_allocated after reset.

Rows go to `<results dir>/<device slug>.csv` (long format, see bench/README.md), one write per run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLUMNS = (
    "op_or_scenario", "provider", "mode", "shape", "metric", "unit", "p50", "p20", "p80",
    "device", "torch", "triton", "git_sha", "timestamp",
)  # fmt: skip
_RESULT_TAG = "BENCH_RESULT "


class Skip(Exception):
    """Raised by a benchmark's setup when a provider cannot run here (the reason is printed)."""


@dataclass
class Case:
    """What `setup` returns: `fn` runs the work once; the counts turn times into rates."""

    fn: Callable[[], object] | None = None
    flops: float | None = None  # model FLOPs of one call (no recompute) -> TFLOP/s
    bytes: float | None = None  # minimal HBM/DRAM traffic of one call -> GB/s
    items: dict[str, float] = field(default_factory=dict)  # e.g. {"tokens": n} -> tokens/s
    # e2e scenarios time themselves (step callbacks): prepare(warmup, reps) builds the trainer
    # outside the memory window, then timer() trains and returns seconds per measured step
    prepare: Callable[[int, int], None] | None = None
    timer: Callable[[], list[float]] | None = None
    extra: dict[str, tuple[str, float]] = field(default_factory=dict)  # metric -> (unit, value)


def results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS_DIR", REPO / "bench" / "results"))


def device_slug(device: str) -> str:
    """'cpu-<model name>' or the GPU name, lowercased with dashes: 'nvidia-h100-80gb-hbm3'."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu-" + _cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = ""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {"torch": torch.__version__, "triton": triton_v, "git_sha": sha}


def shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def parse_shape(s: str) -> dict:
    out = {}
    for part in filter(None, s.split(",")):
        k, v = part.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) with linear interpolation."""
    s = sorted(xs)

    def q(p: float) -> float:
        i = p * (len(s) - 1)
        lo = int(i)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return q(0.5), q(0.2), q(0.8)


def append_rows(rows: list[dict], path: Path) -> None:
    """Append rows in one write (header first if new) so that concurrent runs never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    new = not path.exists() or path.stat().st_size == 0
    if new:
        w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in COLUMNS})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode())
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ child side
def _proc_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def _cpu_peak(fn: Callable[[], object]) -> float:
    """Bytes of peak RSS above the current RSS during one call of fn."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _proc_kb("VmRSS")
        fn()
        return max(_proc_kb("VmHWM") - base, 0) * 1024.0
    except OSError:  # not Linux / not allowed: ru_maxrss only ever grows, so this can under-read
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, 0) * 1024.0


def _gpu_peak(fn: Callable[[], object]) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def measure(case: Case, device: str, warmup: int, reps: int) -> dict:
    """Run one case: -> {"times": [s, ...], "peak_bytes": b}."""
    if case.timer is not None:  # e2e: the baseline is the built trainer; peak over the whole run
        if case.prepare is not None:
            case.prepare(warmup, reps)
        out: dict = {}
        peak = (_gpu_peak if device == "cuda" else _cpu_peak)(
            lambda: out.setdefault("t", case.timer())
        )
        return {"times": out["t"], "peak_bytes": peak}
    fn = case.fn
    fn()  # first call: lazy init, torch.compile, autotuning
    peak = (_gpu_peak if device == "cuda" else _cpu_peak)(fn)
    if device == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"times": [t / 1e3 for t in q], "quantiles": True, "peak_bytes": peak}
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak_bytes": peak}


def _child(spec: dict) -> None:
    mod = importlib.import_module(f"bench.{spec['module']}")
    try:
        case = mod.setup(spec["provider"], spec["mode"], spec["shape"], spec["device"])
        res = measure(case, spec["device"], spec["warmup"], spec["reps"])
        res.update(flops=case.flops, bytes=case.bytes, items=case.items, extra=case.extra)
    except Skip as e:
        res = {"skip": str(e)}
    except Exception as e:  # a provider that breaks must not take the whole run down
        res = {"skip": f"error: {type(e).__name__}: {e}"[:300]}
    print(_RESULT_TAG + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------- parent side
def run_case(spec: dict, timeout: float = 900) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    try:
        p = subprocess.run([sys.executable, "-m", "bench.common", json.dumps(spec)], cwd=REPO,
                           env=env, text=True, capture_output=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"skip": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"skip": f"crashed (rc={p.returncode}): {tail[0][:200]}"}


def result_rows(name: str, provider: str, mode: str, shape: dict, res: dict) -> list[dict]:
    """Turn one child result into long-format rows (without the run-wide columns)."""
    if res.get("quantiles"):
        p50, p20, p80 = res["times"]
    else:
        p50, p20, p80 = quantiles(res["times"])
    base = {"op_or_scenario": name, "provider": provider, "mode": mode, "shape": shape_str(shape)}
    # rates: the p20 of a rate is work / p80 of time (slower time, lower rate)
    metrics = [("time", "ms", p50 * 1e3, p20 * 1e3, p80 * 1e3)]
    for key, scale, metric, unit in (("flops", 1e12, "tflops", "TFLOP/s"),
                                     ("bytes", 1e9, "gbps", "GB/s")):  # fmt: skip
        if res.get(key):
            w = res[key] / scale
            metrics.append((metric, unit, w / p50, w / p80, w / p20))
    for item, count in (res.get("items") or {}).items():
        metrics.append((f"{item}_per_s", f"{item}/s", count / p50, count / p80, count / p20))
    for metric, (unit, value) in (res.get("extra") or {}).items():
        metrics.append((metric, unit, value, value, value))
    mem = res["peak_bytes"] / 2**20
    metrics.append(("peak_mem", "MiB", mem, mem, mem))
    return [dict(base, metric=m, unit=u, p50=f"{a:.6g}", p20=f"{b:.6g}", p80=f"{c:.6g}")
            for m, u, a, b, c in metrics]  # fmt: skip


def run_bench(mod, preset: str, device: str, warmup: int, reps: int, only: set | None = None,
              shapes: list[dict] | None = None, log=print) -> list[dict]:  # fmt: skip
    """All (shape, mode, provider) cases of one module's preset (or of `shapes`) -> rows without
    the run-wide columns (see `finish_rows`)."""
    rows: list[dict] = []
    modname = mod.__name__.rsplit(".", 1)[-1]
    for entry in shapes or mod.PRESETS.get(preset, []):
        shape = dict(entry)  # a preset entry may restrict providers / modes for its shape
        providers = shape.pop("providers", None)
        for mode in shape.pop("modes", None) or mod.MODES:
            for provider in providers or mod.PROVIDERS:
                if only and provider not in only:
                    continue
                spec = dict(module=modname, provider=provider, mode=mode, shape=shape,
                            device=device, warmup=warmup, reps=reps)  # fmt: skip
                t0 = time.perf_counter()
                res = run_case(spec)
                tag = f"{mod.NAME:<22} {mode:<8} {provider:<24} {shape_str(shape)}"
                if "skip" in res:
                    log(f"  skip {tag}: {res['skip']}")
                    continue
                new = result_rows(mod.NAME, provider, mode, shape, res)
                t, m = new[0], new[-1]
                log(f"  {tag}  {float(t['p50']):9.2f} ms  {float(m['p50']):9.1f} MiB"
                    f"  ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
                rows += new
    return rows


def finish_rows(rows: list[dict], device: str) -> list[dict]:
    env = environment()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [dict(r, device=device_slug(device), timestamp=stamp, **env) for r in rows]


if __name__ == "__main__":
    # run the imported copy, so that `Skip` raised by benchmarks is the class caught in _child
    from bench.common import _child as child

    child(json.loads(sys.argv[1]))
