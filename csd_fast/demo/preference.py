"""How often a model prefers answering in the prompt's language, per language (the demo's report).

    csd train --fused --loss_type clo        # prints this table before and after training

Each held-out pair of the demo holds one answer in the prompt's language (chosen) and the same
answer in the other language (rejected). The model "prefers the prompt's language" on a pair when
log π(chosen | prompt) > log π(rejected | prompt), summed over the answer's tokens: the answer it
would more likely generate whole. No reference model is involved (this is the policy's own
preference, not DPO's implicit reward). The share is reported per prompt language.

`clo_rows(rows)` turns the demo's pairs into CLO pairs: the two pairs of an item share `id`, which
becomes the CLO `group`; the non-English pair is the one whose chosen feeds the NLL term.
Test: `python -m pytest tests/test_demo_clo.py -q`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SOURCE_LANG = "en"


def clo_rows(rows: list[dict]) -> list[dict]:
    """The demo's pairs with CLO's `group` (= the item's id) and `sft` (= target-language pair)."""
    return [{**r, "group": r["id"], "sft": r["lang"] != SOURCE_LANG} for r in rows]


def write_clo_files(train_file: Path, eval_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """CLO versions of the demo's train/eval JSONL in out_dir (rewritten each time: cheap)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in (train_file, eval_file):
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
        dst = out_dir / f"clo_{src.name}"
        tmp = dst.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clo_rows(rows)))
        tmp.replace(dst)
        paths.append(dst)
    return paths[0], paths[1]


@torch.no_grad()
def language_preference(model, pairs, pad_token_id: int, batch_size: int = 64) -> dict[str, float]:
    """lang -> share of `pairs` (TokenizedPairs with a lang column) where chosen outscores rejected.

    The model is put in eval mode for the pass and restored after.
    """
    from csd_fast.batch import collate_padded
    from csd_fast.forward import sequence_forward

    if pairs.lang is None:
        raise ValueError(f"{pairs.source}: a `lang` column is needed for a per-language report")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins: dict[str, list[int]] = {}
    try:
        for start in range(0, len(pairs), batch_size):
            examples = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
            batch = collate_padded(examples, pad_token_id).to(device)
            out = sequence_forward(model, batch, with_stats=False)
            prefers = (out.chosen_logps > out.rejected_logps).tolist()
            for ex, win in zip(examples, prefers, strict=True):
                wins.setdefault(ex["lang"], []).append(int(win))
    finally:
        model.train(was_training)
    return {lang: sum(v) / len(v) for lang, v in sorted(wins.items())}


def format_preference(before: dict[str, float], after: dict[str, float] | None = None) -> str:
    """A small table: language, share before and (when given) after training."""
    head = "prefers the prompt's language (held-out pairs)"
    lines = [f"{head}\n  lang   before" + ("   after" if after is not None else "")]
    for lang in before:
        row = f"  {lang:<5}  {before[lang]:6.1%}"
        if after is not None:
            row += f"  {after.get(lang, float('nan')):6.1%}"
        lines.append(row)
    return "\n".join(lines)
