"""The pairs report: counts per language and the reward-gap distribution, JSON plus a histogram.

write_report(result, "pairs.jsonl", strategy="paired")
# -> pairs.jsonl.report.json and pairs.jsonl.report.png (one histogram per language)
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": float(v.max()),
    }


def gaps_by_lang(result) -> dict[str, list[float]]:
    gaps: dict[str, list[float]] = defaultdict(list)
    for p in result.pairs:
        c, r = p.get("chosen_reward"), p.get("rejected_reward")
        if c is not None and r is not None:
            gaps[str(p.get("lang"))].append(float(c) - float(r))
    return gaps


def build_report(result, strategy: str, options: dict | None = None) -> dict:
    per_lang: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "skipped": Counter()})
    for p in result.pairs:
        per_lang[str(p.get("lang"))]["pairs"] += 1
    for s in result.skipped:
        per_lang[str(s["lang"])]["skipped"][s["reason"]] += 1
    gaps = gaps_by_lang(result)
    languages = {
        lang: {"pairs": d["pairs"], "skipped": dict(d["skipped"]), "reward_gap": _stats(gaps[lang])}
        for lang, d in sorted(per_lang.items())
    }
    return {
        "strategy": strategy,
        "kind": result.kind,
        "options": options or {},
        "pairs": len(result.pairs),
        "skipped": dict(Counter(s["reason"] for s in result.skipped)),
        "languages": languages,
        "reward_gap": _stats([g for v in gaps.values() for g in v]),
        "empty_responses_left_out": getattr(result, "dropped_empty", 0),
        "skipped_prompts": result.skipped,
    }


def plot_gaps(gaps: dict[str, list[float]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    langs = [k for k in sorted(gaps) if gaps[k]]
    if not langs:
        return None
    fig, axes = plt.subplots(len(langs), 1, figsize=(6, 1.8 * len(langs) + 0.6), squeeze=False)
    for ax, lang in zip(axes[:, 0], langs, strict=True):
        ax.hist(gaps[lang], bins=30, color="tab:blue", alpha=0.8)
        ax.set_ylabel(lang)
    axes[-1, 0].set_xlabel("reward gap (chosen - rejected)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result, output: str | Path, strategy: str, options: dict | None = None) -> dict:
    from csd_fast.rundir import write_text_atomically as atomic_write_text

    report = build_report(result, strategy, options)
    out = Path(output)
    png = plot_gaps(
        gaps_by_lang(result),
        out.with_name(out.name + ".report.png"),
        f"{strategy}: reward gaps per language",
    )
    report["histogram"] = str(png) if png else None
    atomic_write_text(
        out.with_name(out.name + ".report.json"), json.dumps(report, indent=1, ensure_ascii=False)
    )
    return report
