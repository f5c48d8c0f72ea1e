"""Strict resume: complete checkpoints only, the same run's options, state loaded without code.

Run: python -m pytest tests/test_resume.py -q

One uninterrupted `csd train` run (checkpoints at steps 2, 4, 6) is the truth; each test copies
it, breaks or removes something as a crash or a user would, resumes, and compares with it.
Issue #15 findings 3, 4, 6 (checkpoint files), 9 (train_loss) and 10.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safety_helpers import comparable, train_flags, write_tiny_run

from csd_fast import checkpoint as ckpt
from csd_fast.cli import main
from csd_fast.manifest import verify_checkpoint, write_manifest
from csd_fast.reporting import read_metrics
from csd_fast.resume import CheckpointError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def full(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(train_flags(assets, out)) == 0
    return out


def interrupted_at(full: Path, dest: Path, step: int) -> Path:
    """The full run as a crash right after checkpoint-<step> would have left it."""
    shutil.copytree(full, dest)
    for p in ckpt.list_checkpoints(dest):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dest / "final")
    return dest


def same_result(a: Path, b: Path) -> None:
    wa = (a / "final" / "model.safetensors").read_bytes()
    assert wa == (b / "final" / "model.safetensors").read_bytes(), "final weights differ"
    assert comparable(read_metrics(a)) == comparable(read_metrics(b))


def test_resume_of_an_interrupted_run_equals_the_full_run(assets, full, tmp_path, capsys):
    out = interrupted_at(full, tmp_path / "run", 4)
    assert main(train_flags(assets, out, "--resume")) == 0
    same_result(out, full)
    # finding 9: the summary train_loss covers steps 1-6, not only the resumed 5-6
    summary = [r for r in read_metrics(out) if "train_loss" in r]
    assert (
        summary[-1]["train_loss"]
        == [r for r in read_metrics(full) if "train_loss" in r][-1]["train_loss"]
    )


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_missing_state_file_falls_back_and_an_explicit_path_is_refused(
    assets, full, tmp_path, capsys, missing
):
    """Finding 3: without optimizer/scheduler state the warmup would silently restart."""
    out = interrupted_at(full, tmp_path / "run", 4)
    (out / "checkpoint-4" / missing).unlink()
    assert main(train_flags(assets, out, "--resume", str(out / "checkpoint-4"))) == 2
    err = capsys.readouterr().err
    assert f"{missing} is missing" in err and str(out / "checkpoint-2") in err
    assert main(train_flags(assets, out, "--resume")) == 0
    said = capsys.readouterr().out
    assert f"skipping checkpoint-4: {missing} is missing" in said and "using checkpoint-2" in said
    same_result(out, full)  # resumed from step 2: the lr schedule continued, not restarted


def test_state_files_are_required_even_without_a_manifest(full, tmp_path):
    shutil.copytree(full / "checkpoint-2", tmp_path / "c")
    (tmp_path / "c" / "scheduler.pt").unlink()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="scheduler.pt is missing"):
        ckpt.load_training_state(tmp_path / "c", optimizer=None, scheduler=sched)


def test_truncated_weights_are_named_and_skipped(assets, full, tmp_path, capsys):
    """Finding 6: a truncated model.safetensors is found by the manifest, not by safetensors."""
    out = interrupted_at(full, tmp_path / "run", 4)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert verify_checkpoint(out / "checkpoint-4")[0].startswith("model.safetensors has 1000 bytes")
    assert main(train_flags(assets, out, "--resume", str(out / "checkpoint-4"))) == 2
    err = capsys.readouterr().err
    assert "model.safetensors has 1000 bytes" in err and "Traceback" not in err
    assert main(train_flags(assets, out, "--resume")) == 0
    same_result(out, full)


def test_corrupt_weights_loaded_directly_name_the_file(full, tmp_path):
    from transformers import AutoModelForCausalLM

    from csd_fast.errors import CorruptFileError

    shutil.copytree(full / "checkpoint-2", tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    model = AutoModelForCausalLM.from_pretrained(full / "checkpoint-4")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: unreadable.*earlier checkp"):
        ckpt.load_weights(model, tmp_path / "c")


def test_changed_options_are_refused_naming_each_field(assets, full, tmp_path, capsys):
    """Finding 4: a new lr or batch size was ignored or reinterpreted the data position."""
    out = interrupted_at(full, tmp_path / "run", 4)
    flags = train_flags(
        assets, out, "--resume", "--learning_rate", "2e-3", "--per_device_train_batch_size", "8"
    )
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.002" in err and "per_device_train_batch_size: 4 -> 8" in err
    assert "--resume_with_changes" in err
    # options that do not change the run are free to differ
    assert main(train_flags(assets, out, "--resume", "--logging_steps", "2")) == 0


def test_changed_training_data_is_refused(assets, full, tmp_path, capsys):
    out = interrupted_at(full, tmp_path / "run", 4)
    other = tmp_path / "other.jsonl"
    lines = Path(assets.train).read_text().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")
    flags = train_flags(assets, out, "--resume")
    flags[flags.index(assets.train)] = str(other)
    assert main(flags) == 2
    assert "training data:" in capsys.readouterr().err


def test_resume_with_changes_applies_and_logs_them(assets, full, tmp_path, capsys):
    from transformers import get_linear_schedule_with_warmup

    out = interrupted_at(full, tmp_path / "run", 4)
    flags = train_flags(assets, out, "--resume", "--resume_with_changes", "--learning_rate", "2e-3")
    assert main(flags) == 0
    assert "with a change: learning_rate: 0.001 -> 0.002" in capsys.readouterr().out
    # the schedule keeps its position (step 4 of 6) and takes the new peak rate
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    for _ in range(4):
        opt.step()
        sched.step()
    logged = {r["step"]: r["learning_rate"] for r in read_metrics(out) if "learning_rate" in r}
    assert logged[5] == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
    old = {r["step"]: r["learning_rate"] for r in read_metrics(full) if "learning_rate" in r}
    assert logged[4] == old[4] and logged[5] != old[5]


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would carry
        return (Path.write_text, (Path(_Payload.marker), "code ran"))


def test_state_with_code_is_refused_and_never_executed(assets, full, tmp_path, capsys):
    """Finding 10: torch.load(weights_only=False) would run the payload."""
    out = interrupted_at(full, tmp_path / "run", 4)
    _Payload.marker = str(tmp_path / "pwned")
    state = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, out / "checkpoint-4" / "optimizer.pt")
    write_manifest(out / "checkpoint-4")  # the attacker makes the manifest match
    assert main(train_flags(assets, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt holds objects other than tensors" in err
    assert not (tmp_path / "pwned").exists()
    torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=False)  # the old loader
    assert (tmp_path / "pwned").read_text() == "code ran"  # the payload was real


def test_rng_state_round_trips_through_safe_loading(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pth")
    want = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP reads `.metadata` with plain pickle: it is checked with an allow-list first."""
    import os

    import torch.distributed.checkpoint as dcp

    from csd_fast.resume import check_dcp_metadata

    model = torch.nn.Linear(3, 2)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"))
    check_dcp_metadata(tmp_path / "dcp" / ".metadata")  # DCP's own metadata passes

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.metadata"
    evil.write_bytes(pickle.dumps({"metadata": Payload()}))
    with pytest.raises(CheckpointError, match="system is not allowed"):
        check_dcp_metadata(evil)
    assert not (tmp_path / "pwned").exists()
