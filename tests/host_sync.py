"""A CPU stand-in for torch.cuda.set_sync_debug_mode: record the calls that make the host wait.

    with HostSyncRecorder() as rec:
        loss = trainer.compute_loss(batch); loss.backward()
    assert not rec.events, rec.report()

On a GPU these stall the host until the device catches up; on CPU they cost nothing, which is
why a CPU test suite never notices them. Recorded, with the innermost engine frame of each:

* reads back to the host (D2H): item() / int() / float() / bool() of a tensor (aten's
  `_local_scalar_dense`), `tolist()`, `numpy()`, `cpu()`, `torch.equal`, and the ops whose output
  size depends on the values (nonzero, boolean-mask indexing, unique, masked_select,
  repeat_interleave without output_size);
* blocking copies from host data (H2D): `torch.tensor` / `torch.as_tensor` given a device (a
  pageable copy that synchronises the stream). A `.to(device)` cannot be told from a no-op on CPU
  and is not recorded: build host tensors without a device and move them with non_blocking.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
aten = torch.ops.aten
_VALUE_SIZED = {aten.nonzero, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                aten.masked_select, aten._local_scalar_dense, aten.equal}  # fmt: skip
_FUNCS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}


@dataclass
class SyncEvent:
    kind: str  # "d2h" or "h2d"
    op: str
    where: str  # innermost frame in this repository, "path:line in function"
    stack: tuple[str, ...]  # the repository frames, outermost first
    origin: str  # the innermost frame of all (a library's own line when the call is there)


def _frames() -> tuple[tuple[str, ...], str]:
    """(this repository's engine frames outermost first, the innermost frame outside torch)."""
    out, origin = [], "?"
    for f in traceback.extract_stack()[:-3]:
        path = Path(f.filename)
        if "torch" not in path.parts and path.name != "host_sync.py":
            origin = f"{f.filename}:{f.lineno} in {f.name}"
        if REPO in path.parents and path.relative_to(REPO).parts[0] != "tests":
            out.append(f"{path.relative_to(REPO)}:{f.lineno} in {f.name}")
    return tuple(out), origin


class _Functions(TorchFunctionMode):
    def __init__(self, rec: HostSyncRecorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCS:
            self.rec.add("d2h", _FUNCS[func])
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data")
            if not isinstance(data, torch.Tensor):
                self.rec.add("h2d", f"{func.__name__}(host data, device=...)")
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, rec: HostSyncRecorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _VALUE_SIZED:
            self.rec.add("d2h", str(packet.__name__))
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            self.rec.add("d2h", "repeat_interleave without output_size")
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 else ())
        ):
            self.rec.add("d2h", f"boolean-mask {packet.__name__}")  # sized by a nonzero
        return func(*args, **kwargs)


class HostSyncRecorder:
    """Context manager: `events` lists every host sync (see the module docstring) inside it."""

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self._modes = (_Functions(self), _Dispatch(self))

    def add(self, kind: str, op: str) -> None:
        stack, origin = _frames()
        self.events.append(SyncEvent(kind, op, stack[-1] if stack else "?", stack, origin))

    def __enter__(self) -> HostSyncRecorder:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{e.kind} {e.op} at {e.origin}\n    " + "\n    ".join(e.stack)
                         for e in self.events)  # fmt: skip
