"""Benchmark of the LM-head log-prob op: per-token log π(label) from hidden states and head weight.

    python -m bench --only fused_linear_logprob --quick

Providers (same hidden (N, H), weight (V, H), labels (N,) in each):
  eager    full logits, fp32 log_softmax + gather (what TRL's DPOTrainer does)
  compile  torch.compile of eager (skipped if compilation fails, e.g. no C++ compiler)
  ours     csd_fast.kernels.logprob.fused_linear_logprob, impl="auto" (CPU chunked, GPU triton)
  liger    liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (no reference model): the whole DPO
           head over the same N tokens as (2B, T) rows; it computes gradients inside its forward
  trl      trl.kernels.chunked_logprob.ChunkedLogProbFunction, called as add_fused_lm_head does
  ours-loss  csd_fast.kernels.linear_pair_loss: the head fused with a sigmoid DPO loss over the
           same N tokens as pairs of 2 x L (L = 128): gradients inside its forward, 3 GEMMs
  matmul3  the floor: three bare torch.matmul of the head's shapes (logits, dH, dW) in fwd+bwd,
           one (logits) in fwd; the goal is ours-loss <= 1.15x matmul3
Modes: fwd (no grad), fwd+bwd (a random upstream gradient into hidden and weight).
FLOPs are model FLOPs, 2NHV forward and 6NHV forward + backward; bytes the minimal traffic.
"""

from __future__ import annotations

from bench.common import Case, Skip

NAME = "fused_linear_logprob"
PROVIDERS = ("eager", "compile", "ours", "ours-loss", "matmul3", "liger", "trl")
MODES = ("fwd", "fwd+bwd")
PRESETS = {
    # the second entry is the memory goal's shape: fused <= 25% of eager at N=4096, V=32000, H=512.
    # compile (~30 s to build) and trl (~3x eager on CPU) only at the small one: 5 min budget
    "quick": [
        {"N": 512, "H": 256, "V": 8192},
        {"N": 4096, "H": 512, "V": 32000,
         "providers": ("eager", "ours", "ours-loss", "matmul3", "liger")},
    ],
    "smoke": [{"N": 64, "H": 32, "V": 256}],
    "gpu": [
        {"N": n, "H": 4096, "V": v}
        for v in (128256, 256000)
        for n in (4096, 8192, 16384)
    ],
}  # fmt: skip
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def _eager(hidden, weight, labels):
    logits = hidden @ weight.t()  # (N, V)
    return logits.float().log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def _provider_fn(provider: str, device: str, shape: dict):
    """-> f(hidden, weight, labels) returning per-token log-probs, or a loss for liger."""
    import torch

    if provider == "eager":
        return _eager
    if provider == "compile":
        import torch

        return torch.compile(_eager, dynamic=False)
    if provider == "ours":
        try:
            from csd_fast.kernels.logprob import fused_linear_logprob
        except ImportError as e:
            raise Skip(f"csd_fast.kernels.logprob not importable: {e}") from e
        return lambda h, w, y: fused_linear_logprob(h, w, y)
    if provider == "ours-loss":
        from csd_fast.kernels.linear_pair_loss import fused_linear_pair_loss

        n = shape["N"]
        L = min(128, n // 2)
        if n % (2 * L):
            raise Skip(f"N={n} is not a whole number of pairs of 2 x {L} tokens")
        return lambda h, w, y: fused_linear_pair_loss(
            h, w, y, torch.arange(0, n + 1, L, device=h.device), torch.zeros(n // (2 * L),
            device=h.device), torch.zeros(n // (2 * L), device=h.device),
        ).loss  # fmt: skip
    if provider == "matmul3":
        return None  # setup builds it: it is not a function of (hidden, weight, labels)
    if provider == "trl":
        try:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        except ImportError as e:
            raise Skip(f"trl not installed: {e}") from e
        # positional: bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
        return lambda h, w, y: ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, TRL_CHUNK, None, 1.0, ()
        )[0]
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as e:
            raise Skip(f"liger-kernel not installed: {e}") from e
        n = shape["N"]
        t = min(512, n // 2)  # rows of T tokens, an even number of them (chosen then rejected)
        if n % (2 * t):
            raise Skip(f"N={n} is not a whole number of (chosen, rejected) rows of {t}")
        loss = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=device == "cuda")
        return lambda h, w, y: loss(w, h.view(n // t, t, -1), y.view(n // t, t))[0]
    raise ValueError(f"unknown provider {provider!r}")


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    import torch

    n, h, v = shape["N"], shape["H"], shape["V"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=g)
    weight = torch.randn(v, h, device=device, dtype=dtype, generator=g) * h**-0.5
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    f = _provider_fn(provider, device, shape)
    es = dtype.itemsize
    min_bytes = (n * h + v * h) * es + n * 12  # read H and W once, labels in, log-probs out
    if provider == "matmul3":  # logits (N, V); dH = dlogits @ W; dW = dlogits.T @ H

        def bare():
            logits = hidden @ weight.T
            if mode == "fwd+bwd":
                return logits @ weight, logits.T @ hidden
            return logits

        flops = (6.0 if mode == "fwd+bwd" else 2.0) * n * h * v
        return Case(bare, flops=flops, bytes=min_bytes, items={"tokens": n})
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return f(hidden, weight, labels)

        return Case(fn, flops=2.0 * n * h * v, bytes=min_bytes, items={"tokens": n})
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    upstream = torch.randn(n, device=device, generator=g)

    def fn_bwd():
        hidden.grad = weight.grad = None  # the gradients' memory counts in every call
        out = f(hidden, weight, labels)
        (out if out.dim() == 0 else (out * upstream).sum()).backward()

    # + dH and dW written, H and W read again by the backward
    return Case(fn_bwd, flops=6.0 * n * h * v, bytes=2 * min_bytes + (n * h + v * h) * es,
                items={"tokens": n})  # fmt: skip
