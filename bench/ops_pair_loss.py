"""Benchmark of the pair loss: per-token log-probs -> per-sequence sums -> each pair's DPO loss.

    python -m bench --only fused_pair_loss --quick

Providers, on the same token_logps (N,), seq_offsets (2P+1,) and reference log-probs (P,):
  torch  csd_fast.batch.segment_sum + csd_fast.losses.preference_loss (the reference)
  ours   csd_fast.kernels.pair_loss.fused_pair_loss (one kernel on GPU)
Shape: P pairs whose 2P sequences have random lengths in [L/2, 3L/2). Loss: sigmoid, beta 0.1.
"""

from __future__ import annotations

from bench.common import Case, Skip

NAME = "fused_pair_loss"
PROVIDERS = ("torch", "ours")
MODES = ("fwd", "fwd+bwd")
PRESETS = {
    "smoke": [{"P": 4, "L": 16}],
    "quick": [{"P": 64, "L": 256}, {"P": 256, "L": 512}],
    "gpu": [{"P": 64, "L": 512}, {"P": 512, "L": 1024}, {"P": 2048, "L": 2048}],
}
LOSS_TYPE, BETA = "sigmoid", 0.1


def _inputs(shape: dict, device: str):
    import torch

    p, length = shape["P"], shape["L"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(length // 2, 1), length + length // 2, (2 * p,), generator=g)
    seq_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(seq_offsets[-1])
    token_logps = (-torch.rand(n, generator=g) * 5).to(device)
    ref = (-torch.rand(2, p, generator=g) * 5 * length).to(device)
    return token_logps, seq_offsets.to(device), lengths.to(device), ref[0], ref[1]


def _torch_loss():
    from csd_fast.batch import segment_sum
    from csd_fast.losses import LossParams, PairLogps, preference_loss

    params = LossParams(loss_type=(LOSS_TYPE,), beta=BETA)

    def f(token_logps, seq_offsets, lengths, ref_c, ref_r):
        p = ref_c.numel()
        seq = segment_sum(token_logps, seq_offsets)  # (2P,)
        logps = PairLogps(seq[:p], seq[p:], ref_c, ref_r, lengths[:p], lengths[p:])
        return preference_loss(params, logps), seq[:p], seq[p:]

    return f


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    import torch

    try:
        if provider == "torch":
            f = _torch_loss()
        elif provider == "ours":
            from csd_fast.kernels.pair_loss import fused_pair_loss

            def f(token_logps, seq_offsets, lengths, ref_c, ref_r):
                return fused_pair_loss(token_logps, seq_offsets, ref_c, ref_r,
                                       loss_type=LOSS_TYPE, beta=BETA)  # fmt: skip
        else:
            raise ValueError(f"unknown provider {provider!r}")
    except ImportError as e:
        raise Skip(f"not importable yet: {e}") from e
    token_logps, seq_offsets, lengths, ref_c, ref_r = _inputs(shape, device)
    n = token_logps.numel()
    items = {"pairs": shape["P"], "tokens": n}
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return f(token_logps, seq_offsets, lengths, ref_c, ref_r)

        return Case(fn, bytes=n * 4 + seq_offsets.numel() * 8, items=items)
    token_logps.requires_grad_(True)

    def fn_bwd():
        token_logps.grad = None
        f(token_logps, seq_offsets, lengths, ref_c, ref_r)[0].backward()

    return Case(fn_bwd, bytes=2 * n * 4 + 2 * seq_offsets.numel() * 8, items=items)
