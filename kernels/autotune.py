"""Launch configurations for the Triton kernels, chosen per target.

The target is read once from the running torch build and device:

    interpreter   TRITON_INTERPRET=1 (CPU CI): one small config, so nothing is benchmarked
    gfx90a / hip  torch.version.hip set (MI250X: wavefront 64, 64 KiB LDS, no TMA / wgmma)
    sm90, sm80    CUDA compute capability 9.x+ / 8.x (A100 and older Ampere-class parts)

Every config is portable Triton (tl.dot on register tiles, no TMA descriptors or warp
specialisation), so the same kernel source runs on all targets; only block sizes, warps and
pipeline stages differ, per target and per dtype class (half / fp32). Shared memory per stage is
(BLOCK_N + BLOCK_V) * BLOCK_H * 2 bytes for bf16, within gfx90a's 64 KiB at num_stages=2; the
real compiler's registers, spills and occupancy for every row: `python -m bench compile`.
Also the per-dtype tl.dot choices (dot_precision, upcast_for_dot) and the vocabulary split counts.

Used by kernels/logprob.py and kernels/pair_loss.py; `python -m csd_fast.kernels.autotune` prints
the target and its configs.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - the CPU path works without triton
    triton = None

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages). Keys "<target>" serve bf16 / fp16,
# "<target>/fp32" the fp32 inputs (tl.dot with input_precision="ieee": FMA, not tensor cores,
# so its tiles hold 2-4x the registers and must be smaller). The sm90 and gfx90a rows are the
# ones that compile with zero spills (and occupancy >= 2 on gfx90a) in bench/results/compile.csv,
# chosen from a sweep with the real compiler; tests/kernels/test_compile.py keeps them that way.
# Register pressure, not shared memory, is the limit: a (BLOCK_N, BLOCK_V) fp32 logits tile, its
# softmax temporaries and the dot accumulator live together, so BLOCK_H stays at 32 on sm90 (the
# reduction depth costs pipelined operand tiles) and wide tiles come with 8 warps.
_LOGPROB_FWD = {
    "interpreter": [(16, 32, 16, 1, 1)],
    "sm90": [(128, 128, 32, 8, 2), (64, 128, 64, 8, 3), (64, 64, 32, 4, 4)],
    "sm90/fp32": [(32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (64, 64, 32, 8, 2)],
    "sm80": [(128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)],
    "sm80/fp32": [(32, 64, 32, 4, 2), (64, 64, 32, 8, 2)],
    # wavefront 64: 4 warps are 256 lanes; LDS 64 KiB caps (BLOCK_N + BLOCK_V) * BLOCK_H * stages
    "gfx90a": [(64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2)],
    "gfx90a/fp32": [(64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (64, 32, 32, 4, 2)],
    "hip": [(64, 64, 64, 4, 2), (128, 64, 32, 8, 2)],
    "other": [(64, 64, 32, 4, 2)],
}
# Backward, dH kernel: one program per row block streams the vocabulary, so BLOCK_V is its reuse
# factor (flops per byte of the fp32 accumulator rows it read-modify-writes when H spans several
# blocks is BLOCK_V / 2): wide BLOCK_V, moderate BLOCK_N. It holds two fp32 (BLOCK_N, BLOCK_V)
# tiles (logits, dlogits) next to the dot accumulator, hence 8 warps for 64 x 256.
_LOGPROB_BWD_DH = {
    "interpreter": [(16, 32, 16, 1, 1)],
    "sm90": [(64, 256, 32, 8, 2), (128, 64, 32, 8, 3), (64, 64, 32, 4, 4)],
    "sm90/fp32": [(32, 32, 32, 4, 2), (32, 64, 16, 4, 2), (32, 64, 32, 4, 1)],
    "sm80": [(64, 256, 32, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 2)],
    "sm80/fp32": [(32, 32, 32, 4, 2), (32, 64, 16, 4, 2)],
    # LDS per stage (BLOCK_N + BLOCK_V) * BLOCK_H * 2 B: (64 + 128) * 64 * 2 * 2 stages = 48 KiB
    "gfx90a": [(64, 128, 64, 8, 2), (128, 64, 64, 8, 2), (64, 64, 64, 4, 2)],
    "gfx90a/fp32": [(64, 64, 16, 4, 2), (64, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
    "hip": [(64, 128, 32, 4, 2), (64, 64, 64, 4, 2)],
    "other": [(64, 64, 32, 4, 2)],
}
# Backward, dW kernel: one program per vocabulary block streams the rows: BLOCK_N is the reuse
# factor, so the mirror image of the dH table.
_LOGPROB_BWD_DW = {
    "interpreter": [(16, 32, 16, 1, 1)],
    "sm90": [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
    "sm90/fp32": [(32, 32, 16, 4, 2), (32, 32, 32, 8, 2), (64, 32, 16, 8, 2)],
    "sm80": [(256, 64, 32, 8, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 2)],
    "sm80/fp32": [(32, 32, 16, 4, 2)],
    "gfx90a": [(128, 64, 64, 8, 2), (64, 128, 64, 8, 2), (64, 64, 64, 4, 2)],
    "gfx90a/fp32": [(64, 64, 16, 4, 2), (32, 32, 32, 4, 2)],
    "hip": [(128, 64, 32, 4, 2), (64, 64, 64, 4, 2)],
    "other": [(64, 64, 32, 4, 2)],
}
GFX90A_LDS_BYTES = 64 * 1024
# Pair loss: one program per pair walks its tokens in blocks of BLOCK_T.
_PAIR_LOSS_BLOCK_T = {"interpreter": 16, "gfx90a": 512, "hip": 512}


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def target() -> str:
    """Name of the config table for this process: interpreter, gfx90a, hip, sm90, sm80, other."""
    if is_interpreter():
        return "interpreter"
    if not torch.cuda.is_available():
        return "other"
    if torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return "gfx90a" if arch.startswith("gfx90a") else "hip"
    major, _ = torch.cuda.get_device_capability()
    if major >= 9:
        return "sm90"
    return "sm80" if major >= 8 else "other"


def table_rows(table: dict, tgt: str | None = None, fp32: bool = False) -> list[tuple]:
    """The (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages) rows of `table` for a target and dtype."""
    tgt = tgt or target()
    if fp32 and f"{tgt}/fp32" in table:
        return table[f"{tgt}/fp32"]
    return table.get(tgt, table["other"])


def _configs(table: dict, tgt: str | None, fp32: bool) -> list:
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
        for bn, bv, bh, w, s in table_rows(table, tgt, fp32)
    ]


def logprob_fwd_configs(tgt: str | None = None, fp32: bool = False) -> list:
    return _configs(_LOGPROB_FWD, tgt, fp32)


def logprob_bwd_dh_configs(tgt: str | None = None, fp32: bool = False) -> list:
    return _configs(_LOGPROB_BWD_DH, tgt, fp32)


def logprob_bwd_dw_configs(tgt: str | None = None, fp32: bool = False) -> list:
    return _configs(_LOGPROB_BWD_DW, tgt, fp32)


def lds_bytes(cfg, elem_bytes: int = 2) -> int:
    """Shared memory the pipelined operand tiles of a logprob config take (bf16 by default)."""
    bn, bv, bh = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_V"], cfg.kwargs["BLOCK_H"]
    return (bn + bv) * bh * elem_bytes * max(1, cfg.num_stages)


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot input_precision: fp32 inputs must not silently drop to tf32 (the fp32 path is held to
    fp32 tolerances); half inputs take the backend default, since gfx90a accepts no "tf32"."""
    return "ieee" if dtype == torch.float32 else None


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """triton 3.9's interpreter returns garbage from tl.dot on bf16 operands (numpy has no bf16);
    widening the exactly-representable bf16 values to fp32 first gives the same products. Real
    GPUs keep bf16 MMA."""
    return is_interpreter() and dtype == torch.bfloat16


def pair_loss_block(tgt: str | None = None) -> int:
    return _PAIR_LOSS_BLOCK_T.get(tgt or target(), 1024)


# Row kernels of the fused head + pair loss (kernels/linear_pair_loss.py): one program per row
# walks the vocabulary in BLOCK_V lanes; 8 elements per thread keeps a handful of per-lane
# accumulators in registers (wavefront 64: 4 warps are 256 lanes).
_TILE_ROW = {"interpreter": (64, 1), "gfx90a": (1024, 4), "hip": (1024, 4)}


def tile_block(tgt: str | None = None) -> int:
    return _TILE_ROW.get(tgt or target(), (2048, 8))[0]


def tile_warps(tgt: str | None = None) -> int:
    return _TILE_ROW.get(tgt or target(), (2048, 8))[1]


def num_programs_hint() -> int:
    """Programs that fill the device about four times over (SMs / CUs x 4); 8 elsewhere."""
    if is_interpreter() or not torch.cuda.is_available():
        return 8
    return 4 * torch.cuda.get_device_properties(0).multi_processor_count


def logprob_split_v(N: int, V: int, block_n: int) -> int:
    """Vocabulary splits of the log-prob forward for a launch with row blocks of `block_n`: enough
    programs to fill the device when N / block_n alone cannot, each split keeping >= 512 columns
    (64 in the interpreter, so the tests cross split boundaries) so the partials stay cheap to
    combine. Evaluated per autotune config (a triton.heuristics on BLOCK_N), never assumed."""
    min_cols = 64 if is_interpreter() else 512
    row_blocks = -(-N // block_n)
    want = -(-num_programs_hint() // row_blocks)
    return max(1, min(-(-V // min_cols), want))


def logprob_max_split_v(N: int, V: int, configs: list) -> int:
    """The most splits any of `configs` can ask for: the partial buffers are sized by it."""
    return max(logprob_split_v(N, V, c.kwargs["BLOCK_N"]) for c in configs)


def logprob_bwd_split_v(N: int, V: int, H: int, block_n: int, budget_bytes: int = 256 << 20) -> int:
    """Vocabulary splits of the dH kernel: as for the forward, but each split costs an fp32 (N, H)
    partial plane, so the planes together stay within `budget_bytes` (one split always allowed)."""
    cap = max(1, budget_bytes // max(1, N * H * 4))
    return max(1, min(logprob_split_v(N, V, block_n), cap))


if __name__ == "__main__":
    print("target:", target())
    tables = ("fwd", logprob_fwd_configs), ("bwd dh", logprob_bwd_dh_configs)
    for name, fn in (*tables, ("bwd dw", logprob_bwd_dw_configs)):
        for cfg in fn():
            print(f"logprob {name}: {cfg}")
    print("pair_loss BLOCK_T:", pair_loss_block())
