"""What every pair strategy shares: grouping, tie rules, TRL's preference row, the result.

    groups = by_prompt(rows)                    # (prompt_id, lang) -> samples, input order
    pick = extremes([r["reward"] for r in g])   # (best, worst) indices, or None when all tie
    pair_row(best, worst, conversational=True)  # TRL's prompt / chosen / rejected + provenance

Ties: among equal scores the first sample (lowest sample_index) wins, so a rerun gives the same
pairs; a prompt whose best and worst scores are equal has nothing to prefer and is skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

TOO_FEW, ALL_TIED, SMALL_GAP, NO_SOURCE = "too_few", "all_tied", "small_gap", "no_source"


@dataclass
class PairResult:
    pairs: list[dict] = field(default_factory=list)
    # one record per skipped prompt: {"prompt_id", "lang", "reason", "samples"}
    skipped: list[dict] = field(default_factory=list)
    kind: str = "preference"  # "preference" (prompt/chosen/rejected) or "sft" (prompt/completion)

    def skip(self, key: tuple, reason: str, samples: int) -> None:
        self.skipped.append(
            {"prompt_id": key[0], "lang": key[1], "reason": reason, "samples": samples}
        )


def by_prompt(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Samples of each (prompt_id, lang), prompts in first-seen order, samples by sample_index."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["prompt_id"], r.get("lang"))].append(r)
    return {k: sorted(v, key=lambda r: r.get("sample_index", 0)) for k, v in groups.items()}


def by_group(rows: list[dict]) -> dict[str, dict[str | None, list[dict]]]:
    """group -> lang -> samples; a row without a group is its own group (its prompt id)."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        g = r.get("group") if r.get("group") is not None else r["prompt_id"]
        out[str(g)][r.get("lang")].append(r)
    for langs in out.values():
        for k in langs:
            langs[k].sort(key=lambda r: (r["prompt_id"], r.get("sample_index", 0)))
    return out


def extremes(values: list[float]) -> tuple[int, int] | None:
    """(index of the max, index of the min), first occurrence; None when max == min."""
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    worst = min(range(len(values)), key=lambda i: (values[i], i))
    return None if values[best] == values[worst] else (best, worst)


def is_conversational(rows: list[dict]) -> bool:
    return any(r.get("messages") for r in rows)


def prompt_of(row: dict, conversational: bool):
    if not conversational:
        return row["prompt"]
    if row.get("messages"):
        return json.loads(row["messages"])
    return [{"role": "user", "content": row["prompt"]}]


def completion_of(text: str, conversational: bool):
    return [{"role": "assistant", "content": text}] if conversational else text


def pair_row(
    chosen: dict,
    rejected: dict,
    conversational: bool,
    *,
    score: str = "reward",
    prompt_row: dict | None = None,
) -> dict:
    """TRL's preference row (prompt, chosen, rejected) plus where the pair came from."""
    head = prompt_row or chosen
    return {
        "prompt": prompt_of(head, conversational),
        "chosen": completion_of(chosen["response"], conversational),
        "rejected": completion_of(rejected["response"], conversational),
        "prompt_id": head["prompt_id"],
        "lang": head.get("lang"),
        "source_group": head.get("group"),  # not `group`: that column drives CLO batching
        "chosen_reward": float(chosen[score]),
        "rejected_reward": float(rejected[score]),
        "chosen_index": int(chosen.get("sample_index", 0)),
        "rejected_index": int(rejected.get("sample_index", 0)),
    }


def best_worst(
    rows: list[dict], *, score: str = "reward", min_gap: float = 0.0, choose_rejected=None
) -> PairResult:
    """Per prompt: chosen = the best score; rejected = the worst, or `choose_rejected(values)`."""
    result = PairResult()
    conv = is_conversational(rows)
    for key, samples in by_prompt(rows).items():
        if len(samples) < 2:
            result.skip(key, TOO_FEW, len(samples))
            continue
        values = [float(s[score]) for s in samples]
        pick = extremes(values)
        if pick is None:
            result.skip(key, ALL_TIED, len(samples))
            continue
        best, worst = pick
        if choose_rejected is not None:
            worst = choose_rejected(values, best)
            if values[worst] == values[best]:
                result.skip(key, ALL_TIED, len(samples))
                continue
        if values[best] - values[worst] < min_gap:
            result.skip(key, SMALL_GAP, len(samples))
            continue
        result.pairs.append(pair_row(samples[best], samples[worst], conv, score=score))
    return result


def build_pairs(strategy: str, rows: list[dict], **options) -> PairResult:
    """Dispatch to the strategy's module (names with - or _)."""
    import importlib

    name = strategy.replace("-", "_")
    module = importlib.import_module(f"csd_fast.pairs.{name}")
    return module.build(rows, **options)
