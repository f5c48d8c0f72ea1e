"""`csd sweep`: a grid of `csd train` runs sharing tokenization, plans and the reference store.

    csd sweep --config recipe.yaml --grid beta=0.05,0.1,0.2 --grid learning_rate=5e-7,1e-6
    csd train --config recipe.yaml --sweep beta=0.05,0.1        # the same, from csd train
    csd sweep ... --gpus 0,1,2,3       # one run per GPU (default: every visible GPU)
    csd sweep ... --slurm              # write an array job (+ prepare / report jobs) instead

Every grid point is one `csd train` with the recipe, any extra flags given here, and its own
settings, in `<output_dir>/<key=value,...>/`. Unless the recipe names them, the runs share
`<output_dir>/cache/{pairs,ref,plans}`: the data is tokenized once, token-budget plans are made
once, and the reference log-probs are computed once per (model, data, truncation, dtype, ...) —
runs that start together wait on the store's lock and then read it (csd_fast/refstore.py).

Runs are subprocesses, each pinned to one device (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES /
ROCR_VISIBLE_DEVICES, whichever the sweep itself sees) when several are visible, one after another
otherwise; a child dies with the sweep (PR_SET_PDEATHSIG). Each run keeps `sweep_run.json`
(status, attempts, wall time, device) and `train.log`. A failed run is reported and the others go
on. Running the same command again skips finished runs and resumes interrupted ones from their
latest checkpoint (after kill -9 too). At the end: `sweep.csv`, `sweep.png` and a printed table
(csd_fast/pipeline/sweep_report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

STATUS_FILE = "sweep_run.json"
LOG_FILE = "train.log"
SHARED_CACHES = {"dataset_cache_dir": "pairs", "ref_cache_dir": "ref", "plan_cache_dir": "plans"}
DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclass
class Run:
    index: int
    name: str
    settings: dict[str, str]
    dir: Path

    def status(self) -> dict:
        try:
            return json.loads((self.dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, **fields) -> dict:
        record = {**self.status(), "name": self.name, "settings": self.settings, **fields}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{STATUS_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.dir / STATUS_FILE)
        return record

    def finished(self) -> bool:
        return self.status().get("status") == "done" and (self.dir / "final").is_dir()


# ------------------------------------------------------------------------------- the grid
def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`["beta=0.05,0.1", "learning_rate=5e-7"]` -> [("beta", ["0.05", "0.1"]), ...]."""
    from csd_fast.cli import SCRIPT_OPTIONS
    from csd_fast.config import DPOConfig

    known = {f.name for f in dataclasses.fields(DPOConfig)} | set(SCRIPT_OPTIONS)
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise SystemExit(f"csd sweep: --grid {spec!r}: expected KEY=V1,V2,...")
        if key not in known:
            raise SystemExit(f"csd sweep: --grid {spec!r}: {key!r} is not a csd train option")
        if key == "output_dir" or key in SHARED_CACHES:
            raise SystemExit(f"csd sweep: {key} is set by the sweep, it cannot be swept")
        grid.setdefault(key, []).extend(v.strip() for v in values.split(",") if v.strip())
    if not grid:
        raise SystemExit("csd sweep: give at least one --grid KEY=V1,V2")
    return list(grid.items())


def run_name(settings: dict[str, str]) -> str:
    """`beta=0.05,learning_rate=5e-7`: readable, filesystem-safe, unique per settings."""
    name = ",".join(f"{k}={v}" for k, v in settings.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 100:
        digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]
        name = f"{name[:90]}-{digest}"
    return name


def expand(grid: list[tuple[str, list[str]]], root: Path) -> list[Run]:
    keys = [k for k, _ in grid]
    runs = []
    for i, values in enumerate(itertools.product(*(v for _, v in grid))):
        settings = dict(zip(keys, values, strict=True))
        runs.append(Run(i, run_name(settings), settings, root / run_name(settings)))
    return runs


def _flags(settings: dict[str, str]) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", *v.split()]  # "sigmoid sft" -> a list-valued flag's two items
    return out


def train_argv(run: Run, base: list[str], shared: dict[str, str]) -> list[str]:
    from csd_fast.checkpoint import latest_checkpoint

    argv = [*base, *_flags(shared), *_flags(run.settings), "--output_dir", str(run.dir)]
    if latest_checkpoint(run.dir) is not None:
        argv.append("--resume")
    return argv


def shared_caches(root: Path, base: list[str], recipe: dict) -> dict[str, str]:
    """The cache folders the sweep sets: those neither the recipe nor the flags name."""
    given = set(recipe) | {a.lstrip("-").split("=")[0].replace("-", "_") for a in base}
    return {k: str(root / "cache" / sub) for k, sub in SHARED_CACHES.items() if k not in given}


# ------------------------------------------------------------------------------- devices
def visible_devices(gpus: str | None) -> tuple[str, list[str]]:
    """(the variable that pins a child, the device ids a child may get)."""
    for var in DEVICE_VARS:
        if var in os.environ:
            seen = [d.strip() for d in os.environ[var].split(",") if d.strip() not in ("", "-1")]
            return var, gpus.split(",") if gpus else seen
    try:
        import torch

        hip = bool(getattr(torch.version, "hip", None))
        count = torch.cuda.device_count()
    except Exception:  # no torch build with devices: run sequentially
        hip, count = False, 0
    var = "HIP_VISIBLE_DEVICES" if hip else "CUDA_VISIBLE_DEVICES"
    return var, gpus.split(",") if gpus else [str(i) for i in range(count)]


def _die_with_parent() -> None:
    """preexec: the child gets SIGKILL when the sweep dies (Linux), so no orphan keeps writing."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------- running
def start(run: Run, argv: list[str], pin: tuple[str, str] | None) -> subprocess.Popen:
    env = dict(os.environ)
    device = None
    if pin is not None:
        env[pin[0]] = device = pin[1]
    attempts = run.status().get("attempts", 0) + 1
    if "--resume" not in argv:  # a fresh start: an earlier attempt's curves are not this run's
        with contextlib.suppress(FileNotFoundError):
            (run.dir / "metrics.jsonl").unlink()
    run.write_status(status="running", attempts=attempts, started=time.time(), device=device,
                     resumed="--resume" in argv, argv=argv)  # fmt: skip
    log = open(run.dir / LOG_FILE, "a")  # noqa: SIM115 - closed by finish()
    log.write(f"\n[csd sweep] attempt {attempts}; {pin[0] + '=' + pin[1] if pin else 'no pin'}; "
              f"{shlex.join(argv)}\n")  # fmt: skip
    log.flush()
    cmd = [sys.executable, "-m", "csd_fast", "train", *argv]
    preexec = _die_with_parent if os.name == "posix" else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def run_in_process(run: Run, argv: list[str]) -> int:
    """One run in this interpreter (sequential sweeps without the start-up cost of a process);
    an exception or SystemExit is that run's failure, logged like a subprocess's."""
    import traceback

    from csd_fast.cli import main as train_main

    attempts = run.status().get("attempts", 0) + 1
    run.write_status(status="running", attempts=attempts, started=time.time(), device=None,
                     resumed="--resume" in argv, argv=argv)  # fmt: skip
    with open(run.dir / LOG_FILE, "a") as log:
        log.write(f"\n[csd sweep] in process; {shlex.join(argv)}\n")
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                return int(train_main(argv) or 0)
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else 2
            except Exception:
                traceback.print_exc(file=log)
                return 1


def finish(run: Run, returncode: int) -> dict:
    st = run.status()
    wall = st.get("wall_s", 0.0) + time.time() - st.get("started", time.time())
    ok = returncode == 0 and (run.dir / "final").is_dir()
    return run.write_status(status="done" if ok else "failed", returncode=returncode,
                            wall_s=wall, finished=time.time())  # fmt: skip


def run_all(
    runs: list[Run],
    base: list[str],
    shared: dict,
    devices: list[str],
    var: str,
    in_process: bool = False,
) -> None:
    """Every unfinished run: one per device when there are several, else one after another."""
    todo = []
    for run in runs:
        if run.finished():
            print(f"[csd sweep] {run.name}: finished earlier, skipped")
        else:
            todo.append(run)
    slots: list[str | None] = devices if len(devices) > 1 else [None]
    busy: dict[str | None, tuple[Run, subprocess.Popen]] = {}
    while todo or busy:
        for slot in [s for s in slots if s not in busy]:
            if not todo:
                break
            run = todo.pop(0)
            argv = train_argv(run, base, shared)
            how = "resuming" if "--resume" in argv else "starting"
            print(f"[csd sweep] {run.name}: {how}" + (f" on {var}={slot}" if slot else ""))
            if in_process and slot is None:
                st = finish(run, run_in_process(run, argv))
                print(f"[csd sweep] {run.name}: {st['status']} ({st['wall_s']:.1f} s)")
                continue
            busy[slot] = (run, start(run, argv, (var, slot) if slot is not None else None))
        time.sleep(0.2)
        for slot, (run, proc) in list(busy.items()):
            if proc.poll() is None:
                continue
            proc.log.close()
            del busy[slot]
            st = finish(run, proc.returncode)
            print(f"[csd sweep] {run.name}: {st['status']} (exit {proc.returncode}, "
                  f"{st['wall_s']:.1f} s); log: {run.dir / LOG_FILE}")  # fmt: skip


# ------------------------------------------------------------------------------- entry
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csd sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Other flags are passed to every `csd train` run.",
    )
    p.add_argument("--config", help="the recipe every run starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept option and its values (repeat for a product grid)")  # fmt: skip
    p.add_argument("--output_dir", "--output-dir", help="sweep root (default: the recipe's)")
    p.add_argument("--gpus", help="device ids to spread runs over (default: all visible)")
    p.add_argument("--slurm", action="store_true", help="write SLURM jobs instead of running")
    p.add_argument("--slurm_partition")
    p.add_argument("--slurm_account")
    p.add_argument("--slurm_time", default="24:00:00")
    p.add_argument("--slurm_max_parallel", type=int, default=0, help="array %%N limit")
    p.add_argument("--in_process", action="store_true", help="sequential runs in this process")
    p.add_argument("--run_index", type=int, help="run only this grid point (a SLURM array task)")
    p.add_argument("--prepare", action="store_true", help="only fill the caches (SLURM prepare)")
    p.add_argument("--report_only", action="store_true", help="only write sweep.csv / sweep.png")
    return p


def _without_slurm_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--slurm" or a.startswith("--slurm_") and "=" in a:
            continue
        elif a.startswith("--slurm_"):
            skip = True  # its value follows
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from csd_fast.pipeline.sweep_report import report, write_slurm

    args, base = build_parser().parse_known_args(argv)
    grid = parse_grid(args.grid)
    recipe = {}
    if args.config:
        recipe = yaml.safe_load(Path(args.config).read_text()) or {}
        base = ["--config", args.config, *base]
    root = args.output_dir or recipe.get("output_dir")
    if not root:
        raise SystemExit("csd sweep: --output_dir is required (or output_dir in the recipe)")
    root = Path(root)
    runs = expand(grid, root)
    shared = shared_caches(root, base, recipe)
    root.mkdir(parents=True, exist_ok=True)
    var, devices = visible_devices(args.gpus)
    if args.slurm:
        own = _without_slurm_options(argv if argv is not None else sys.argv[1:])
        for path in write_slurm(root, runs, own, args):
            print(f"[csd sweep] wrote {path}")
        print(f"[csd sweep] submit with: bash {root / 'submit.sh'}")
        return 0
    if args.prepare:  # one prepare per reference-relevant setting is enough; the store keys it
        rc = 0
        for run in runs:
            prep = Run(run.index, run.name, run.settings, root / ".prepare" / run.name)
            cmd = [sys.executable, "-m", "csd_fast", "train",
                   *train_argv(prep, base, shared), "--prepare_only"]  # fmt: skip
            rc |= subprocess.call(cmd)
        return rc
    if not args.report_only:
        chosen = runs if args.run_index is None else [runs[args.run_index]]
        spread = f"{len(devices)} devices ({var})" if len(devices) > 1 else "one at a time"
        print(f"[csd sweep] {len(chosen)} run(s) in {root}; {spread}")
        run_all(chosen, base, shared, devices, var, in_process=args.in_process)
        if args.run_index is not None:
            return 0 if runs[args.run_index].finished() else 1
    rows = report(root, runs, [k for k, _ in grid])
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
