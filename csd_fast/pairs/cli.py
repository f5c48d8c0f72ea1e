"""`csd pairs`: preference pairs (TRL's format) from scored samples, plus a report.

    csd pairs --scores scores/ --strategy paired --output pairs.jsonl
    csd pairs --scores scores/ --strategy sweet-spot --point -2 --output pairs.parquet
    csd pairs --scores scores/ --strategy icr --policy dpo_en/ --reference sft/ --beta 0.1 ...
    csd pairs --scores samples/ --strategy cm-align --encoder multilingual-e5/ --output ...
    csd train --model_name_or_path M --dataset_name pairs.jsonl --output_dir run/

Writes FILE (.jsonl or .parquet: prompt, chosen, rejected, prompt_id, lang, group,
chosen_reward, rejected_reward, ...; max-r writes prompt / completion), FILE.report.json (counts
per language, skipped prompts and why, reward-gap statistics) and FILE.report.png (a histogram
of reward gaps per language). Input: a `csd score` / `csd sample` / `csd translate` folder, or a
JSONL / Parquet table with the same columns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from csd_fast.sampling.options import Option, parse_options, show_settings

PROG = "csd pairs"
OPTIONS = [
    Option(
        "scores",
        str,
        None,
        "scored samples: a csd output folder or a JSONL / Parquet file",
        required=True,
    ),
    Option(
        "strategy",
        str,
        "paired",
        "pair rule",
        choices=("paired", "sweet-spot", "max-r", "clo", "icr", "cm-align"),
    ),
    Option("output", str, None, "output file (.jsonl or .parquet)", required=True),
    Option("languages", list, [], "keep only these languages (default: all)"),
    Option("min_gap", float, 0.0, "skip pairs whose score gap is below this"),
    Option("point", float, -2.0, "sweet-spot: rejected nearest mu + point * sigma"),
    Option("source_lang", str, "en", "clo / icr / cm-align: the source (English) language"),
    Option("allow_single", bool, False, "max-r: keep prompts with a single sample"),
    Option("policy", str, None, "icr: the English-aligned DPO model"),
    Option("reference", str, None, "icr: its reference model"),
    Option("beta", float, 0.1, "icr: the DPO beta of the implicit reward"),
    Option("head_impl", str, "auto", "icr: log-prob head (auto: fused kernel; eager)"),
    Option("encoder", str, None, "cm-align: multilingual encoder (mean-pooled AutoModel)"),
]


def load_scored(source: str) -> list[dict]:
    path = Path(source)
    if path.is_dir() and (path / "manifest.json").exists():
        from csd_fast.sampling.store import read_table

        return read_table(path).to_pylist()
    from csd_fast.data.sources import load_rows

    src = load_rows(source)
    return src.raw if src.raw is not None else src.to_list()


def write_rows(rows: list[dict], output: Path) -> None:
    from csd_fast.rundir import write_bytes_atomically as atomic_write_bytes

    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix in (".parquet", ".pq"):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        atomic_write_bytes(output, buf.getvalue())
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_bytes(output, text.encode("utf-8"))


def _strategy_options(v: dict) -> dict:
    s = v["strategy"]
    opts: dict = {"min_gap": v["min_gap"]}
    if s == "sweet-spot":
        opts["point"] = v["point"]
    if s == "max-r":
        opts = {"allow_single": v["allow_single"]}
    if s in ("clo", "icr", "cm-align"):
        opts["source_lang"] = v["source_lang"]
    if s == "icr":
        if not (v["policy"] and v["reference"]):
            raise SystemExit(f"{PROG}: icr needs --policy and --reference")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        opts.update(
            policy=AutoModelForCausalLM.from_pretrained(v["policy"], dtype=dtype).to(dev),
            reference=AutoModelForCausalLM.from_pretrained(v["reference"], dtype=dtype).to(dev),
            tokenizer=AutoTokenizer.from_pretrained(v["policy"]),
            beta=v["beta"],
            head_impl=v["head_impl"],
        )
    if s == "cm-align":
        if not v["encoder"]:
            raise SystemExit(f"{PROG}: cm-align needs --encoder MODEL")
        from csd_fast.pairs.cm_align import MeanPooledEncoder

        opts["embed"] = MeanPooledEncoder(v["encoder"])
    return opts


def main(argv: list[str] | None = None) -> int:
    from csd_fast.pairs.common import build_pairs
    from csd_fast.pairs.report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    v = parse_options(PROG, "Preference pairs from scored samples.", OPTIONS, argv)
    output = Path(v["output"])
    show_settings(PROG, v, output.with_name(output.name + ".settings.yaml"))
    rows = load_scored(v["scores"])
    if v["strategy"] not in ("clo", "icr", "cm-align") and rows and "reward" not in rows[0]:
        raise SystemExit(f"{v['scores']}: no `reward` column; run `csd score` first")
    if v["languages"]:
        keep = set(v["languages"])
        if v["strategy"] in ("clo", "icr", "cm-align"):
            keep.add(v["source_lang"])  # the English rows are the anchor of these rules
        rows = [r for r in rows if r.get("lang") in keep]
    empty = [r for r in rows if not str(r.get("response") or "").strip()]
    if empty:  # TRL refuses empty completions; such a sample can be neither chosen nor rejected
        rows = [r for r in rows if str(r.get("response") or "").strip()]
    result = build_pairs(v["strategy"], rows, **_strategy_options(v))
    result.dropped_empty = len(empty)
    if v["languages"] and v["strategy"] in ("clo", "icr", "cm-align"):
        wanted = set(v["languages"])
        result.pairs = [p for p in result.pairs if p.get("lang") in wanted]
    write_rows(result.pairs, output)
    report = write_report(
        result,
        output,
        v["strategy"],
        {k: v[k] for k in ("min_gap", "point", "source_lang", "beta")},
    )
    if empty:
        print(f"[{PROG}] left out {len(empty)} empty response(s)")
    skipped = ", ".join(f"{n} {k}" for k, n in report["skipped"].items()) or "none"
    print(f"[{PROG}] {len(result.pairs)} {result.kind} rows -> {output}; skipped: {skipped}")
    for lang, d in report["languages"].items():
        gap = d["reward_gap"]
        shown = f", gap median {gap['median']:.3f}" if gap.get("count") else ""
        print(f"  {lang}: {d['pairs']} rows{shown}, skipped {d['skipped'] or 'none'}")
    print(
        f"[{PROG}] report: {output}.report.json"
        + (f", {report['histogram']}" if report["histogram"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
