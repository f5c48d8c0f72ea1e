"""bench/trl_suite.py's own parts, without running TRL's suite (that takes ~15 min on 2 cores).

Run: `python -m pytest tests/test_bench_trl_suite.py -q` (seconds).

The swapped copy differs from TRL's file in the one import line and nowhere else (and a file
without that line is refused, not run unswapped); the junit reader gives each test's outcome and
first failure line; the tokenizer it builds round-trips text and renders tool calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ lives at the repo root

from bench import trl_suite  # noqa: E402

TEST_BODY = """import pytest
from trl import DPOConfig, DPOTrainer


def test_x():
    assert DPOTrainer and DPOConfig
"""


def _trl_tests(tmp_path: Path, body: str) -> Path:
    tests = tmp_path / "trl_tests"
    tests.mkdir()
    for name in trl_suite.TEST_FILES:
        (tests / name).write_text(body if name == "test_dpo_trainer.py" else f"# {name}\n")
    return tests


def test_only_the_import_line_changes(tmp_path):
    tests = _trl_tests(tmp_path, TEST_BODY)
    trl_suite.write_suite(tests, tmp_path / "trl", "# shim\n", swap=False)
    trl_suite.write_suite(tests, tmp_path / "csd", "# shim\n", swap=True)
    theirs = (tmp_path / "trl" / "tests" / "test_dpo_trainer.py").read_text().splitlines()
    ours = (tmp_path / "csd" / "tests" / "test_dpo_trainer.py").read_text().splitlines()
    changed = [(a, b) for a, b in zip(theirs, ours, strict=True) if a != b]
    assert changed == [(trl_suite.TRL_IMPORT, trl_suite.CSD_IMPORT)]
    assert (tmp_path / "csd" / "conftest.py").read_text() == "# shim\n"


def test_a_file_without_the_import_is_refused(tmp_path):
    tests = _trl_tests(tmp_path, "import trl\n")
    with pytest.raises(SystemExit, match="no line"):
        trl_suite.write_suite(tests, tmp_path / "csd", "", swap=True)


def test_junit_outcomes(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_dpo_trainer.TestDPOTrainer" name="test_a"/>'
        '<testcase classname="tests.test_dpo_trainer.TestDPOTrainer" name="test_b">'
        '<failure message="ValueError: boom&#10;second line">trace</failure></testcase>'
        '<testcase classname="tests.test_dpo_trainer.TestDPOTrainer" name="test_c">'
        '<skipped message="needs a GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert trl_suite.read_report(report) == {
        "TestDPOTrainer::test_a": ("passed", ""),
        "TestDPOTrainer::test_b": ("failed", "ValueError: boom"),
        "TestDPOTrainer::test_c": ("skipped", "needs a GPU"),
    }


def test_tokenizer_round_trips_and_renders_tool_calls():
    tok = trl_suite.build_tokenizer(["The sky is blue.", "What time is it in Paris?"] * 20)
    text = "What time is it in Paris? The sky is blue."
    assert tok.decode(tok(text)["input_ids"]) == text
    messages = [
        {"role": "user", "content": "Time in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "name": "get_time", "content": "06:22"},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    out = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '"get_time"' in out and "<tool_call>" in out and "<tool_response>" in out
    assert out.count("<|im_start|>") == 4  # system (with the tools), user, assistant, tool
