"""No host sync in the micro-batch hot path: the fused head, the forward and the loop's body.

    python -m pytest tests/test_host_syncs.py -q

On a GPU a read back to the host (item(), tolist(), a boolean mask, unique ...) or a blocking copy
of host data stalls the CPU until the device has caught up; on CPU nothing shows it. The recorder
(tests/host_sync.py, a TorchFunctionMode + TorchDispatchMode pair, no mocks) lists every such
call with its stack while the real code runs. Collation runs on the host before the device copy,
so its tensors are host data by design: only what runs after it is held to "no sync".
"""

from __future__ import annotations

import inspect

import pytest
import torch
from csd_fast.kernels.linear_pair_loss import fused_linear_pair_loss
from data_helpers import tiny_tokenizer
from host_sync import HostSyncRecorder
from test_trainer import ROWS, make_args, tiny_model

from csd_fast import DPOTrainer
from csd_fast import loop as loop_module

# the files this hot path is made of (kernels, forward, collators, loop)
ENGINE = ("kernels/", "csd_fast/forward.py", "csd_fast/packing.py", "csd_fast/batch.py",
          "csd_fast/loop.py", "csd_fast/metrics.py", "csd_fast/trainer.py")  # fmt: skip


def test_recorder_sees_every_kind_of_sync():
    x = torch.tensor([1.0, -2.0, 3.0])
    reps = torch.tensor([1, 2, 0])
    with HostSyncRecorder() as rec:
        y = x * 2 + 1  # no sync: elementwise, shapes known
        torch.repeat_interleave(x, reps, output_size=3)
        torch.tensor([1.0])  # host data that stays on the host: no copy
        x.sum().item()
        float(x[0])
        bool((x > 0).any())
        x.tolist()
        x.nonzero()
        y[y > 0]
        torch.unique(reps)
        torch.repeat_interleave(x, reps)
        torch.tensor([1.0], device=x.device)
    ops = [e.op for e in rec.events]
    assert ops == ["_local_scalar_dense"] * 3 + ["tolist", "nonzero", "boolean-mask index",
                   "_unique2", "repeat_interleave without output_size",
                   "tensor(host data, device=...)"], rec.report()  # fmt: skip
    assert all(e.origin.endswith("in test_recorder_sees_every_kind_of_sync") for e in rec.events)


def _head_inputs(P=6, H=16, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (2 * P,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    N = int(offsets[-1])
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    ref = torch.randn(2, P, generator=g)
    groups = torch.arange(P) // 2
    return hidden, weight, labels, offsets, ref, groups


@pytest.mark.parametrize("loss_type", ["sigmoid", "clo"])
def test_fused_head_reads_nothing_back_given_host_offsets(loss_type):
    hidden, weight, labels, offsets, ref, groups = _head_inputs()
    host = tuple(offsets.tolist())
    kw = dict(loss_type=loss_type, group_ids=groups, impl="torch", chunk_elements=200)
    with HostSyncRecorder() as rec:
        out = fused_linear_pair_loss(hidden, weight, labels, offsets, ref[0], ref[1],
                                     host_offsets=host, **kw)  # fmt: skip
        out.loss.backward()
    assert not rec.events, rec.report()
    with HostSyncRecorder() as rec:  # without them the offsets are read once, and only that
        fused_linear_pair_loss(hidden, weight, labels, offsets, ref[0], ref[1], **kw)
    assert [(e.op, e.where.split(":")[0]) for e in rec.events] == [
        ("tolist", "kernels/linear_pair_loss.py")
    ], rec.report()


def test_host_offsets_must_match_the_offsets():
    hidden, weight, labels, offsets, ref, _ = _head_inputs()
    bad = tuple(offsets.tolist()[:-1]) + (offsets[-1].item() + 1,)
    with pytest.raises(ValueError, match="host_offsets must be seq_offsets"):
        fused_linear_pair_loss(hidden, weight, labels, offsets, ref[0], ref[1], host_offsets=bad)


def _micro_batch_lines() -> range:
    """Lines of run_training's micro-batch body (after the batch iterator hands a batch over)."""
    lines, first = inspect.getsourcelines(loop_module.run_training)
    start = next(i for i, s in enumerate(lines) if "is_real" in s and "zip(batches" in s)
    end = next(i for i, s in enumerate(lines) if "micro += len(group_plans" in s)
    return range(first + start + 1, first + end)


def _train_events(tmp_path, **kw):
    tok = tiny_tokenizer()
    from datasets import Dataset

    args = make_args(tmp_path, max_steps=2, gradient_accumulation_steps=2, logging_steps=10**6,
                     **kw)  # fmt: skip
    trainer = DPOTrainer(tiny_model(tok), args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tok)  # fmt: skip
    with HostSyncRecorder() as rec:
        trainer.train()
    body = _micro_batch_lines()

    def in_body(e) -> bool:
        for frame in e.stack:
            path, rest = frame.split(":", 1)
            if path == "csd_fast/loop.py" and rest.endswith("in run_training"):
                return int(rest.split()[0]) in body
        return False

    return [e for e in rec.events if in_body(e)]


# what is left, per micro-batch, in files outside this hot path (the xfail below flips to a
# failure once they are fixed, so the test is then made a plain one)
OUTSIDE = (
    "transformers' find_packed_sequence_indices (.all()) in create_causal_mask for packed rows "
    "(csd_fast/attention.py registers the mask function)"
)
CONFIGS = {
    "csd-all": dict(prefix_sharing=True, precompute_ref_log_probs=True, fused=True),
    "packed-live-ref": dict(padding_free=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_training_micro_batches_do_not_sync_in_the_engine(tmp_path, config):
    # the real loop, 2 steps x 2 micro-batches; every sync inside the micro-batch body is listed
    events = _train_events(tmp_path, **CONFIGS[config])
    ours = [e for e in events if any(f"/{part}" in e.origin for part in ENGINE)]
    assert not ours, "\n".join(f"{e.kind} {e.op} at {e.origin}" for e in ours)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=OUTSIDE)
def test_training_micro_batches_do_not_sync_at_all(tmp_path):
    events = _train_events(tmp_path, **CONFIGS["csd-all"])
    assert not events, "\n".join(f"{e.kind} {e.op} at {e.origin}" for e in events)
