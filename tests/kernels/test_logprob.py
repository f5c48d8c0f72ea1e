"""Tests of csd_fast.kernels.logprob: the fused linear -> log-prob, every impl against fp64 eager.

Tolerance: fp32 paths use assert_close defaults against the fp64 truth; bf16 / fp16 paths must
satisfy err(ours vs truth) <= 2 * err(plain torch at that dtype vs truth) + ATOL[dtype].
Triton runs under TRITON_INTERPRET=1 on CPU (tests/kernels/conftest.py), hence the small odd shapes.

    python -m pytest tests/kernels/test_logprob.py -q
"""

from __future__ import annotations

import pytest
import torch
from csd_fast.kernels import logprob_triton as lt
from csd_fast.kernels.logprob import (
    LinearLogprobFunction,
    LogprobParams,
    fused_linear_logprob,
    fused_linear_logprob_ref,
    linear_logprob_inference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
HEADS = {  # output-head options of the target models
    "plain": {},
    "cohere": {"logit_scale": 0.0625 * 8, "bias": True},  # Tiny Aya's logit_scale, plus a bias
    "gemma": {"softcap": 2.5, "temperature": 0.7},  # final soft-capping and sampling temperature
}
needs_triton = pytest.mark.skipif(lt.triton is None, reason="triton not installed")


def make(N, H, V, dtype, holes=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.25  # logits of a few units, as in real heads
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if holes:  # ignore_index holes: the first row, a middle run and the last row
        labels[0] = labels[N // 2 : N // 2 + 3] = labels[-1] = -100
    cast = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()
    return cast(hidden), cast(weight), cast(b), labels.to(DEVICE)


def grads(out, inputs, seed=1):
    """Gradients of a weighted sum, so each row's gradient is scaled differently."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = (out * w.to(out.device, out.dtype)).sum()
    live = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, live)


def fp64_leaves(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


def check(name, ours, base, truth, dtype):
    """The house tolerance rule; prints max / mean error and the worst index on failure."""
    truth = truth.detach().double()
    if dtype == torch.float32:
        torch.testing.assert_close(ours.detach().to(truth.device), truth.float(), msg=name)
        return
    err = (ours.detach().double() - truth).abs()
    base_err = (base.detach().double() - truth).abs().max().item()
    bound = 2 * base_err + ATOL[dtype]
    worst = err.argmax().item()
    assert err.max().item() <= bound, (
        f"{name}: max err {err.max().item():.3g} (mean {err.mean().item():.3g}, flat index "
        f"{worst}) > bound {bound:.3g} (plain torch err {base_err:.3g})"
    )


def run_case(impl, N, H, V, dtype, head, **extra):
    opts = dict(HEADS[head])
    hidden, weight, bias, labels = make(N, H, V, dtype, bias=opts.pop("bias", False))
    inputs = (hidden, weight, bias)
    truth_in = fp64_leaves(*inputs)
    truth = fused_linear_logprob_ref(truth_in[0], truth_in[1], labels, bias=truth_in[2], **opts)
    truth_g = grads(truth, truth_in)
    base = fused_linear_logprob(hidden, weight, labels, bias=bias, impl="eager", **opts)
    base_g = grads(base, inputs)
    if extra:  # chunk sizes: go through the Function to reach the chunked impl's tile knobs
        p = LogprobParams(impl=impl, **opts, **extra)
        ours = LinearLogprobFunction.apply(hidden, weight, bias, labels, p)[0]
    else:
        ours = fused_linear_logprob(hidden, weight, labels, bias=bias, impl=impl, **opts)
    assert ours.dtype == torch.float32 and ours.shape == (N,)
    assert torch.all(ours[labels == -100] == 0)
    ours_g = grads(ours, inputs)
    check("logps", ours, base, truth, dtype)
    for name, o, b, t in zip(
        ("d_hidden", "d_weight", "d_bias"), ours_g, base_g, truth_g, strict=False
    ):
        assert o.dtype == dtype
        check(name, o, b, t, dtype)
    # ignored rows take no gradient
    assert torch.all(ours_g[0][labels == -100] == 0)


@needs_triton
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(13, 40, 67), (29, 24, 131)])
def test_triton_matches_fp64(shape, dtype, head):
    run_case("triton", *shape, dtype, head)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_larger_odd_shape(dtype):
    run_case("triton", 47, 64, 300, dtype, "gemma")


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_matches_fp64(dtype, head):
    # tiles of 37 rows x 129 columns: neither divides N or V, so every boundary is crossed
    run_case("chunked", 301, 64, 1000, dtype, head, chunk_n=37, chunk_v=129)


def test_chunked_default_tiles_and_eager():
    run_case("chunked", 64, 32, 3001, torch.float32, "gemma")
    run_case("eager", 33, 32, 257, torch.float32, "cohere")


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_tied_embedding(impl):
    """The head's weight is also the input embedding: both uses add into one gradient."""
    N, H, V = 21, 32, 97
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(V, H, generator=g) / 4).to(DEVICE).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels = torch.roll(ids, -1).masked_fill(torch.arange(N, device=DEVICE) % 7 == 0, -100)
    proj = torch.randn(H, H, generator=g, dtype=torch.float64).to(DEVICE) / H**0.5

    def loss(e, fn, **kw):
        hidden = torch.tanh(e[ids] @ proj.to(e.dtype))  # (N, H)
        weights = torch.linspace(-1, 2, N, device=DEVICE, dtype=e.dtype)
        return (fn(hidden, e, labels, softcap=5.0, **kw) * weights).sum()

    e64 = emb.detach().double().requires_grad_()
    (truth,) = torch.autograd.grad(loss(e64, fused_linear_logprob_ref), e64)
    (ours,) = torch.autograd.grad(loss(emb, fused_linear_logprob, impl=impl), emb)
    check("d_embedding", ours, ours, truth, torch.float32)


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_stats_match_trl_definitions(impl):
    N, H, V = 19, 16, 83
    hidden, weight, bias, labels = make(N, H, V, torch.float32, bias=True, seed=5)
    with torch.no_grad():  # a tie for the argmax at columns 2 and 60 on every row
        bias[2] = bias[60] = 60.0
        weight[60] = weight[2]
    labels[3], labels[4], labels[5] = 2, 60, -100  # first max: hit; later tied max: miss
    opts = dict(bias=bias, logit_scale=0.5, softcap=30.0, temperature=1.3, return_stats=True)
    h64, w64, b64 = fp64_leaves(hidden, weight, bias)
    _, ref = fused_linear_logprob_ref(h64, w64, labels, **{**opts, "bias": b64})
    _, st = fused_linear_logprob(hidden, weight, labels, impl=impl, **opts)
    torch.testing.assert_close(st.entropy, ref.entropy.float())
    torch.testing.assert_close(st.mean_logit, ref.mean_logit.float())
    assert st.is_top1.dtype == torch.bool
    assert st.is_top1.tolist() == ref.is_top1.tolist()
    assert st.is_top1[3] and not st.is_top1[4] and not st.is_top1[5]
    # two tied columns far above the rest: each row's entropy is log 2
    torch.testing.assert_close(
        st.entropy, torch.full((N,), 0.6931472, device=DEVICE), atol=1e-4, rtol=0
    )


def test_stats_chunked_small_tiles():
    N, H, V = 40, 16, 211
    hidden, weight, bias, labels = make(N, H, V, torch.float32, bias=True, seed=6)
    p = LogprobParams(softcap=4.0, return_stats=True, impl="chunked", chunk_n=9, chunk_v=50)
    _, ent, mean, top1 = LinearLogprobFunction.apply(hidden, weight, bias, labels, p)
    h64, w64, b64 = fp64_leaves(hidden, weight, bias)
    _, ref = fused_linear_logprob_ref(h64, w64, labels, bias=b64, softcap=4.0, return_stats=True)
    torch.testing.assert_close(ent, ref.entropy.float())
    torch.testing.assert_close(mean, ref.mean_logit.float())
    assert top1.tolist() == ref.is_top1.tolist()


@pytest.mark.parametrize("impl", ["chunked", "eager", pytest.param("triton", marks=needs_triton)])
def test_inference_variant_keeps_no_graph(impl):
    hidden, weight, _, labels = make(17, 24, 71, torch.float32)
    out = linear_logprob_inference(hidden, weight, labels, temperature=0.8, impl=impl)
    assert out.grad_fn is None and not out.requires_grad
    ref = fused_linear_logprob_ref(hidden.detach(), weight.detach(), labels, temperature=0.8)
    torch.testing.assert_close(out, ref.float())


def test_rejects_bad_inputs():
    hidden, weight, _, labels = make(5, 8, 11, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprob(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprob(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprob(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(hidden, weight, labels, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# The Triton backward: determinism, skipped work, the launcher's per-gradient kernels
# ---------------------------------------------------------------------------------------------


def _grads_triton(hidden, weight, bias, labels, **opts):
    out = fused_linear_logprob(hidden, weight, labels, bias=bias, impl="triton", **opts)
    return grads(out, (hidden, weight, bias))


@needs_triton
@pytest.mark.parametrize("H", [16, 40])  # one H block (register accumulator), three (in memory)
def test_triton_backward_independent_of_launch_order(H, monkeypatch):
    """Every gradient element has one writer, so the bits cannot depend on program order: two
    calls agree bitwise, and so does a run whose programs go in reverse order (the interpreter's
    grid loop, patched), which an fp32 atomic-add backward would fail."""
    hidden, weight, bias, labels = make(53, H, 131, torch.float32, bias=True, seed=7)
    first = _grads_triton(hidden, weight, bias, labels, softcap=3.0)
    again = _grads_triton(hidden, weight, bias, labels, softcap=3.0)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    if lt.autotune.is_interpreter():
        import builtins

        from triton.runtime import interpreter

        reverse = lambda *args: reversed(builtins.range(*args))
        monkeypatch.setattr(interpreter, "range", reverse, raising=False)
        flipped = _grads_triton(hidden, weight, bias, labels, softcap=3.0)
        for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), first, flipped, strict=True):
            assert torch.equal(a, b), f"{name} changed with launch order"


@needs_triton
@pytest.mark.parametrize(
    "trainable", [("hidden",), ("weight",), ("hidden", "bias"), ("bias",)], ids=str
)
def test_triton_launches_only_needed_kernels(trainable, monkeypatch):
    """A frozen head (LoRA) launches no dW kernel and leaves weight.grad None; a frozen hidden
    launches no dH kernel; a trainable bias alone runs the dW kernel for dbias only."""
    launched = []
    kernel = lt._kernel
    monkeypatch.setattr(lt, "_kernel", lambda name, *a: launched.append(name) or kernel(name, *a))
    hidden, weight, bias, labels = make(23, 24, 97, torch.float32, bias=True, seed=8)
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    for name, x in leaves.items():
        x.requires_grad_(name in trainable)
    out = fused_linear_logprob(hidden, weight, labels, bias=bias, impl="triton", logit_scale=0.5)
    (out * torch.linspace(-1, 1, 23, device=DEVICE)).sum().backward()
    assert launched[0] == "fwd"
    assert ("dh" in launched) == ("hidden" in trainable)
    assert ("dw" in launched) == ("weight" in trainable or "bias" in trainable)
    truth_in = fp64_leaves(hidden, weight, bias)
    truth = fused_linear_logprob_ref(*truth_in[:2], labels, bias=truth_in[2], logit_scale=0.5)
    (truth * torch.linspace(-1, 1, 23, dtype=torch.float64, device=DEVICE)).sum().backward()
    for (name, x), t in zip(leaves.items(), truth_in, strict=True):
        if name in trainable:
            torch.testing.assert_close(x.grad, t.grad.float(), msg=name)
        else:
            assert x.grad is None, name


@needs_triton
@pytest.mark.parametrize("H", [16, 40])
def test_triton_skips_ignored_row_blocks(H):
    """Whole row blocks of ignored labels are skipped by both backward kernels; their dH rows
    must still come out exactly 0 (the outputs start uninitialised), the rest exact."""
    N, V = 70, 101
    hidden, weight, bias, labels = make(N, H, V, torch.float32, bias=True, seed=9)
    labels[:33] = -100  # rows 0-31 are two whole interpreter blocks of 16
    labels[48:64] = -100
    ours = _grads_triton(hidden, weight, bias, labels, temperature=0.9)
    truth_in = fp64_leaves(hidden, weight, bias)
    truth = fused_linear_logprob_ref(*truth_in[:2], labels, bias=truth_in[2], temperature=0.9)
    for name, o, t in zip(("dh", "dw", "db"), ours, grads(truth, truth_in), strict=True):
        torch.testing.assert_close(o, t.float(), msg=name)
    assert torch.all(ours[0][labels == -100] == 0)
    # every row ignored: all gradients exactly 0
    labels[:] = -100
    for o in _grads_triton(hidden, weight, bias, labels):
        assert torch.all(o == 0)


@needs_triton
@pytest.mark.skipif(not lt.autotune.is_interpreter(), reason="patches the interpreter's table")
@pytest.mark.parametrize("block_n", [32, 64])
def test_triton_split_follows_the_chosen_block_n(block_n, monkeypatch):
    """The vocabulary split is computed from the BLOCK_N the autotuner ran, not assumed: with
    wider row blocks than the default a few rows still split V, and results stay exact."""
    tables = lt.autotune._LOGPROB_FWD, lt.autotune._LOGPROB_BWD_DH
    for table in tables:
        monkeypatch.setitem(table, "interpreter", [(block_n, 32, 16, 1, 1)])
    monkeypatch.setattr(lt, "_AUTOTUNED", {})
    assert lt.autotune.logprob_split_v(40, 700, block_n) > 1
    run_case("triton", 40, 24, 700, torch.float32, "gemma")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_vocab_like_32003(dtype):
    """A real vocabulary's oddness at interpreter size: V = 1031 is prime (as 32003 is), so the
    last vocabulary block, every forward split and every dW program's edge are ragged."""
    run_case("triton", 7, 16, 1031, dtype, "gemma")
    run_case("triton", 7, 16, 1031, dtype, "cohere")
