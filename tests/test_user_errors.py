"""User errors: one line on stderr, exit code 2, before any model loads; used output_dirs.

Run: python -m pytest tests/test_user_errors.py -q

Issue #15 findings 2, 5, 6 (data, ref cache, metrics), 7, 8 and 9 (skip counts), each as the
reproduction that failed on main, now asserting the fix. A test that must stop before the model
loads makes loading the model an error, so reaching it fails the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safety_helpers import comparable, train_flags, write_tiny_run

from csd_fast.cli import main
from csd_fast.config import DPOConfig
from csd_fast.errors import ConfigError
from csd_fast.reporting import read_metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr("csd_fast.models.load_model", refuse)


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == "", "nothing (no config dump) is printed before a user error"
    assert lines[0].startswith("csd-train: error: ")
    return lines[0]


BAD_OPTIONS = {
    "per_device_train_batch_size": (["--per_device_train_batch_size", "0"], "must be >= 1"),
    "gradient_accumulation_steps": (["--gradient_accumulation_steps", "0"], "must be >= 1"),
    "max_length": (["--max_length", "0"], "must be > 0"),
    "beta": (["--beta", "0"], "zero gradients"),
    "eval_strategy": (["--eval_strategy", "steps"], "no eval dataset was given"),
}


@pytest.mark.parametrize("field", sorted(BAD_OPTIONS))
def test_bad_option_is_one_line_naming_the_field(assets, tmp_path, capsys, no_model_load, field):
    """Finding 7 + 8: range()/ZeroDivisionError, blamed data, silent no-ops, late tracebacks."""
    flags, reason = BAD_OPTIONS[field]
    assert main(train_flags(assets, tmp_path / "out", *flags)) == 2
    line = one_line_error(capsys)
    assert f"--{field}" in line and reason in line
    assert not (tmp_path / "out" / "config.yaml").exists()  # written only after validation


def test_beta_is_free_for_sft_alone(assets, tmp_path):
    from csd_fast.validation import check_training_args

    check_training_args(DPOConfig(output_dir=str(tmp_path), loss_type=["sft"], beta=0.0))
    with pytest.raises(ConfigError, match="beta"):
        check_training_args(DPOConfig(output_dir=str(tmp_path), loss_type=["sft", "ipo"], beta=0))


@pytest.mark.parametrize(
    "model, reason",
    [
        ("/no/such/model", "no such directory"),
        ("./not-here", "no such directory"),
        ("some-org/some-model", "HF_HUB_OFFLINE=1"),  # a plausible id, offline, not cached
    ],
)
def test_model_that_cannot_be_found(assets, tmp_path, capsys, no_model_load, model, reason):
    flags = train_flags(assets, tmp_path / "out")
    flags[flags.index(assets.model)] = model
    assert main(flags) == 2
    line = one_line_error(capsys)
    assert "--model_name_or_path" in line and reason in line and "HFValidationError" not in line


def test_a_directory_that_is_not_a_model(assets, tmp_path, capsys, no_model_load):
    flags = train_flags(assets, tmp_path / "out")
    flags[flags.index(assets.model)] = str(tmp_path)
    assert main(flags) == 2
    assert "no config.json" in one_line_error(capsys)


def test_debug_shows_the_traceback(assets, tmp_path):
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        main(train_flags(assets, tmp_path / "o", "--per_device_train_batch_size", "0", "--debug"))


def test_python_api_checks_before_loading(assets, tmp_path, no_model_load):
    from csd_fast import DPOTrainer

    with pytest.raises(ConfigError, match="learning_rate.*expected a number, got '5e-3'"):
        DPOTrainer(
            assets.model,
            args=DPOConfig(output_dir=str(tmp_path), learning_rate="5e-3"),
            train_dataset=assets.train,
        )
    with pytest.raises(ConfigError, match="eval_strategy"):  # HF's Trainer refuses this too
        DPOTrainer(
            assets.model,
            args=DPOConfig(output_dir=str(tmp_path), eval_strategy="steps"),
            train_dataset=assets.train,
        )


def test_yaml_numbers_are_coerced_by_field_type(assets, tmp_path):
    """Finding 5: YAML 1.1 reads `5e-3` as a string; the first step then failed."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 5e-3\nmax_steps: 1e1\nbf16: 'false'\nbeta: 1\n")
    assert yaml.safe_load(recipe.read_text())["learning_rate"] == "5e-3"  # the YAML trap
    from csd_fast.cli import resolve

    _, kwargs = resolve(
        ["--config", str(recipe), "--output_dir", "o", "--model", "m", "--dataset_name", "d"]
    )
    assert kwargs["learning_rate"] == 5e-3 and kwargs["max_steps"] == 10
    assert kwargs["bf16"] is False and isinstance(kwargs["beta"], float)
    args = DPOConfig.from_yaml(recipe, output_dir="o")
    assert args.learning_rate == 5e-3 and args.max_steps == 10


def test_bad_yaml_value_names_file_and_key(assets, tmp_path, capsys, no_model_load):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: fast\n")
    assert main(["--config", str(recipe), *train_flags(assets, tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert f"{recipe}: key 'learning_rate': expected a number, got 'fast'" in line


def test_used_output_dir_is_refused_and_config_kept(assets, tmp_path, capsys):
    """Finding 2: a second run appended to metrics.jsonl, replaced checkpoints, then resumed the
    wrong run; a failing invocation overwrote config.yaml."""
    out = tmp_path / "out"
    assert main(train_flags(assets, out)) == 0
    config_before = (out / "config.yaml").read_text()
    metrics_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(train_flags(assets, out, "--seed", "1")) == 2
    line = one_line_error(capsys)
    assert "already holds a run" in line and "--overwrite_output_dir" in line
    assert main(train_flags(assets, out, "--beta", "0")) == 2  # failing: config.yaml untouched
    capsys.readouterr()
    assert (out / "config.yaml").read_text() == config_before
    assert (out / "metrics.jsonl").read_text() == metrics_before
    # --overwrite_output_dir replaces the run: one run's metrics, steps once each
    assert main(train_flags(assets, out, "--seed", "1", "--overwrite_output_dir")) == 0
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["seed"] == 1


def test_the_python_api_follows_hf_overwrite_output_dir(assets, tmp_path):
    from csd_fast import DPOTrainer
    from csd_fast.rundir import OutputDirInUse

    out = tmp_path / "api"
    kw = dict(
        output_dir=str(out),
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        report_to="none",
        bf16=False,
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataset_cache_dir=None,
    )
    DPOTrainer(assets.model, args=DPOConfig(**kw), train_dataset=assets.train).train()
    again = DPOTrainer(assets.model, args=DPOConfig(**kw), train_dataset=assets.train)
    with pytest.raises(OutputDirInUse, match="overwrite_output_dir=True"):
        again.train()
    again.args.overwrite_output_dir = True
    again.train()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_corrupt_parquet_names_the_file(assets, tmp_path, capsys, no_model_load):
    import datasets

    rows = [json.loads(line) for line in Path(assets.train).read_text().splitlines()]
    data = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    data.write_bytes(data.read_bytes()[:200])
    flags = train_flags(assets, tmp_path / "out")
    flags[flags.index(assets.train)] = str(data)
    assert main(flags) == 2
    line = one_line_error_after_output(capsys)
    assert str(data) in line and "not a readable Parquet file" in line and "ArrowInvalid" in line


def one_line_error_after_output(capsys) -> str:
    """The error line of a run that had started (printed its options) before failing."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("csd-train: error: "))


def test_truncated_reference_store_shard_is_named_and_rebuilt(assets, tmp_path, capsys):
    """Finding 6, reference cache: a truncated entry used to raise BadZipFile. The store checks
    every shard's checksum, names the bad one and rebuilds only it; the run goes on."""
    cache = tmp_path / "refcache"
    flags = ["--precompute_ref_log_probs", "true", "--ref_cache_dir", str(cache)]
    assert main(train_flags(assets, tmp_path / "a", *flags, "--max_steps", "1")) == 0
    shards = sorted(cache.glob("ref-*/*.safetensors"))
    assert shards, f"no store shards under {cache}"
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    capsys.readouterr()
    assert main(train_flags(assets, tmp_path / "b", *flags, "--max_steps", "1")) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert "rebuilt" in out.out + out.err and "checksum" in out.out + out.err
    assert len(shards[0].read_bytes()) > 100  # the shard was written again, whole


def test_torn_last_metrics_line_does_not_stop_resume(assets, tmp_path):
    """Finding 6: a kill mid-write leaves half a line; resume used to crash on it."""
    full = tmp_path / "full"
    assert main(train_flags(assets, full)) == 0
    out = tmp_path / "run"
    shutil.copytree(full, out)
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "final")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 0.6')
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(read_metrics(out)) == len(read_metrics(full))
    assert main(train_flags(assets, out, "--resume")) == 0
    assert comparable(read_metrics(out)) == comparable(read_metrics(full))


def test_skip_counts_are_printed_on_a_cache_hit(assets, tmp_path, capsys):
    """Finding 9: with the tokenization cache warm, the skipped rows went unmentioned."""
    rows = Path(assets.train).read_text().splitlines()
    bad = json.loads(rows[0])
    bad["chosen"] = ""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([json.dumps(bad), *rows]) + "\n")
    flags = train_flags(
        assets,
        tmp_path / "out",
        "--on_bad_row",
        "skip",
        "--max_steps",
        "1",
        "--dataset_cache_dir",
        str(tmp_path / "cache"),
        "--save_strategy",
        "no",
    )
    flags[flags.index(assets.train)] = str(data)
    outputs = []
    for extra in ([], ["--overwrite_output_dir"]):
        assert main([*flags, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert "train: skipped 1 bad rows" in outputs[0]
    assert "train: skipped 1 bad rows" in outputs[1] and "tokenization cache" in outputs[1]
