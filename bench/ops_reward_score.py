"""Reward-model scoring tokens/s: packed (csd score) vs a padded AutoModelForSequenceClassification
loop, on length-varied samples.

    python -m bench --only reward_score --quick

`padded`: batches of B samples in input order, right-padded to the batch's longest, the model's
own forward (`.logits[:, 0]`), as scoring scripts do. `packed`: `PackedScorer.score`, length-sorted
token-budget batches laid out without padding (csd_packed attention). Same random-init Llama RM,
same samples (lengths uniform in [L/8, 2L)); tokens/s counts real tokens only. Goal: >= 2x.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from bench.common import Case

NAME = "reward_score"
MODES = ("fwd",)
PROVIDERS = ("padded", "packed")
PRESETS = {
    "smoke": [{"N": 16, "L": 32, "B": 8, "budget": 512}],
    "quick": [{"N": 64, "L": 128, "B": 16, "budget": 2048}],
    "gpu": [{"N": 2048, "L": 1024, "B": 32, "budget": 32768, "H": 2048, "layers": 16}],
}


def _rm(shape) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    H = shape.get("H", 256)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=H,
        intermediate_size=3 * H,
        num_hidden_layers=shape.get("layers", 4),
        num_attention_heads=H // 64,
        num_key_value_heads=H // 64,
        head_dim=64,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    from csd_fast.demo.assets import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(path)
    return path


def setup(provider, mode, shape, device) -> Case:
    import torch

    from csd_fast.sampling.rewards import PackedScorer

    rng = random.Random(0)
    L = shape["L"]
    seqs = [
        [rng.randrange(1, 32000) for _ in range(rng.randrange(L // 8, 2 * L))]
        for _ in range(shape["N"])
    ]
    dtype = "float32" if device == "cpu" else "bfloat16"
    scorer = PackedScorer(str(_rm(shape)), dtype=dtype, device=device, packing=provider == "packed")
    items = {"tokens": sum(map(len, seqs))}
    if provider == "packed":
        return Case(fn=lambda: scorer.score(seqs, max_batch_tokens=shape["budget"]), items=items)
    model, B = scorer.model, shape["B"]

    @torch.no_grad()
    def padded():
        out = []
        for s in range(0, len(seqs), B):
            batch = seqs[s : s + B]
            T = max(map(len, batch))
            ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, q in enumerate(batch):
                ids[i, : len(q)] = torch.tensor(q)
                mask[i, : len(q)] = 1
            out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0])
        return torch.cat(out)

    return Case(fn=padded, items=items)
