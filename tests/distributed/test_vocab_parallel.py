"""vocab_parallel_logprob on 2 gloo ranks against the fp64 full-vocabulary reference.

    python -m pytest tests/distributed/test_vocab_parallel.py -q     (one torchrun launch, ~10 s)

The launch (this file run under torchrun) shards a random head over the vocabulary, evenly and
unevenly, with ignored labels, labels on both shards, a bias and logit_scale / softcap /
temperature, plus rows whose logits all tie (is_top1 must pick the first index, as argmax
does); each rank saves its log-probs, stats, WPO's log sum p^2 and gradients (its own weight
rows); the test compares them, and the concatenated weight gradient, with the fp64 reference
(`fused_linear_logprob_ref`).
Tolerance (STYLE.md): err(sharded fp32) <= 2 * err(plain torch fp32 eager) + 1e-6 * scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = {  # name: (N, H, V, rows of rank 0, transforms)
    "even": (47, 16, 30, 15, dict()),
    "uneven_bias_softcap": (33, 8, 23, 9, dict(logit_scale=0.7, softcap=3.0, temperature=0.8)),
}


def inputs(case: str):
    N, H, V, split, kw = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    hidden = torch.randn(N, H, generator=g)
    hidden[-3:] = 0.0  # all logits tie (bias 0 for "even"): the first argmax is vocab id 0
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) if "bias" in case else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    labels[-3:] = torch.tensor([0, 1, V - 1])
    upstream = torch.randn(N, generator=g)  # a generic incoming gradient
    return hidden, weight, bias, labels, upstream, split, kw


def worker(out: Path) -> None:
    import torch.distributed as dist

    from csd_fast.distributed.vocab_parallel import (
        vocab_parallel_log_sum_sq_probs,
        vocab_parallel_logprob,
    )

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in CASES:
        hidden, weight, bias, labels, upstream, split, kw = inputs(case)
        lo, hi = (0, split) if rank == 0 else (split, weight.shape[0])
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        b = bias[lo:hi].clone().requires_grad_() if bias is not None else None
        logps, stats = vocab_parallel_logprob(
            h, w, labels, vocab_start=lo, vocab_size=weight.shape[0], group=None, bias=b,
            return_stats=True, **kw,
        )  # fmt: skip
        (logps * upstream).sum().backward()
        sq = vocab_parallel_log_sum_sq_probs(hidden, w.detach(), group=None, bias=b, **kw)
        result = {"logps": logps.detach(), "stats": [s.detach() for s in stats], "sq": sq,
                  "dh": h.grad, "dw": w.grad, "db": b.grad if b is not None else None}  # fmt: skip
        torch.save(result, out / f"{case}_{rank}.pt")
    # a plain `lm_head(hidden)` (no labels) of a sharded head: the whole logits, gathered
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from csd_fast.distributed.tensor_parallel import sharded_logits

    hidden, weight, *_ = inputs("even")
    sharded = distribute_tensor(weight, init_device_mesh("cpu", (2,)), [Shard(0)])
    torch.save(sharded_logits(hidden, sharded, None), out / f"logits_{rank}.pt")
    # both ranks past their last collective before either tears gloo down (a rank leaving
    # early aborted the other's process: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _check(got, truth, fp32, name):
    # atol 1e-6 relative to the values' size: entropy = lse - E[z] cancels digits of lse
    bound = 2 * (fp32.double() - truth).abs().max().item() + 1e-6 * (1 + truth.abs().max().item())
    err = (got.double() - truth).abs()
    assert err.max().item() <= bound, f"{name}: max err {err.max():.3g} at {err.argmax()} > {bound}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_head_matches_the_full_vocabulary_reference(two_ranks, case):
    from csd_fast.kernels.logprob import fused_linear_logprob_ref

    from csd_fast.forward import log_sum_sq_probs

    hidden, weight, bias, labels, upstream, split, kw = inputs(case)
    ranks = [torch.load(two_ranks / f"{case}_{r}.pt") for r in (0, 1)]

    def reference(dtype):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        b = bias.to(dtype).requires_grad_() if bias is not None else None
        logps, stats = fused_linear_logprob_ref(h, w, labels, bias=b, return_stats=True,
                                                dtype=dtype, **kw)  # fmt: skip
        (logps * upstream.to(dtype)).sum().backward()
        return logps.detach(), stats, h.grad, w.grad, b.grad if b is not None else None

    truth, fp32 = reference(torch.float64), reference(torch.float32)
    z = torch.nn.functional.linear(hidden.double(), weight.double(),
                                   bias.double() if bias is not None else None)  # fmt: skip
    z = z * kw.get("logit_scale", 1.0)
    if kw.get("softcap"):
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    sq_truth = torch.logsumexp(2 * (z / kw.get("temperature", 1.0)).log_softmax(-1), -1)
    for r in ranks:  # both ranks hold the same log-probs, stats and dH
        _check(r["logps"], truth[0], fp32[0], "logps")
        _check(r["stats"][0], truth[1].entropy, fp32[1].entropy, "entropy")
        _check(r["stats"][1], truth[1].mean_logit, fp32[1].mean_logit, "mean_logit")
        assert torch.equal(r["stats"][2], truth[1].is_top1), "is_top1"
        _check(r["dh"], truth[2], fp32[2], "dh")
        _check(r["sq"], sq_truth, log_sum_sq_probs(hidden, weight, bias, **kw), "log_sum_sq")
    if bias is None:  # the tied rows: only vocabulary id 0 is the first argmax
        assert truth[1].is_top1[-3:].tolist() == [True, False, False]
    _check(torch.cat([r["dw"] for r in ranks]), truth[3], fp32[3], "dw")
    if bias is not None:
        _check(torch.cat([r["db"] for r in ranks]), truth[4], fp32[4], "db")


def test_plain_head_call_of_a_sharded_head_gathers_the_logits(two_ranks):
    hidden, weight, *_ = inputs("even")
    for rank in (0, 1):
        got = torch.load(two_ranks / f"logits_{rank}.pt")
        torch.testing.assert_close(got, hidden @ weight.T)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[1]))
