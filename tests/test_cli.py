"""`csd-train`: flag spelling, recipes, the built-in demo, and equality with the Python API.

Run: python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from csd_fast import DPOConfig, DPOTrainer
from csd_fast.cli import main, resolve
from csd_fast.demo import build_demo
from csd_fast.errors import UserError
from csd_fast.reporting import read_metrics

TRL_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/margins",
    "logps/rejected",
    "logits/chosen",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)


def test_flags_take_both_spellings_and_override_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"learning_rate": 1e-4, "max_steps": 7, "beta": 0.3, "loss_type": ["sigmoid", "sft"]}
        )
    )
    script, kw = resolve(
        [
            "--config",
            str(recipe),
            "--max-steps",
            "3",
            "--output_dir",
            "o",
            "--model_name_or_path",
            "m",
            "--dataset-name",
            "d.jsonl",
            "--loss_weights",
            "1.0",
            "0.5",
            "--fused",
        ]
    )
    assert kw["max_steps"] == 3  # flag beats file
    assert kw["learning_rate"] == 1e-4 and kw["beta"] == 0.3  # file beats default
    assert kw["loss_weights"] == [1.0, 0.5] and kw["fused"] is True
    assert script["dataset_name"] == "d.jsonl" and not script["demo"]
    args = DPOConfig(**kw)
    assert args.loss_type == ["sigmoid", "sft"]


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match="learning_rat.*did you mean learning_rate"):
        resolve(["--config", str(recipe), "--output_dir", "o"])


def test_removed_trl_field_is_rejected_like_trl(tmp_path):
    with pytest.raises(SystemExit):  # argparse: no such flag
        resolve(["--rpo_alpha", "0.5", "--output_dir", "o"])


def _demo_flags(out, *extra):
    return [
        "--output_dir",
        str(out),
        "--max_steps",
        "12",
        "--eval_steps",
        "6",
        "--logging_steps",
        "3",
        *extra,
    ]


def test_demo_fused_equals_unfused_and_learns(tmp_path):
    assert main(_demo_flags(tmp_path / "eager")) == 0
    assert main(_demo_flags(tmp_path / "fused", "--fused")) == 0
    eager, fused = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "fused")
    assert len(eager) == len(fused) > 0
    for a, b in zip(eager, fused, strict=True):
        for key, value in a.items():
            if isinstance(value, float) and "per_second" not in key and "runtime" not in key:
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (a["step"], key)
    saved = yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())
    assert saved["training"]["fused"] is True and saved["training"]["max_steps"] == 12
    assert (tmp_path / "fused" / "curves.png").stat().st_size > 0
    assert (tmp_path / "fused" / "final" / "model.safetensors").exists()


def test_full_demo_reaches_held_out_accuracy(tmp_path):
    """The README's first command: the demo recipe, fused, must end >= 0.9 on held-out pairs."""
    assert main(["--fused", "--output_dir", str(tmp_path)]) == 0
    evals = [r for r in read_metrics(tmp_path) if "eval_rewards/accuracies" in r]
    assert evals and evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert len({r["step"] for r in evals}) == len(evals)  # the final step is evaluated once


def test_cli_equals_python_api(tmp_path):
    assets = build_demo(tmp_path / "assets")
    flags = [
        "--model_name_or_path",
        str(assets.model_dir),
        "--dataset_name",
        str(assets.train_file),
        "--output_dir",
        str(tmp_path / "cli"),
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "8",
        "--bf16",
        "false",
        "--gradient_checkpointing",
        "false",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--max_length",
        "64",
        "--disable_tqdm",
        "true",
    ]
    assert main(flags) == 0
    args = DPOConfig(
        output_dir=str(tmp_path / "api"),
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(str(assets.model_dir), args=args, train_dataset=str(assets.train_file))
    trainer.train()
    cli_rows = [r for r in read_metrics(tmp_path / "cli") if "rewards/chosen" in r]
    api_rows = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert len(cli_rows) == len(api_rows) == 4
    for a, b in zip(cli_rows, api_rows, strict=True):
        for key in TRL_KEYS:
            assert a[key] == b[key], key  # same code path: identical, not just close


def test_bad_row_names_file_row_and_field(tmp_path, capsys):
    assets = build_demo(tmp_path / "assets")
    rows = [json.loads(line) for line in assets.train_file.read_text().splitlines()[:6]]
    rows[3]["chosen"] = ""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        "--model_name_or_path",
        str(assets.model_dir),
        "--dataset_name",
        str(data),
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--bf16",
        "false",
    ]
    assert main([*base, "--output_dir", str(tmp_path / "strict")]) == 2  # a user error
    assert re.search(r"bad\.jsonl, row 3.*'chosen'", capsys.readouterr().err)
    assert main([*base, "--output_dir", str(tmp_path / "skip"), "--on_bad_row", "skip"]) == 0
    rejected = (tmp_path / "skip" / "rejected_rows_train.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and "chosen" in rejected[0]


def test_runs_without_trl_installed(tmp_path):
    """csd_fast never imports trl at run time: block it and train the demo."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['trl'] = None\n"
        "from csd_fast.cli import main\n"
        f"main(['--fused', '--output_dir', {str(tmp_path)!r}, '--max_steps', '3',"
        " '--eval_strategy', 'no'])\n"
        "assert 'trl' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_dataset_splits_of_a_saved_datasetdict(tmp_path):
    import datasets

    assets = build_demo(tmp_path / "assets")
    rows = [json.loads(line) for line in assets.train_file.read_text().splitlines()]
    dd = datasets.DatasetDict(
        {
            "fit": datasets.Dataset.from_list(rows[:24]),
            "heldout": datasets.Dataset.from_list(rows[24:32]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model_name_or_path",
                str(assets.model_dir),
                "--dataset_name",
                str(tmp_path / "dd"),
                "--eval_dataset_name",
                str(tmp_path / "dd"),
                "--dataset_train_split",
                "fit",
                "--dataset_test_split",
                "heldout",
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--bf16",
                "false",
                "--report_to",
                "none",
                "--per_device_eval_batch_size",
                "8",
            ]
        )
        == 0
    )
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals and evals[-1]["eval_samples_per_second"] > 0
    with pytest.raises(Exception, match="split"):
        main(
            [
                "--model_name_or_path",
                str(assets.model_dir),
                "--dataset_name",
                str(tmp_path / "dd"),
                "--output_dir",
                str(tmp_path / "out2"),
                "--max_steps",
                "1",
                "--debug",
            ]
        )


def test_resume_flag_continues_from_the_latest_checkpoint(tmp_path):
    flags = [
        "--output_dir",
        str(tmp_path),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--eval_strategy",
        "no",
        "--logging_steps",
        "1",
    ]
    assert main([*flags, "--max_steps", "2"]) == 0
    # a longer schedule changes the run (the lr decays to 0 at max_steps): refused unless asked
    assert main([*flags, "--max_steps", "4", "--resume"]) == 2
    assert main([*flags, "--max_steps", "4", "--resume", "--resume_with_changes"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "checkpoint-4" / "model.safetensors").exists()


def test_tensorboard_receives_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    assert (
        main(
            [
                "--output_dir",
                str(tmp_path),
                "--max_steps",
                "2",
                "--logging_steps",
                "1",
                "--eval_strategy",
                "no",
                "--report_to",
                "tensorboard",
            ]
        )
        == 0
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert "rewards/accuracies" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_fully_truncated_row_stops_csd_train_unless_dropping(tmp_path, capsys):
    """The Python API drops such rows as TRL does (with a warning); the command line stops."""
    assets = build_demo(tmp_path / "assets")
    rows = [json.loads(line) for line in assets.train_file.read_text().splitlines()[:6]]
    rows[2]["prompt"] = " ".join([rows[2]["prompt"]] * 40)  # fills max_length on its own
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--model_name_or_path", str(assets.model_dir), "--dataset_name", str(data),
            "--max_steps", "1", "--report_to", "none", "--bf16", "false",
            "--max_length", "64"]  # fmt: skip
    # a user error: one line naming file, row and field, exit code 2 (csd_fast.errors)
    assert main([*base, "--output_dir", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"csd-train: error: .*long\.jsonl, row 2 .*field 'prompt'.*max_length", err)
    with pytest.warns(UserWarning, match="dropped 1 example"):
        code = main([*base, "--output_dir", str(tmp_path / "drop"), "--on_fully_truncated", "drop"])
    assert code == 0
