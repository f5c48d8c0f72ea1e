"""`csd eval`: per-language results of one or more models on the same prompts, side by side.

    csd eval --responses base=runs/x/base/sample round-1=runs/x/round-1/sample \
             --reward_model RM --baseline base --output_dir runs/x/eval
    csd eval --model round-1=runs/x/round-1/train/final --prompts eval_prompts.jsonl \
             --num_samples 4 --reward_model RM --output_dir out      # generate, then evaluate

Each system (a column: a model, or a round of `csd loop`) is a responses set in the sample-shard
format (`csd_fast.pipeline.responses`), given or generated. Per prompt language, for each system:

    fidelity        share of responses whose identified language is the prompt's language
    undetected      share lingua could not decide (counted as not faithful)
    code_switch     share with runs of >= min_words words in two or more languages
    reward          mean reward-model score (raw logit; the shard's `reward` column when present)
    win_rate        vs the baseline system: share of (prompt_id, sample_index) matches where this
    tie_rate        system's response scores higher / equal (|Δ| <= tie_tolerance); loss = the rest
    mean_tokens     mean generated tokens
    truncation      share that stopped at the length limit (finish_reason == "length")
    n               responses

Writes eval.json (nested: system -> lang -> metric), eval.csv (long: system, lang, metric,
value), one PNG per metric (bars by language, one per system) and prints the table. Scores are
cached per system in <output_dir>/scores-<system>.parquet, so a rerun after a kill does not
rescore. Test: `python -m pytest tests/pipeline/test_eval.py -q`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from csd_fast.pipeline.responses import read_responses, write_shard

METRICS = (
    "fidelity", "undetected", "code_switch", "reward", "win_rate", "tie_rate", "mean_tokens",
    "truncation", "n",
)  # fmt: skip
ALL = "all"  # the pooled row over every language


@dataclass
class EvalSettings:
    reward_model: str | None = None
    baseline: str | None = None  # name of the system the win rates compare against
    extra_languages: tuple[str, ...] = ("en",)  # lingua candidates beyond the prompts' languages
    min_switch_words: int = 3
    tie_tolerance: float = 1e-6
    batch_size: int = 16
    plots: bool = True


@dataclass
class EvalResult:
    table: dict[str, dict[str, dict[str, float]]]  # system -> lang -> metric -> value
    systems: list[str]
    languages: list[str]
    files: list[Path] = field(default_factory=list)


def _score_cached(name: str, rows: list[dict], scorer, out_dir: Path) -> list[float]:
    """The rows' RM scores: the shard's own `score` column, a cached file, or a scoring pass."""
    for column in ("reward", "score"):  # `csd score` writes reward; hand-made files may say score
        if all(r.get(column) is not None for r in rows):
            return [float(r[column]) for r in rows]
    if scorer is None:
        return []
    cache = out_dir / f"scores-{name}.parquet"
    keys = [_key(r) for r in rows]
    if cache.exists():
        import pyarrow.parquet as pq

        got = {
            (c["prompt_id"], c["sample_index"]): c["score"]
            for c in pq.read_table(cache).to_pylist()
        }
        if all(k in got for k in keys):
            return [float(got[k]) for k in keys]
    scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    write_shard(cache, [{"prompt_id": k[0], "sample_index": k[1], "score": s}
                        for k, s in zip(keys, scores, strict=True)])  # fmt: skip
    return scores


def _key(row: dict) -> tuple[str, int]:
    return str(row["prompt_id"]), int(row["sample_index"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def evaluate(
    systems: dict[str, list[dict]], out_dir: str | Path, settings: EvalSettings | None = None
) -> EvalResult:
    """Per-language metrics of every system (name -> response rows); writes the outputs."""
    from csd_fast.pipeline.judges import LanguageJudge, RewardScorer

    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not systems:
        raise ValueError("csd eval needs at least one responses set")
    if settings.baseline is not None and settings.baseline not in systems:
        raise ValueError(f"baseline {settings.baseline!r} is not one of {list(systems)}")
    languages = sorted({r["lang"] for rows in systems.values() for r in rows})
    judge = LanguageJudge(languages, settings.extra_languages, settings.min_switch_words)
    scorer = None
    if settings.reward_model is not None:
        scorer = RewardScorer(settings.reward_model, batch_size=settings.batch_size)
    scores = {name: _score_cached(name, rows, scorer, out) for name, rows in systems.items()}
    by_key = {  # (prompt_id, sample_index) -> score, for the win rates ({} when unscored)
        name: {_key(r): s for r, s in zip(rows, scores[name], strict=True)} if scores[name] else {}
        for name, rows in systems.items()
    }
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in systems.items():
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r["lang"]].append(i)
            groups[ALL].append(i)
        per_lang = {}
        for lang, idx in sorted(groups.items(), key=lambda kv: (kv[0] == ALL, kv[0])):
            per_lang[lang] = _metrics(name, rows, idx, scores[name], by_key, judge, settings)
        table[name] = per_lang
    names = list(systems)
    result = EvalResult(table, names, [*languages, ALL])
    result.files = _write(result, out, settings)
    return result


def _metrics(name, rows, idx, scores, by_key, judge, settings) -> dict[str, float]:
    found = [judge.language(rows[i]["response"]) for i in idx]
    m = {
        "fidelity": _mean([float(f == rows[i]["lang"]) for f, i in zip(found, idx, strict=True)]),
        "undetected": _mean([float(f is None) for f in found]),
        "code_switch": _mean([float(judge.switches(rows[i]["response"])) for i in idx]),
        "n": float(len(idx)),
    }
    if all(rows[i].get("num_tokens") is not None for i in idx):
        m["mean_tokens"] = _mean([float(rows[i]["num_tokens"]) for i in idx])
    if all(rows[i].get("finish_reason") is not None for i in idx):
        m["truncation"] = _mean([float(rows[i]["finish_reason"] == "length") for i in idx])
    if scores:
        m["reward"] = _mean([scores[i] for i in idx])
        base = settings.baseline
        if base is not None and base != name and by_key[base]:
            wins = ties = total = 0
            for i in idx:
                key = _key(rows[i])
                if key not in by_key[base]:
                    continue  # the baseline has no response for this prompt and sample
                delta = scores[i] - by_key[base][key]
                total += 1
                ties += abs(delta) <= settings.tie_tolerance
                wins += delta > settings.tie_tolerance
            if total:
                m["win_rate"], m["tie_rate"] = wins / total, ties / total
    return m


def _write(result: EvalResult, out: Path, settings: EvalSettings) -> list[Path]:
    files = [out / "eval.json", out / "eval.csv"]
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps({"systems": result.systems, "table": result.table}, indent=1))
    tmp.replace(files[0])
    tmp = out / ".eval.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "lang", "metric", "value"])
        for name in result.systems:
            for lang, metrics in result.table[name].items():
                for metric in METRICS:
                    if metric in metrics:
                        w.writerow([name, lang, metric, metrics[metric]])
    tmp.replace(files[1])
    if settings.plots:
        files += _plots(result, out)
    return files


def _plots(result: EvalResult, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[csd eval] matplotlib not installed: no plots", file=sys.stderr)
        return []
    paths = []
    langs = result.languages
    for metric in METRICS:
        if metric == "n" or not any(
            metric in result.table[s][x]
            for s in result.systems
            for x in langs
            if x in result.table[s]
        ):
            continue
        fig, ax = plt.subplots(
            figsize=(1.2 + 0.9 * len(langs) * max(1, len(result.systems)) / 2, 3.2)
        )
        width = 0.8 / len(result.systems)
        for k, name in enumerate(result.systems):
            values = [result.table[name].get(x, {}).get(metric, math.nan) for x in langs]
            ax.bar([i + k * width for i in range(len(langs))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(langs))], langs)
        ax.set_title(metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"eval_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def format_table(result: EvalResult) -> str:
    """Rows (lang, metric), one column per system."""
    width = max(10, *(len(s) for s in result.systems))
    head = f"{'lang':<6} {'metric':<12} " + " ".join(f"{s:>{width}}" for s in result.systems)
    lines = [head, "-" * len(head)]
    for lang in result.languages:
        for metric in METRICS:
            values = [result.table[s].get(lang, {}).get(metric) for s in result.systems]
            if all(v is None for v in values):
                continue
            cells = " ".join(
                f"{'-':>{width}}" if v is None else f"{v:>{width}.{0 if metric == 'n' else 3}f}"
                for v in values
            )
            lines.append(f"{lang:<6} {metric:<12} {cells}")
    return "\n".join(lines)


def _named(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        if name in out:
            raise SystemExit(f"csd eval: two {what} named {name!r}")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csd eval", description=__doc__.split("\n")[0])
    p.add_argument("--responses", nargs="*", default=[], help="NAME=PATH responses shards")
    p.add_argument("--model", nargs="*", default=[], help="NAME=PATH models to generate with")
    p.add_argument("--prompts", help="prompt rows (prompt_id, prompt, lang) for --model")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)  # CLO's eval sampling: T 0.6
    p.add_argument("--top_p", type=float, default=0.9)  # and top-p 0.9 (REFERENCE.md)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward_model")
    p.add_argument("--baseline", help="system the win rates compare against")
    p.add_argument("--extra_languages", nargs="*", default=["en"])
    p.add_argument("--min_switch_words", type=int, default=3)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--no_plots", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from csd_fast.pipeline.responses import ResponsesError, generate_responses, read_prompts

    a = build_parser().parse_args(argv)
    out = Path(a.output_dir)
    systems: dict[str, list[dict]] = {}
    try:
        for name, path in _named(a.responses, "responses").items():
            systems[name] = read_responses(path)
        models = _named(a.model, "models")
        if models and not a.prompts:
            raise SystemExit("csd eval: --model needs --prompts")
        for name, path in models.items():
            shards = generate_responses(
                path, read_prompts(a.prompts), out / f"responses-{name}",
                num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                temperature=a.temperature, top_p=a.top_p, seed=a.seed,
            )  # fmt: skip
            systems[name] = read_responses(shards)
    except (ResponsesError, FileNotFoundError) as e:
        print(f"csd eval: {e}", file=sys.stderr)
        return 2
    settings = EvalSettings(
        reward_model=a.reward_model,
        baseline=a.baseline,
        extra_languages=tuple(a.extra_languages),
        min_switch_words=a.min_switch_words,
        plots=not a.no_plots,
    )
    result = evaluate(systems, out, settings)
    print(format_table(result))
    print(f"[csd eval] wrote {', '.join(str(p) for p in result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
