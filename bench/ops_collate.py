"""Benchmark of micro-batch collation: example dicts (token id lists) -> a host `PairBatch`.

    python -m bench --only collate --quick

Collation runs on the host for every micro-batch, in the training process when
dataloader_num_workers=0 (the default): its time adds to every step unless workers hide it.
Providers are the three layouts, each through its public collator with TRL's max_length:
  padded   csd_fast.batch.collate_padded (TRL's layout)
  packed   csd_fast.packing.collate_packed(prefix_sharing=False)
  prefix   csd_fast.packing.collate_packed(prefix_sharing=True)
Mode "collate": one call collates `batches` micro-batches of B pairs each (different pairs).
Lengths are long-tailed, drawn as bench/e2e_dpo.py draws them (Anthropic Helpful's means).
Compare rows of the same shape across git_sha to see a collator change (before / after).
"""

from __future__ import annotations

from bench.common import Case

NAME = "collate"
PROVIDERS = ("padded", "packed", "prefix")
MODES = ("collate",)
PRESETS = {  # B pairs per micro-batch, prompt / completion length means P, C tokens
    "smoke": [{"B": 4, "P": 16, "C": 8, "batches": 2}],
    "quick": [
        {"B": 8, "P": 163, "C": 88, "batches": 32},
        {"B": 64, "P": 163, "C": 88, "batches": 8},
    ],  # fmt: skip
    "gpu": [{"B": 64, "P": 163, "C": 88, "batches": 8}],
}


def examples(shape: dict, seed: int = 0) -> list[dict]:
    """B * batches preference examples with long-tailed token-id lists (vocab 32000)."""
    import random

    from bench.e2e_dpo import draw_length

    rng = random.Random(seed)
    ids = lambda mean: [rng.randrange(4, 32000) for _ in range(draw_length(rng, mean))]
    return [{"prompt_ids": ids(shape["P"]), "chosen_ids": ids(shape["C"]),
             "rejected_ids": ids(shape["C"]), "row": i}
            for i in range(shape["B"] * shape["batches"])]  # fmt: skip


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    from bench.e2e_dpo import MAX_LENGTH
    from csd_fast.batch import collate_padded
    from csd_fast.packing import collate_packed

    rows, B = examples(shape), shape["B"]
    chunks = [rows[i : i + B] for i in range(0, len(rows), B)]
    if provider == "padded":
        collate = lambda ex: collate_padded(ex, 0, max_length=MAX_LENGTH)
    else:
        prefix = provider == "prefix"
        collate = lambda ex: collate_packed(ex, 0, max_length=MAX_LENGTH, prefix_sharing=prefix)
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                 for r in rows)  # fmt: skip

    def fn():
        return [collate(c) for c in chunks]

    return Case(fn, items={"pairs": len(rows), "tokens": tokens})
