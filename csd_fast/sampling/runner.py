"""What `csd sample`, `csd score` and `csd translate` share: workers, shards, progress, exit.

    run_shards(store, my_shards, work, progress_total, label)   # work(j) -> pyarrow Table
    launch_data_parallel("sample", argv, profile, n)            # one engine process per device
    exit_cleanly(code)                                          # after results are on disk

Data parallel: the parent prepares the output folder (manifest, `--overwrite`), then starts one
`python -m csd_fast <stage> ... --dp-rank r --dp-size D` per visible device with only that device
in its mask; rank r of array task i (`--shard i/N`) is worker i * D + r of N * D, and owns the
shards j with j % (N * D) == i * D + r. Shard files never depend on the split, so a run resumed on
another number of nodes or devices continues where the last one stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable


def worker_index(shard: tuple[int, int], dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(worker, num_workers) of data-parallel rank dp_rank in array task shard = (i, N)."""
    i, n = shard
    return i * dp_size + dp_rank, n * dp_size


def run_shards(
    store,
    shards: list[int],
    work: Callable[[int], object],
    *,
    total: int,
    unit: str,
    label: str,
    rows_per_unit: int = 1,
    position: int = 0,
) -> int:
    """Run `work` on each shard not yet finished and write it; -> rows written by this worker."""
    from tqdm.auto import tqdm

    todo = [j for j in shards if not store.is_done(j)]
    skipped = len(shards) - len(todo)
    done_units = sum(store.units(j)[1] - store.units(j)[0] for j in shards if j not in todo)
    if skipped:
        print(
            f"[{label}] resuming: {skipped} of {len(shards)} shard(s) already written", flush=True
        )
    bar = tqdm(
        total=total,
        initial=0,
        unit=unit,
        desc=label,
        position=position,
        dynamic_ncols=True,
        smoothing=0.1,
        leave=True,
    )
    bar.set_postfix_str(f"{done_units * rows_per_unit} {unit}s from earlier runs")
    written = 0
    t0 = time.perf_counter()
    # fault injection for the resume tests: a real SIGKILL after this many shards are written
    kill_after = int(os.environ.get("CSD_FAULT_KILL_AFTER_SHARDS", "0") or 0)
    for n, j in enumerate(todo, 1):
        table = work(j)
        store.write(j, table)
        if kill_after and n >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        written += table.num_rows
        start, stop = store.units(j)
        bar.update((stop - start) * rows_per_unit)
    bar.close()
    elapsed = time.perf_counter() - t0
    if todo:
        rate = written / elapsed if elapsed > 0 else float("inf")
        print(
            f"[{label}] wrote {written} rows in {len(todo)} shard(s), {elapsed:.1f} s "
            f"({rate:.1f} rows/s)",
            flush=True,
        )
    return written


def launch_data_parallel(stage: str, argv: list[str], profile, num: int) -> int:
    """Start `num` engine processes, device d masked to profile.devices[d]; -> worst exit code."""
    devices = profile.devices or [None] * num
    if len(devices) < num:
        raise SystemExit(f"--data-parallel {num}: only {len(devices)} device(s) visible")
    procs = []
    for rank in range(num):
        env = dict(os.environ)
        for k, v in profile.device_env(devices[rank]).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        cmd = [
            sys.executable,
            "-m",
            "csd_fast",
            stage,
            *argv,
            "--dp-rank",
            str(rank),
            "--dp-size",
            str(num),
        ]
        mask = f" {profile.device_mask}={devices[rank]}" if profile.device_mask else ""
        print(f"[{stage}] rank {rank}:{mask} {' '.join(cmd[3:])}", flush=True)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    failed = [r for r, c in enumerate(codes) if c != 0]
    if failed:
        print(
            f"[{stage}] data-parallel rank(s) {failed} failed (exit codes "
            f"{[codes[r] for r in failed]}); rerun the same command to resume",
            file=sys.stderr,
        )
        return max(codes[r] for r in failed)
    return 0


def _is_cli_process() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("csd_fast"):
        return True
    return os.path.basename(sys.argv[0]) in ("csd", "csd-sample", "csd-score", "csd-translate")


def exit_cleanly(code: int, engine_used: bool) -> int:
    """Return `code`, or in a `csd` process that ran vLLM, end it now with that code.

    Results are already written and fsynced and the engine shut down; vLLM's teardown at
    interpreter exit has been seen to abort (exit 134) after a successful run, which SLURM and
    scripts would read as a failure. So the CLI process flushes its streams and leaves.
    """
    if engine_used and _is_cli_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
