"""`python -m bench gpu-check`: its plan, its refusal without a GPU, its verdict (CPU-testable).

python -m pytest tests/test_bench_gpu.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ lives at the repo root
from bench import gpu_check  # noqa: E402


def test_plan_fits_the_budget_and_covers_the_native_checks():
    steps = gpu_check.plan(python="py")
    assert sum(s.timeout_s for s in steps) <= gpu_check.BUDGET_S == 480
    argv = [" ".join(s.argv) for s in steps]
    assert any("pytest" in a and "tests/kernels" in a for a in argv)
    assert any("test_attention_flex.py" in a and "test_attention.py" in a for a in argv)
    assert any("--preset gpu" in a and "fused_linear_logprob" in a for a in argv)
    assert all(s.argv[0] == "py" for s in steps)
    for s in steps:  # every test and bench path named in the plan exists
        for arg in s.argv:
            if arg.startswith("tests/"):
                assert (gpu_check.ROOT / arg).exists(), arg
    assert not any("dpo_train" in a for a in [" ".join(s.argv) for s in gpu_check.plan(
        python="py", with_e2e=False)])  # fmt: skip


def test_children_never_inherit_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in gpu_check.child_env()


def test_refuses_without_a_gpu_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_available", lambda: (False, "no device here"))
    monkeypatch.setattr(gpu_check, "run_step", lambda *a: pytest.fail("a step ran"))
    assert gpu_check.main([]) == 2
    assert "needs a GPU: no device here" in capsys.readouterr().err


def test_dry_run_prints_the_plan(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kernel tests" in out and "budget" in out


def test_verdict_fails_on_required_steps_only():
    req, opt = gpu_check.Step("a", ("x",), 1), gpu_check.Step("b", ("y",), 1, required=False)
    passed, lines = gpu_check.verdict([(req, "ok", 1.0, ""), (opt, "TIMEOUT", 9.0, "tail")])
    assert passed and lines[-1] == "VERDICT: PASS" and "    tail" in lines
    passed, lines = gpu_check.verdict([(req, "FAIL rc=1", 1.0, "boom")])
    assert not passed and lines[-1] == "VERDICT: FAIL"


def test_run_step_reports_timeouts_and_failures():
    fast_fail = gpu_check.Step(
        "f", (sys.executable, "-c", "import sys; print('x'); sys.exit(3)"), 30
    )
    status, _, tail = gpu_check.run_step(fast_fail, gpu_check.child_env())
    assert status == "FAIL rc=3" and tail.endswith("x")
    slow = gpu_check.Step("s", (sys.executable, "-c", "import time; time.sleep(30)"), 1)
    assert gpu_check.run_step(slow, gpu_check.child_env())[0] == "TIMEOUT"
