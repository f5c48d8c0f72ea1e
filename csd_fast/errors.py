"""User errors: one concise message (file, row, field or key; what to do), exit code 2.

    from csd_fast.errors import ConfigError, CorruptFileError, corrupt_file, run_cli
    raise ConfigError("per_device_train_batch_size", "must be >= 1, got 0")
    with corrupt_file(path, fix="delete it; it is recomputed on the next run"):
        table = np.load(path)          # BadZipFile/EOFError/... -> CorruptFileError naming path
    sys.exit(run_cli("csd-train", main_body, argv))   # UserError -> one line on stderr, exit 2

A *user error* is something the person running the tool can fix without reading our code: a bad
option, a missing or corrupt file, a locked or used output directory, a checkpoint that cannot be
resumed. Those derive from `UserError` (or are `PreferenceDataError`, the data pipeline's own
type) and `run_cli` prints them as `prog: error: message` with no traceback; `--debug` (or
`CSD_DEBUG=1`) shows the traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterator

EXIT_USER_ERROR = 2  # argparse's code for a bad command line; SLURM scripts can tell it apart


class UserError(Exception):
    """An error the user can fix; `str()` is the whole message, ending with what to do."""


class ConfigError(UserError, ValueError):
    """An option with a bad value: names the option (and the file it came from, if any)."""

    def __init__(self, field: str, reason: str, *, source: str | None = None) -> None:
        self.field, self.reason, self.source = field, reason, source
        where = f"{source}: key {field!r}" if source else f"--{field}"
        super().__init__(f"{where}: {reason}")


class CorruptFileError(UserError):
    """A file that exists but cannot be read (truncated, torn, another format): path and fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = os.fspath(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


def _is_corruption(exc: BaseException) -> bool:
    """Library errors that mean 'this file's bytes are broken', not 'this code is wrong'."""
    if isinstance(exc, (zipfile.BadZipFile, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    name = type(exc).__name__
    if name in ("SafetensorError", "ArrowInvalid", "ArrowIOError", "UnpicklingError"):
        return True
    text = str(exc)
    # torch.load of a truncated zip archive, numpy of a truncated .npy member
    return isinstance(exc, (RuntimeError, ValueError, OSError)) and any(
        s in text
        for s in (
            "PytorchStreamReader",
            "failed finding central directory",
            "cannot reshape array",
            "truncated",
            "Not enough bytes",
            "unexpected end",
        )
    )


@contextlib.contextmanager
def corrupt_file(path: str | os.PathLike, *, fix: str) -> Iterator[None]:
    """Turn a read error that means 'corrupt bytes' into a CorruptFileError naming path and fix."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not _is_corruption(e):
            raise
        raise CorruptFileError(
            path, f"unreadable ({type(e).__name__}: {_first_line(e)})", fix
        ) from e


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def is_user_error(exc: BaseException) -> bool:
    from csd_fast.data.errors import PreferenceDataError

    # NotImplementedError: an option csd-fast does not support yet (config.py names the field)
    return isinstance(exc, (UserError, PreferenceDataError, NotImplementedError))


def pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove `--debug` from argv; also on with CSD_DEBUG=1."""
    debug = "--debug" in argv or os.environ.get("CSD_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def run_cli(prog: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `body(argv)`; a user error becomes `prog: error: message` on stderr and exit code 2."""
    argv, debug = pop_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        return body(argv)
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)  # one message; --debug for the traceback
        return EXIT_USER_ERROR
