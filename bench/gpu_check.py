"""`python -m bench gpu-check`: the first command on a GPU machine (<= 8 min on one H100/H200).

    python -m bench gpu-check                 # tests natively, then the GPU preset's op rows
    python -m bench gpu-check --dry-run       # print the plan, run nothing (works without a GPU)

Steps, each in its own subprocess with a hard timeout (the sum stays within BUDGET_S):
  1. kernel tests natively (Triton compiled for the device, not the interpreter): logprob, the
     fused head + pair loss, pair loss, autotune, the compile-report checks
  2. attention tests natively: packed / prefix == padded, FlexAttention compiled with gradients,
     deterministic mode
  3. the GPU preset of the op benchmarks (head and pair loss at real shapes) -> the device's CSV
  4. the end-to-end GPU preset (1B-class model, csd-all vs bare vs trl), if time is left
Then a verdict: each step's status and time, and the goal ratios read off the new rows, printed
and written to bench/results/<device>-gpu-check.txt. Without a GPU it refuses (exit 2) before
starting anything. The plan is a plain list (`plan()`), unit-tested in tests/test_bench_gpu.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 8 * 60


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    timeout_s: int
    required: bool = True  # a failed required step makes the verdict FAIL


def plan(python: str = sys.executable, with_e2e: bool = True) -> list[Step]:
    pytest = (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x")
    steps = [
        Step("kernel tests (native Triton)", (*pytest, "tests/kernels"), 150),
        Step(
            "attention tests (native flash / flex)",
            (
                *pytest,
                "tests/test_attention.py",
                "tests/test_attention_flex.py",
                "tests/test_determinism.py",
            ),
            90,
        ),  # fmt: skip
        Step(
            "op benchmarks, GPU preset",
            (
                python,
                "-m",
                "bench",
                "--preset",
                "gpu",
                "--only",
                "fused_linear_logprob,fused_pair_loss",
                "--warmup",
                "1",
                "--reps",
                "5",
            ),
            120,
        ),  # fmt: skip
    ]
    if with_e2e:
        steps.append(Step("end-to-end, 1B-class model",
                          (python, "-m", "bench", "--preset", "gpu", "--only", "dpo_train",
                           "--shape", "model=1b,B=8,P=163,C=88", "--providers", "trl,csd-all,bare",
                           "--warmup", "1", "--reps", "3"), 100, required=False))  # fmt: skip
    return steps


def child_env() -> dict[str, str]:
    """The steps' environment: never the interpreter (tests/conftest.py sets it only without a
    GPU, but an inherited TRITON_INTERPRET=1 would silently test the interpreter again)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def gpu_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return False, f"torch not importable: {e}"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA / ROCm device"
    return True, torch.cuda.get_device_name(0)


def run_step(step: Step, env: dict[str, str]) -> tuple[str, float, str]:
    """-> (status "ok" | "FAIL rc=N" | "TIMEOUT", seconds, the output's last lines)."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step.timeout_s)  # fmt: skip
        status = "ok" if done.returncode == 0 else f"FAIL rc={done.returncode}"
        tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
    except subprocess.TimeoutExpired as e:
        status = "TIMEOUT"
        tail = ((e.stdout or b"").decode(errors="replace")).strip().splitlines()[-8:]
    return status, time.perf_counter() - t0, "\n".join(tail)


def verdict(results: list[tuple[Step, str, float, str]]) -> tuple[bool, list[str]]:
    """(passed, lines): passed when every required step is ok."""
    lines, passed = [], True
    for step, status, seconds, tail in results:
        lines.append(f"[{status}] {step.name} ({seconds:.0f} s)")
        if status != "ok":
            lines.extend("    " + t for t in tail.splitlines())
            passed = passed and not step.required
    lines.append("VERDICT: " + ("PASS" if passed else "FAIL"))
    return passed, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench gpu-check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end step")
    args = p.parse_args(argv)
    steps = plan(with_e2e=not args.no_e2e)
    if args.dry_run:
        for s in steps:
            print(f"{s.timeout_s:4d} s  {s.name}: {' '.join(s.argv)}")
        print(f"budget {sum(s.timeout_s for s in steps)} s of {BUDGET_S} s")
        return 0
    ok, device = gpu_available()
    if not ok:
        print(f"gpu-check needs a GPU: {device}. Nothing was run.", file=sys.stderr)
        return 2
    env = child_env()
    results, t0 = [], time.perf_counter()
    for step in steps:
        if time.perf_counter() - t0 + step.timeout_s > BUDGET_S and not step.required:
            results.append((step, "skipped (budget)", 0.0, ""))
            continue
        print(f"-> {step.name}", flush=True)
        results.append((step, *run_step(step, env)))
    passed, lines = verdict(results)
    from bench import common

    lines.insert(0, f"gpu-check on {device}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    out = Path(common.results_dir()) / f"{common.device_slug('cuda')}-gpu-check.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
