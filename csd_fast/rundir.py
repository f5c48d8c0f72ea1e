"""One writer per output directory: an advisory lock, the used-directory policy, atomic files.

    from csd_fast.rundir import claim_output_dir, write_text_atomically
    with claim_output_dir("runs/x", resume=False, overwrite=False, command="csd sample"):
        write_text_atomically("runs/x/manifest.json", text)      # ... the job's work ...

API (for every long job: training, sampling, scoring, sweeps, the loop):
  * `RunDirLock(dir, command=...)`: an exclusive `fcntl.flock` on `dir/.csd-lock`, which holds
    the holder's pid, host, command and start time as JSON. `acquire()` never waits: a second
    writer gets `OutputDirLocked` at once, naming the holder. The kernel drops the lock when its
    process dies (kill -9 included), so a lock file whose content names a dead holder is *stale*:
    it is taken over and `lock.stale` names the dead holder (the caller prints it). Re-entrant
    within a process (the CLI takes it, then the trainer it runs takes it again). In a
    distributed job (RANK / SLURM_PROCID set) only rank 0 locks and applies the policy. The file is
    never deleted (unlinking a lock file lets two processes lock two different inodes); a clean
    release empties it.
  * `claim_output_dir(dir, resume=, overwrite=, artifacts=, command=)`: the lock plus the policy.
    A directory holding results (`artifacts`: glob patterns, `TRAIN_RESULTS` by default) is
    refused with `OutputDirInUse` unless `resume` (continue it) or `overwrite` (delete those
    results first, after the lock is held; files the job does not own are never touched).
  * `write_text_atomically(path, text)` / `write_bytes_atomically`: temp file in the same
    directory, fsync, rename; the file gets the mode the umask gives (never mkstemp's 0600).
  * `umask()`, `apply_umask(path)`, `apply_umask_tree(root)`: `tempfile.mkdtemp` makes 0700
    directories and some writers 0600 files; what is renamed into place gets the modes a plain
    `mkdir`/`open` would have given.

flock is advisory: it protects csd-fast jobs from each other, not from `rm`. On NFS it needs a
lock daemon (Linux NFSv4 maps flock to byte-range locks, which work across clients).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from csd_fast.errors import UserError

LOCK_FILE = ".csd-lock"
# What a training run writes that a second run would mix with or replace. config.yaml and
# rejected_rows_*.jsonl describe the *current* invocation and are rewritten by it, so they do
# not make a directory "used".
TRAIN_RESULTS = ("metrics.jsonl", "checkpoint-*", ".checkpoint-*", "final", "curves.png", "runs")


class OutputDirLocked(UserError):
    """Another live process holds the directory's lock."""


class OutputDirInUse(UserError, FileExistsError):
    """The directory holds an earlier run's results and neither resume nor overwrite was asked."""


@dataclass
class LockHolder:
    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.command}, since {self.started})"

    def alive(self) -> bool | None:
        """True/False for a holder on this host; None when it runs elsewhere (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        return True


def read_holder(output_dir: str | os.PathLike) -> LockHolder | None:
    """Who holds (or last held without releasing) the lock of `output_dir`, from its file."""
    try:
        text = (Path(output_dir) / LOCK_FILE).read_text()
    except OSError:
        return None
    try:
        return LockHolder(**json.loads(text)) if text.strip() else None
    except (ValueError, TypeError):
        return None  # torn by a crash mid-write: nobody to name


_HELD: dict[str, RunDirLock] = {}  # realpath -> the lock this process holds on it


class RunDirLock:
    """Exclusive advisory lock of one output directory (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, *, command: str | None = None) -> None:
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        self.stale: LockHolder | None = None
        self._fd: int | None = None
        self._depth = 0
        self._pid = 0

    def acquire(self) -> RunDirLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        if job_rank() != 0:  # one job, one writer: rank 0 holds the lock for all ranks
            return self
        key = os.path.realpath(self.dir)
        held = _HELD.get(key)
        if held is not None and held._pid == os.getpid():  # same process: re-entrant
            held._depth += 1
            return held
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = read_holder(self.dir)
            who = holder.describe() if holder else "another process (it has not written its name)"
            fix = f"wait for it to finish or stop it (kill {holder.pid})" if holder else "wait"
            raise OutputDirLocked(
                f"{self.dir} is being written by {who}; two runs must not share an output_dir: "
                f"{fix}, or choose another output_dir"
            ) from None
        # we hold the lock: whatever the file names is a holder that died without releasing
        previous = read_holder(self.dir)
        if previous is not None:
            self.stale = previous
        me = LockHolder(
            os.getpid(), socket.gethostname(), self.command, time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(fd)
        self._fd, self._depth, self._pid = fd, 1, os.getpid()
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._fd is None or self._pid != os.getpid():
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(os.path.realpath(self.dir), None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a clean release: the next holder finds no stale name
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_results(output_dir: str | os.PathLike, artifacts: Sequence[str] = TRAIN_RESULTS):
    """The entries of `output_dir` matching `artifacts` (glob patterns), sorted by name."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = {p for pattern in artifacts for p in out.glob(pattern)}
    return sorted(found, key=lambda p: p.name)


def clear_results(output_dir: str | os.PathLike, artifacts: Sequence[str] = TRAIN_RESULTS):
    """Delete the entries matching `artifacts`; returns what was deleted."""
    gone = existing_results(output_dir, artifacts)
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone


def _names(paths: list[Path], limit: int = 4) -> str:
    names = [p.name for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


@contextlib.contextmanager
def claim_output_dir(
    output_dir: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    artifacts: Sequence[str] = TRAIN_RESULTS,
    command: str | None = None,
    flags: tuple[str, str] = ("--resume", "--overwrite_output_dir"),
    log=print,
) -> Iterator[RunDirLock]:
    """Lock `output_dir` and apply the used-directory policy; the lock is held inside the block."""
    lock = RunDirLock(output_dir, command=command)
    lock.acquire()
    try:
        if lock.stale is not None:
            state = {False: "no longer running", None: "on another host"}.get(
                lock.stale.alive(), "running, but not holding the lock"
            )
            stale = lock.stale.describe()
            log(f"[csd-fast] {output_dir}: took over a stale lock of {stale}: {state}")
        check_output_dir(
            output_dir,
            resume=resume,
            overwrite=overwrite,
            artifacts=artifacts,
            flags=flags,
            log=log,
        )
        yield lock
    finally:
        lock.release()


def job_rank() -> int:
    """This process's rank in a torchrun/SLURM job (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def check_output_dir(
    output_dir,
    *,
    resume,
    overwrite,
    artifacts=TRAIN_RESULTS,
    flags=("--resume", "--overwrite_output_dir"),
    log=print,
) -> None:
    """The policy alone (the caller holds the lock): refuse, or clear with `overwrite`.

    Rank 0 decides for a distributed job; the other ranks must wait for it (a barrier).
    """
    if job_rank() != 0:
        return
    found = existing_results(output_dir, artifacts)
    if not found or resume:
        return
    if overwrite:
        clear_results(output_dir, artifacts)
        log(f"[csd-fast] {output_dir}: removed the earlier run's {_names(found)} ({flags[1]})")
        return
    raise OutputDirInUse(
        f"{output_dir} already holds a run ({_names(found)}): pass {flags[0]} to continue it, "
        f"{flags[1]} to replace it, or choose another output_dir"
    )


# ---------------------------------------------------------------------------- file modes
def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # not atomic with threads; only where /proc is missing
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, *, directory: bool = True) -> None:
    """Give `path` the mode a plain mkdir/open would have (mkdtemp/mkstemp use 0700/0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def apply_umask_tree(root: str | os.PathLike) -> None:
    """`apply_umask` on `root` and everything below it (transformers 5 writes model.safetensors
    through a 0600 temp file; a checkpoint's readers need the mode the umask promises)."""
    apply_umask(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            apply_umask(os.path.join(dirpath, d))
        for f in filenames:
            apply_umask(os.path.join(dirpath, f), directory=False)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:  # open() follows the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
