"""Every shipped kernel config compiles for sm90 / gfx90a with the real Triton toolchain, unspilled.

    python -m pytest tests/kernels/test_compile.py -q

Two checks, no GPU needed: the committed full report (bench/results/compile.csv, from
`python -m bench compile`) holds a passing row for every config the tables ship today, so a table
edit without a fresh report fails here; and the CI subset (each table's default config, sm90 and
gfx90a, bf16 and fp32) is compiled now, in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
compile_report = pytest.importorskip("bench.compile_report")
pytest.importorskip("triton")


def test_committed_report_covers_every_shipped_config():
    rows = list(csv.DictReader(open(ROOT / "bench" / "results" / "compile.csv")))
    by_key = {(r["kernel"], r["target"], r["dtype"], r["config"]): r for r in rows}
    missing, shipped = [], []
    for spec, tgt, dtype, cfg in compile_report.plan("full"):
        key = (spec["name"], tgt, dtype, compile_report.config_label(spec, cfg))
        if key not in by_key:
            missing.append(key)
        else:
            shipped.append(by_key[key])
    assert not missing, f"configs without a compile row (re-run python -m bench compile): {missing}"
    assert compile_report.verdict(shipped) == []


@pytest.mark.slow
def test_ci_subset_compiles_without_spills(tmp_path):
    out = tmp_path / "compile.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "compile", "--subset", "ci", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stdout + done.stderr
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == len(compile_report.plan("ci"))
    assert compile_report.verdict(rows) == [], done.stdout
    assert done.returncode == 0
    # the numbers are real: registers read off the binaries, shared memory from the launch
    assert all(int(r["registers"]) > 0 for r in rows)
    assert any(int(r["shared_bytes"]) > 0 for r in rows)


def test_verdict_flags_spills_failures_and_low_occupancy():
    base = dict(kernel="k", dtype="bf16", config="c", registers="255", shared_bytes="0")
    rows = [
        dict(base, target="sm90", spill_bytes="0", occupancy="1", status="ok"),
        dict(base, target="sm80", spill_bytes="64", occupancy="1", status="ok"),  # not a goal
        dict(base, target="sm90", spill_bytes="8", occupancy="1", status="ok"),
        dict(base, target="gfx90a", spill_bytes="0", occupancy="1", status="ok"),
        dict(base, target="gfx90a", spill_bytes="", occupancy="", status="error: boom"),
    ]
    bad = compile_report.verdict(rows)
    assert len(bad) == 3
    assert "spills 8" in bad[0] and "occupancy 1" in bad[1] and "boom" in bad[2]
