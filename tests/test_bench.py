"""Smoke tests of the benchmark harness: row format, CSV append, regressions, one tiny real run.

    python -m pytest tests/test_bench.py -q

No timing is asserted; the end-to-end run uses the "smoke" preset shapes and writes to a temp dir.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ lives at the repo root

from bench import common  # noqa: E402
from bench.compare import main as compare_main  # noqa: E402
from bench.compare import regressions  # noqa: E402


def _row(ts: str, p50: float, metric: str = "time", unit: str = "ms", provider: str = "ours"):
    return {"op_or_scenario": "op", "provider": provider, "mode": "fwd", "shape": "N=8",
            "metric": metric, "unit": unit, "p50": str(p50), "p20": str(p50), "p80": str(p50),
            "device": "cpu-x", "torch": "t", "triton": "", "git_sha": ts[-3:-1],
            "timestamp": ts}  # fmt: skip


def test_quantiles_interpolate():
    assert common.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, 1.8, 4.2)
    assert common.quantiles([7.0]) == (7.0, 7.0, 7.0)


def test_shape_round_trip():
    shape = {"N": 4096, "H": 512, "model": "tiny"}
    assert common.parse_shape(common.shape_str(shape)) == shape


def test_result_rows_rates_and_memory():
    res = {"times": [0.002, 0.001, 0.003], "peak_bytes": 3 * 2**20, "flops": 2e9,
           "items": {"tokens": 100}, "extra": {"train_wall": ("s", 1.5)}}  # fmt: skip
    rows = {r["metric"]: r for r in common.result_rows("op", "ours", "fwd", {"N": 8}, res)}
    assert set(rows) == {"time", "tflops", "tokens_per_s", "train_wall", "peak_mem"}
    assert float(rows["time"]["p50"]) == pytest.approx(2.0)
    # a rate's p20 comes from the slower (p80) time, so p20 <= p50 <= p80 holds for rates too
    t = rows["tokens_per_s"]
    assert float(t["p20"]) < float(t["p50"]) < float(t["p80"])
    assert float(t["p50"]) == pytest.approx(100 / 0.002)
    assert float(rows["tflops"]["p50"]) == pytest.approx(2e9 / 0.002 / 1e12)
    assert float(rows["peak_mem"]["p50"]) == pytest.approx(3.0)
    assert rows["time"]["shape"] == "N=8" and rows["peak_mem"]["unit"] == "MiB"


def test_append_rows_writes_header_once(tmp_path):
    path = tmp_path / "dev.csv"
    common.append_rows([_row("2026-01-01T00:00:01Z", 1.0)], path)
    common.append_rows([_row("2026-01-01T00:00:02Z", 2.0), _row("2026-01-01T00:00:02Z", 3.0)], path)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(common.COLUMNS)
    assert sum(line.startswith("op_or_scenario") for line in lines) == 1
    rows = common.read_rows(path)
    assert [r["p50"] for r in rows] == ["1.0", "2.0", "3.0"]


def test_regressions_against_previous_run_of_each_case():
    rows = [
        _row("2026-01-01T00:00:01Z", 10.0),  # older run, ignored: superseded by the next
        _row("2026-01-01T00:00:02Z", 1.0),
        _row("2026-01-01T00:00:02Z", 100.0, "peak_mem", "MiB"),
        _row("2026-01-01T00:00:02Z", 5.0, provider="eager"),
        _row("2026-01-01T00:00:03Z", 1.2),  # +20%: regression
        _row("2026-01-01T00:00:03Z", 105.0, "peak_mem", "MiB"),  # +5%: within threshold
        _row("2026-01-01T00:00:03Z", 2.0, provider="eager"),  # faster
        _row("2026-01-01T00:00:03Z", 9.0, "tokens_per_s", "tokens/s"),  # rates are not judged
    ]
    regs = regressions(rows, 0.10)
    assert [(g["provider"], g["metric"]) for g in regs] == [("ours", "time")]
    assert regs[0]["old"] == 1.0 and regs[0]["ratio"] == pytest.approx(1.2)
    assert regressions(rows, 0.25) == []
    # below the absolute floor a relative jump is noise
    tiny = [_row("2026-01-01T00:00:01Z", 0.01), _row("2026-01-01T00:00:02Z", 0.03)]
    assert regressions(tiny) == []


def test_compare_strict_exit_code(tmp_path, capsys):
    path = tmp_path / "cpu-x.csv"
    common.append_rows([_row("2026-01-01T00:00:01Z", 1.0), _row("2026-01-01T00:00:02Z", 2.0)], path)
    assert compare_main(["--results-dir", str(tmp_path)]) == 0
    assert compare_main(["--results-dir", str(tmp_path), "--strict"]) == 1
    assert "1 regression" in capsys.readouterr().out


def test_smoke_run_appends_rows_and_plots(tmp_path, monkeypatch):
    """A real (tiny) run of the logprob op through child processes, then the plots."""
    from bench.__main__ import main

    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    argv = ["--preset", "smoke", "--only", "fused_linear_logprob", "--providers", "eager,trl,nope",
            "--reps", "2"]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("*.csv")
    assert path.stem.startswith("cpu-")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["provider"], r["mode"]) for r in rows}
    assert {("eager", "fwd"), ("eager", "fwd+bwd")} <= cases
    assert not any(r["provider"] == "nope" for r in rows)
    for r in rows:
        assert r["device"] == path.stem and r["git_sha"] and r["torch"]
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    assert {"time", "tflops", "gbps", "tokens_per_s", "peak_mem"} <= {r["metric"] for r in rows}
    assert main(["plot"]) == 0
    assert any(tmp_path.glob("*__fused-linear-logprob__fwd.png"))
