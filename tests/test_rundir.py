"""The output-directory lock, the used-directory policy and file modes (csd_fast.rundir).

Run: python -m pytest tests/test_rundir.py -q

Other holders are real processes (forked; they only take the lock), because an flock held by
this same process would not show what a second process sees.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from csd_fast.rundir import (
    LOCK_FILE,
    OutputDirInUse,
    OutputDirLocked,
    RunDirLock,
    claim_output_dir,
    read_holder,
    write_text_atomically,
)


def _holder(out: Path, *, die: bool = False):
    """Fork a process that takes the lock; returns (pid, write end that releases it)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            lock = RunDirLock(out, command="holder").acquire()
            os.write(ready_w, b"1")
            if die:
                os.kill(os.getpid(), signal.SIGKILL)  # dies holding it, as kill -9 does
            os.read(go_r, 1)
            lock.release()
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    return pid, go_w


def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    pid, release = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirLocked) as err:
            RunDirLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {pid} on {socket.gethostname()}" in message and "holder" in message
        assert f"kill {pid}" in message
    finally:
        os.write(release, b"1")
        os.waitpid(pid, 0)
    with RunDirLock(tmp_path) as lock:  # released: free again, and nothing stale
        assert lock.stale is None
        assert read_holder(tmp_path).pid == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean release leaves no name


def test_a_dead_holders_lock_is_stale_taken_over_and_named(tmp_path):
    pid, _ = _holder(tmp_path, die=True)
    os.waitpid(pid, 0)
    said = []
    with claim_output_dir(tmp_path, resume=False, overwrite=False, log=said.append) as lock:
        assert lock.stale.pid == pid and lock.stale.alive() is False
    assert len(said) == 1 and f"stale lock of pid {pid}" in said[0]
    assert "no longer running" in said[0]


def test_lock_is_reentrant_within_a_process(tmp_path):
    outer = RunDirLock(tmp_path).acquire()
    inner = RunDirLock(tmp_path).acquire()  # e.g. the CLI holds it, then the trainer takes it
    inner.release()
    assert read_holder(tmp_path).pid == os.getpid()  # still held by the outer one
    outer.release()
    assert read_holder(tmp_path) is None


def _used_run(out: Path) -> None:
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")  # not a run result: never touched


def test_used_output_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    _used_run(tmp_path)
    with pytest.raises(OutputDirInUse, match=r"checkpoint-2, metrics\.jsonl.*--resume.*--overwr"):
        with claim_output_dir(tmp_path, resume=False, overwrite=False):
            pass
    assert (tmp_path / "metrics.jsonl").exists()  # refused: nothing changed
    with claim_output_dir(tmp_path, resume=True, overwrite=False):
        assert (tmp_path / "checkpoint-2").exists()
    with claim_output_dir(tmp_path, resume=False, overwrite=True, log=lambda _: None):
        assert not (tmp_path / "checkpoint-2").exists()
        assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_fresh_or_config_only_directory_is_not_used(tmp_path):
    (tmp_path / "config.yaml").write_text("a: 1\n")  # a run that failed before training
    (tmp_path / "rejected_rows_train.jsonl").write_text("")
    with claim_output_dir(tmp_path, resume=False, overwrite=False):
        pass


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_and_checkpoints_follow_the_umask(tmp_path, mask):

    from csd_fast.checkpoint import TrainProgress, save_checkpoint

    old = os.umask(mask)
    try:
        write_text_atomically(tmp_path / "config.yaml", "a: 1\n")
        from data_helpers import tiny_tokenizer
        from test_trainer import tiny_model

        model = tiny_model(tiny_tokenizer())  # the real save_pretrained (0600 safetensors)
        ckpt = save_checkpoint(
            tmp_path / "checkpoint-1",
            model=model,
            optimizer=None,
            scheduler=None,
            progress=TrainProgress(),
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    for f in ckpt.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name


def test_only_rank_zero_of_a_distributed_job_locks(tmp_path, monkeypatch):
    pid, release = _holder(tmp_path)  # rank 0 of the job (another process) holds it
    try:
        monkeypatch.setenv("RANK", "1")
        with claim_output_dir(tmp_path, resume=False, overwrite=False):
            pass  # rank 1 neither locks nor decides the policy
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputDirLocked):
            RunDirLock(tmp_path).acquire()
    finally:
        os.write(release, b"1")
        os.waitpid(pid, 0)
