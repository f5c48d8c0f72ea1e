"""Fault injection: kill -9 of real `csd train` processes at 20 seeded points; two writers.

Run: python -m pytest tests/test_faults.py -q      (one worker process, ~1 min on 2 cores)

tests/fault_worker.py does the work (its docstring lists the kill points: os.replace calls,
torn torch.save files, manifest checksums, torn metrics lines, between optimizer and schedule
steps, the reference precompute, and timed kills from outside). Here we assert what a user is
promised: whatever the kill point, continuing the run (`--resume`, or `--overwrite_output_dir`
when nothing complete was saved) ends with the weights and the metrics of the run that was
never interrupted, bit for bit; and a second writer on a busy directory is refused at once,
naming the holder, without touching the first run's results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SEEDS = list(range(20))
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    proc = subprocess.run(
        [sys.executable, str(HERE / "fault_worker.py"), str(work), *map(str, SEEDS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_run_resumes_to_the_uninterrupted_result(report, seed):
    result = next(r for r in report["seeds"] if r["seed"] == seed)
    final = result["runs"][-1]
    assert final["rc"] == 0, result
    assert result["equal"], result  # final weights (bytes) and metrics.jsonl rows equal
    kills = [r for r in result["runs"][:-1]]
    # a kill point past the end of a run lets it finish; every other one is a real SIGKILL
    assert all(r["rc"] in (-9, 0) for r in kills), result


@pytest.mark.slow
def test_the_seeds_cover_every_kill_point_and_both_recoveries(report):
    """The 20 seeds are only worth something if they hit each kind of point and of recovery."""
    killed = [r for s in report["seeds"] for r in s["runs"] if r["rc"] == -9]
    assert {r["site"] for r in killed} >= {
        "replace",
        "torch_save",
        "hash",
        "metrics",
        "sched",
        "ref",
        "timer",
    }
    recoveries = {tuple(r["flags"]) for s in report["seeds"] for r in s["runs"][1:]}
    assert ("--resume",) in recoveries and ("--overwrite_output_dir",) in recoveries
    precompute_kills = [
        s
        for s in report["seeds"]
        if s["config"] == "precompute"
        and s["runs"][0]["site"] == "ref"
        and s["runs"][0]["rc"] == -9
    ]
    assert precompute_kills, "no kill landed inside the reference precompute"
    # a run killed while holding the lock leaves its name behind: the next run reports it
    assert any(s["stale_lock_reported"] for s in report["seeds"])


@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_naming_the_holder(report):
    two = report["two_writers"]
    assert two["rc_b"] == 2, two
    assert f"pid {two['a_pid']}" in two["b_stderr"] and "Traceback" not in two["b_stderr"]
    assert two["rc_a"] == 0 and two["equal"], two  # the first run is untouched by the second
