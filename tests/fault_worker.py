"""Fault injection for `csd train`: real SIGKILLs of real training processes, many per launch.

    python tests/fault_worker.py WORKDIR SEED [SEED ...]     # writes WORKDIR/report.json

Run by tests/test_faults.py. This process imports torch and the engine once and then only
orchestrates: every training run is a forked child that calls `csd_fast.cli.main` (the `csd
train` code path: lock, used-directory policy, checkpoint verification, training). A child dies
by SIGKILL, sent by itself at a chosen point or by this parent after a random delay:

    replace     the n-th os.replace (config.yaml, checkpoint renames, metrics, ref cache, state)
    torch_save  right after the n-th torch.save, its file truncated to a random length first
    hash        during the n-th checksum of a checkpoint manifest (files written, manifest not)
    metrics     in the middle of writing the n-th metrics.jsonl line (a torn line)
    sched       between the n-th optimizer step and its schedule step
    ref         in the n-th reference forward (the precompute, with precompute_ref_log_probs)
    timer       from outside, after a random fraction of the uninterrupted run's duration

The counts come from an uninterrupted run of the same config, so each n lands inside the run.
After the kill the run is continued as a user would: `--resume` (or `--overwrite_output_dir`
when no complete checkpoint exists); some seeds kill the resumed run too. The finished run must
equal the uninterrupted one: final weights byte for byte, metrics.jsonl row for row.
`two_writers` pauses a run mid-training and starts a second on the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

os.environ.update(
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    HF_HUB_OFFLINE="1",
    TQDM_DISABLE="1",
    CSD_FAST_CACHE="off",
    TOKENIZERS_PARALLELISM="false",
)
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402,F401
import matplotlib  # noqa: E402
import torch  # noqa: E402
from safety_helpers import comparable, train_flags, write_tiny_run  # noqa: E402

# imported once here, so a forked run pays only for its own work (no torch ops run here: a
# parent that never started a thread pool forks safely)
import csd_fast.cli  # noqa: E402,F401
import csd_fast.data  # noqa: E402,F401
import csd_fast.loop  # noqa: E402,F401
import csd_fast.trainer  # noqa: E402,F401

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401

from csd_fast.reporting import read_metrics  # noqa: E402

CONFIGS = {
    "plain": ["--eval_strategy", "steps"],
    "precompute": [
        "--precompute_ref_log_probs",
        "true",
        "--gradient_accumulation_steps",
        "2",
        "--save_total_limit",
        "2",
    ],
    "packed": ["--prefix_sharing", "true", "--max_tokens_per_batch", "96"],
}
SITES = ("replace", "torch_save", "hash", "metrics", "sched", "ref", "timer")


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(site: str | None, n: int, rng: random.Random, counts: dict) -> None:
    """Patch the child's functions: count every site; die at the n-th call of `site`."""
    import csd_fast.manifest as manifest
    from csd_fast.reporting import MetricsWriter
    from csd_fast.trainer import DPOTrainer

    def hit(name: str) -> bool:
        counts[name] = counts.get(name, 0) + 1
        return name == site and counts[name] == n

    real_replace, real_save, real_hash = os.replace, torch.save, manifest._sha256
    real_write, real_ref = MetricsWriter.write, DPOTrainer._ref_logps
    real_sched = torch.optim.lr_scheduler.LambdaLR.step

    def replace(src, dst, *a, **k):
        if hit("replace"):
            _die()
        return real_replace(src, dst, *a, **k)

    def save(obj, f, *a, **k):
        out = real_save(obj, f, *a, **k)
        if hit("torch_save"):
            size = os.path.getsize(f)
            os.truncate(f, rng.randrange(size))
            _die()
        return out

    def sha(path):
        if hit("hash"):
            _die()
        return real_hash(path)

    def write(self, step, logs):
        if hit("metrics"):
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **logs}, default=str)[:20])
            _die()
        return real_write(self, step, logs)

    def sched(self, *a, **k):
        if hit("sched"):
            _die()
        return real_sched(self, *a, **k)

    def ref(self, batch):
        if hit("ref"):
            _die()
        return real_ref(self, batch)

    os.replace, torch.save, manifest._sha256 = replace, save, sha
    MetricsWriter.write, DPOTrainer._ref_logps = write, ref
    torch.optim.lr_scheduler.LambdaLR.step = sched


def run_child(log: Path, argv: list[str], site=None, n=0, seed=0, timer=None, pause=None):
    """Fork a `csd train` run; returns (exit code or -signal, seconds, counts or None)."""
    counts_file = log.with_suffix(".counts.json")
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            torch.set_num_threads(1)
            counts: dict = {}
            _install(site, n, random.Random(seed), counts)
            if pause is not None:
                _install_pause(pause)
            from csd_fast.cli import main

            code = main(argv)
            counts_file.write_text(json.dumps(counts))
        except BaseException as e:  # noqa: BLE001  a child must never return into the parent
            import traceback

            traceback.print_exc()
            code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if timer is not None:
        deadline = start + timer
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else None
    return rc, time.perf_counter() - start, counts


def _install_pause(folder: Path) -> None:
    """At the second optimizer step: say so (ready) and wait until told to go on."""
    real = torch.optim.lr_scheduler.LambdaLR.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # 1 is the constructor's own step
            (folder / "ready").write_text(str(os.getpid()))
            deadline = time.time() + 120
            while not (folder / "go").exists() and time.time() < deadline:
                time.sleep(0.02)
        return real(self, *a, **k)

    torch.optim.lr_scheduler.LambdaLR.step = step


def outcome(out: Path) -> dict:
    weights = out / "final" / "model.safetensors"
    return {
        "weights": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None,
        "metrics": comparable(read_metrics(out)) if (out / "metrics.jsonl").exists() else None,
    }


def flags_for(assets, out: Path, config: str, *extra: str) -> list[str]:
    cfg = list(CONFIGS[config])
    if config == "precompute":
        cfg += ["--ref_cache_dir", str(out.parent / f"{out.name}-refcache")]
    return train_flags(assets, out, *cfg, *extra, eval_set=config == "plain")


def run_seed(seed: int, assets, work: Path, refs: dict) -> dict:
    rng = random.Random(seed)
    config = sorted(CONFIGS)[seed % len(CONFIGS)]
    ref = refs[config]
    out = work / f"seed{seed}"
    sites = [s for s in SITES if s == "timer" or ref["counts"].get(s)]
    kills = [rng.choice(sites) for _ in range(2 if rng.random() < 0.35 else 1)]
    if config == "precompute" and rng.random() < 0.5:
        kills[0] = "ref"  # inside the reference precompute (its first calls)
    runs, stale_seen, extra = [], False, []
    for i, site in enumerate(kills):
        total = ref["counts"].get(site, 1)
        n = rng.randint(1, total) if i == 0 else rng.randint(1, max(1, total // 3))
        if site == "ref" and config == "precompute":
            n = rng.randint(1, 2)  # 16 pairs in batches of 8: the precompute's two forwards
        timer = rng.uniform(0.3, 1.0) * ref["seconds"] if site == "timer" else None
        log = work / f"seed{seed}-run{i}.log"
        rc, _, _ = run_child(
            log,
            flags_for(assets, out, config, *extra),
            site=None if timer else site,
            n=n,
            seed=seed,
            timer=timer,
        )
        runs.append({"site": site, "n": n, "timer": timer, "rc": rc, "flags": extra})
        extra = _next_flags(out)
    for attempt in range(2):  # a resume that finds nothing to resume: start over instead
        log = work / f"seed{seed}-final{attempt}.log"
        rc, _, _ = run_child(log, flags_for(assets, out, config, *extra))
        text = log.read_text()
        stale_seen |= "stale lock" in text
        runs.append({"site": None, "rc": rc, "flags": extra, "tail": text[-400:]})
        if rc == 0:
            break
        extra = ["--overwrite_output_dir"]
    return {
        "seed": seed,
        "config": config,
        "runs": runs,
        "stale_lock_reported": stale_seen,
        "equal": outcome(out) == ref["outcome"],
        "killed": any(r["rc"] == -9 for r in runs),
    }


def _next_flags(out: Path) -> list[str]:
    from csd_fast.manifest import newest_complete

    return ["--resume"] if newest_complete(out)[0] is not None else ["--overwrite_output_dir"]


def two_writers(assets, work: Path, refs: dict) -> dict:
    """Run A paused mid-training; run B on the same directory must be refused at once."""
    out, ctl = work / "two-writers", work / "two-writers-ctl"
    ctl.mkdir()
    pid = os.fork()
    if pid == 0:
        rc, _, _ = run_child(work / "writer-a.log", flags_for(assets, out, "plain"), pause=ctl)
        os._exit(rc & 0xFF)
    while not (ctl / "ready").exists():
        time.sleep(0.02)
    a_pid = int((ctl / "ready").read_text())
    rc_b, seconds_b, _ = run_child(work / "writer-b.log", flags_for(assets, out, "plain"))
    (ctl / "go").write_text("")
    _, status = os.waitpid(pid, 0)
    return {
        "rc_a": os.waitstatus_to_exitcode(status),
        "rc_b": rc_b,
        "a_pid": a_pid,
        "b_stderr": (work / "writer-b.log").read_text()[-600:],
        "b_seconds": seconds_b,
        "equal": outcome(out) == refs["plain"]["outcome"],
    }


def main(work: Path, seeds: list[int]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    pid = os.fork()  # the assets need torch ops: build them in a child, the parent stays bare
    if pid == 0:
        write_tiny_run(work / "assets")
        os._exit(0)
    os.waitpid(pid, 0)
    assets = write_tiny_run(work / "assets")  # paths only: the model exists now
    refs = {}
    for config in CONFIGS:
        out = work / f"ref-{config}"
        rc, seconds, counts = run_child(work / f"ref-{config}.log", flags_for(assets, out, config))
        if rc != 0:
            raise SystemExit(
                f"reference run {config} failed:\n{(work / f'ref-{config}.log').read_text()}"
            )
        refs[config] = {"seconds": seconds, "counts": counts, "outcome": outcome(out)}
    report = {
        "seeds": [run_seed(s, assets, work, refs) for s in seeds],
        "two_writers": two_writers(assets, work, refs),
        "reference_counts": {c: r["counts"] for c, r in refs.items()},
    }
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
