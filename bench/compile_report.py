"""Compile report: every kernel x autotune config x dtype, compiled for real GPUs on a CPU machine.

    python -m bench compile                          # full matrix -> bench/results/compile.csv
    python -m bench compile --subset ci --out x.csv  # the CI subset (tests/kernels/test_compile.py)

Triton compiles for a target without a device: `triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget(...))` gives PTX + cubin (sm80, sm90) or AMDGCN + hsaco (gfx90a).
Read from the binaries, per kernel variant:

  registers      cuobjdump --dump-resource-usage REG (CUDA); TotalNumVgprs (AMDGCN, VGPR + AGPR)
  spill_bytes    CUDA: the per-thread STACK frame (Triton kernels have no local arrays, so any
                 stack is spills); AMDGCN: ScratchSize per lane, and vgpr_spill_count > 0
  shared_bytes   the launch's dynamic shared memory / LDS (metadata.shared)
  occupancy      CUDA: resident blocks per SM from registers, shared memory and warp slots
                 (sm80/sm90: 64K registers, 64 warps, 164 / 228 KiB); AMDGCN: the compiler's own
                 "; Occupancy:" (waves per SIMD)

Each kernel is compiled in its worst-case variant (softcap, stats / dbias on, H spanning many
blocks), since that is the one that spills first. TRITON_INTERPRET must be unset in the process
that compiles (the interpreter replaces @triton.jit), so this module runs the work in a clean
subprocess when it finds it set. A failed compile is a row with status "error: ..." - never a crash.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"sm80": ("cuda", 80, 32), "sm90": ("cuda", 90, 32), "gfx90a": ("hip", "gfx90a", 64)}
SM_LIMITS = {"sm80": (65536, 64, 164 * 1024), "sm90": (65536, 64, 228 * 1024)}  # regs, warps, smem
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
FIELDS = ["kernel", "target", "dtype", "config", "registers", "spill_bytes", "shared_bytes",
          "occupancy", "compile_s", "status", "triton"]  # fmt: skip
FLOAT_SCALARS = {"logit_scale", "softcap", "inv_temp", "beta", "label_smoothing"}


def kernel_specs() -> list[dict]:
    """(name, jit function, config rows per target, pointer dtypes, worst-case constexprs)."""
    from csd_fast.kernels import autotune, linear_pair_loss, logprob_triton, pair_loss

    def rows(table):
        return lambda tgt, dtype: [
            ((bn, bv, bh), w, s)
            for bn, bv, bh, w, s in autotune.table_rows(table, tgt, fp32=dtype == "fp32")
        ]

    head = dict(h_ptr="IN", w_ptr="IN", b_ptr="IN", labels_ptr="i64")
    pair = {"offsets_ptr": "i64"}
    tile = lambda tgt, _: [((autotune.tile_block(tgt),), autotune.tile_warps(tgt), 1)]
    block_t = lambda tgt, _: [((autotune.pair_loss_block(tgt),), 4, 1)]
    return [
        dict(name="logprob_fwd", fn=logprob_triton._logprob_fwd_kernel,
             configs=rows(autotune._LOGPROB_FWD), ptrs=head,
             const=dict(SPLIT_V=2, HAS_BIAS=True, HAS_SOFTCAP=True, HAS_STATS=True, UPCAST=False)),
        dict(name="logprob_bwd_dh", fn=logprob_triton._logprob_bwd_dh_kernel,
             configs=rows(autotune._LOGPROB_BWD_DH), ptrs=head,
             const=dict(SPLIT_V=2, HAS_BIAS=True, HAS_SOFTCAP=True, ONE_H=False, UPCAST=False)),
        dict(name="logprob_bwd_dw", fn=logprob_triton._logprob_bwd_dw_kernel,
             configs=rows(autotune._LOGPROB_BWD_DW), ptrs=head,
             const=dict(HAS_BIAS=True, HAS_SOFTCAP=True, NEED_DW=True, NEED_DB=True,
                        ONE_H=False, UPCAST=False)),
        dict(name="pair_loss_fwd", fn=pair_loss._pair_loss_fwd_kernel, dtypes=("fp32",),
             configs=block_t, ptrs=pair,
             const=dict(LOSS=4, HAS_SFT=True), blocks=("BLOCK_T",)),
        dict(name="pair_loss_bwd", fn=pair_loss._pair_loss_bwd_kernel, dtypes=("fp32",),
             configs=block_t, ptrs=pair,
             const={}, blocks=("BLOCK_T",)),
        dict(name="tile_softmax_stats", fn=linear_pair_loss._tile_softmax_kernel, dtypes=("fp32",),
             configs=tile, ptrs={"labels_ptr": "i64"},
             const=dict(HAS_SOFTCAP=True, HAS_STATS=True), blocks=("BLOCK_V",)),
        dict(name="tile_grad", fn=linear_pair_loss._tile_grad_kernel, dtypes=("fp32",),
             configs=tile, ptrs={"labels_ptr": "i64"}, const=dict(HAS_SOFTCAP=True),
             blocks=("BLOCK_V",)),
    ]  # fmt: skip


def _signature(fn, ptrs: dict, const: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = ptrs.get(name, "fp32")
            sig[name] = "*" + (DTYPES[dtype] if kind == "IN" else kind)
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def _cuda_usage(cubin: bytes, tgt: str, warps: int, shared: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(90).path).with_name("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    static_smem = int(re.search(r"SHARED:(\d+)", out).group(1))
    reg_file, max_warps, smem = SM_LIMITS[tgt]
    per_warp = -(-regs * 32 // 256) * 256  # allocated in units of 256 registers per warp
    by_regs = reg_file // max(1, per_warp * warps)
    by_smem = smem // max(1, shared + static_smem) if shared + static_smem else max_warps
    return regs, stack, min(max_warps // warps, by_regs, by_smem)


def _hip_usage(amdgcn: str) -> tuple[int, int, int]:
    def num(pattern):
        m = re.search(pattern, amdgcn)
        return int(m.group(1)) if m else 0

    regs = num(r";\s*TotalNumVgprs:\s*(\d+)") or num(r";\s*NumVgprs:\s*(\d+)")
    spills = num(r";\s*ScratchSize:\s*(\d+)")
    if num(r"\.vgpr_spill_count:\s*(\d+)") and not spills:
        spills = 4 * num(r"\.vgpr_spill_count:\s*(\d+)")
    return regs, spills, num(r";\s*Occupancy:\s*(\d+)")


def compile_one(spec: dict, tgt: str, dtype: str, cfg: tuple) -> dict:
    import triton
    from csd_fast.kernels import autotune
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    blocks, warps, stages = cfg
    names = spec.get("blocks", ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    const = dict(spec["const"], **dict(zip(names, blocks, strict=True)))
    if "DOT_PRECISION" in spec["fn"].arg_names:
        import torch

        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        const["DOT_PRECISION"] = autotune.dot_precision(torch_dtype[dtype])
    row = dict(kernel=spec["name"], target=tgt, dtype=dtype, triton=triton.__version__,
               config=config_label(spec, cfg))  # fmt: skip
    t0 = time.perf_counter()
    try:
        src = ASTSource(spec["fn"], _signature(spec["fn"], spec["ptrs"], const, dtype), const)
        opts = dict(num_warps=warps, num_stages=stages)
        k = triton.compile(src, target=GPUTarget(*TARGETS[tgt]), options=opts)
        shared = int(k.metadata.shared)
        if TARGETS[tgt][0] == "cuda":
            regs, spill, occ = _cuda_usage(k.asm["cubin"], tgt, warps, shared)
        else:
            regs, spill, occ = _hip_usage(k.asm["amdgcn"])
        row.update(registers=regs, spill_bytes=spill, shared_bytes=shared, occupancy=occ,
                   status="ok")  # fmt: skip
    except Exception as e:  # a config that does not compile is a finding, not a crash
        row.update(registers="", spill_bytes="", shared_bytes="", occupancy="",
                   status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}")  # fmt: skip
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def plan(subset: str) -> list[tuple[dict, str, str, tuple]]:
    """(spec, target, dtype, config) to compile. "ci" (~1 min on 2 cores): sm90 + gfx90a, bf16 +
    fp32, the first (default) config of each table; the full matrix is `python -m bench compile`
    and its committed rows are checked against the tables by tests/kernels/test_compile.py."""
    out = []
    for spec in kernel_specs():
        for tgt in TARGETS:
            if subset == "ci" and tgt == "sm80":
                continue
            for dtype in spec.get("dtypes", ("bf16", "fp16", "fp32")):
                if subset == "ci" and dtype == "fp16":  # same tiles as bf16
                    continue
                configs = spec["configs"](tgt, dtype)
                out.extend(
                    (spec, tgt, dtype, cfg) for cfg in configs[: 1 if subset == "ci" else None]
                )
    return out


def config_label(spec: dict, cfg: tuple) -> str:
    blocks, warps, stages = cfg
    names = spec.get("blocks", ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    label = ",".join(f"{n}={b}" for n, b in zip(names, blocks, strict=True))
    return f"{label},warps={warps},stages={stages}"


def _worker(args: tuple) -> dict:
    name, tgt, dtype, cfg = args
    spec = next(s for s in kernel_specs() if s["name"] == name)
    return compile_one(spec, tgt, dtype, cfg)


def run(subset: str, out: Path, jobs: int) -> list[dict]:
    work = [(s["name"], t, d, c) for s, t, d, c in plan(subset)]
    if jobs > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(jobs) as pool:
            rows = pool.map(_worker, work, chunksize=1)
    else:
        rows = [_worker(w) for w in work]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)  # atomic: a killed run leaves the previous report intact
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """The goals, read off the rows: every config compiles; no spills on sm90 / gfx90a;
    occupancy >= 2 on gfx90a. Returns the failures (empty: all met)."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['target']} {r['dtype']} {r['config']}"
        if r["status"] != "ok":
            bad.append(f"{where}: {r['status']}")
        elif r["target"] in ("sm90", "gfx90a") and int(r["spill_bytes"]) > 0:
            bad.append(f"{where}: spills {r['spill_bytes']} B ({r['registers']} registers)")
        elif r["target"] == "gfx90a" and int(r["occupancy"]) < 2:
            bad.append(f"{where}: occupancy {r['occupancy']} < 2")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__.split("\n")[0])
    p.add_argument("--subset", choices=("full", "ci"), default="full")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile.csv"))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter cannot compile: start clean
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "bench", "compile", *(argv or [])]
        return subprocess.run(cmd, env=env, cwd=Path(__file__).parent.parent).returncode
    t0 = time.perf_counter()
    rows = run(args.subset, Path(args.out), args.jobs)
    bad = verdict(rows)
    print(f"{len(rows)} kernel variants compiled in {time.perf_counter() - t0:.0f} s -> {args.out}")
    for line in bad:
        print("  FAIL " + line)
    print("verdict:", "all compile, no spills on sm90/gfx90a, gfx90a occupancy >= 2" if not bad
          else f"{len(bad)} goal failures")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
