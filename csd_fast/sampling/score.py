"""`csd score`: reward-model scores (raw logits) of every sample, as resumable Parquet shards.

    csd score --model RM --samples samples/ --output scores/ --max-batch-tokens 16384
    csd score ... --backend vllm              # vLLM's pooling runner, activation off

Output: the sample rows plus `reward` (the RM's raw logit, never a sigmoid) and `reward_tokens`
(the scored length). Shard j holds samples [j * shard_size, (j + 1) * shard_size) of the input;
the same resume, `--shard i/N` and manifest rules as `csd sample` apply (`--overwrite`).
"""

from __future__ import annotations

import json
import sys

from csd_fast.sampling.options import Option, output_settings, parse_options
from csd_fast.sampling.sample import ENGINE_OPTIONS

PROG = "csd score"

OPTIONS = [
    Option(
        "model",
        str,
        None,
        "reward model directory (sequence classification, 1 label)",
        required=True,
    ),
    Option("samples", str, None, "a `csd sample` output folder", required=True),
    Option("output", str, None, "output folder", required=True),
    Option(
        "chat_template", str, "auto", "the RM's template: auto | none | Jinja file", output=True
    ),
    Option(
        "max_length",
        int,
        None,
        "truncate scored sequences to this many tokens (keep start)",
        output=True,
    ),
    Option(
        "max_batch_tokens",
        int,
        None,
        "token budget of a packed batch (default: 16384 on a "
        "GPU, 2048 on CPU); halved on out-of-memory",
    ),
    Option("max_batch_size", int, 512, "sequences per batch at most"),
    Option("packing", bool, True, "pack sequences without padding (--no-packing: padded)"),
    *[o for o in ENGINE_OPTIONS if o.name != "shard_size"],
    Option("shard_size", int, 4096, "samples per output shard (the unit of resume)", output=True),
]
# the hf scorer's numbers do not depend on packing or batching (tested to fp32 rounding)


def reward_schema(samples_schema):
    import pyarrow as pa

    return samples_schema.append(pa.field("reward", pa.float64())).append(
        pa.field("reward_tokens", pa.int32())
    )


def conversation(row: dict) -> list[dict]:
    if row.get("messages"):
        return json.loads(row["messages"])
    return [{"role": "user", "content": row["prompt"]}]


def main(argv: list[str] | None = None) -> int:
    from csd_fast.sampling import inputs, profiles, rewards, store
    from csd_fast.sampling.stage import open_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    v = parse_options(PROG, "Reward-model scores of samples (raw logits).", OPTIONS, argv)
    manifest = store.read_manifest(v["samples"])
    if not manifest.get("complete"):
        raise SystemExit(f"{v['samples']}: sampling is not finished (rerun `csd sample` first)")
    table = store.read_table(v["samples"])
    fingerprint = {
        "model": inputs.model_fingerprint(v["model"]),
        "input": inputs.input_fingerprint(v["samples"]),
    }
    settings = output_settings(OPTIONS, v)
    job = open_stage(PROG, "score", "scores", v, argv, settings, fingerprint, table.num_rows)
    if isinstance(job, int):
        return job
    dtype = v["dtype"] if v["dtype"] != "auto" else job.profile.engine.get("dtype", "auto")
    if v["backend"] == "vllm":
        scorer = rewards.VllmScorer(
            v["model"], job.profile.engine, seed=0, max_model_len=v["max_model_len"]
        )
    else:
        scorer = rewards.PackedScorer(v["model"], dtype=dtype, packing=v["packing"])
        layout = "packed" if scorer.packed else f"padded ({scorer.why_padded})"
        print(f"[{PROG}] transformers scorer on {scorer.device}, {layout}", flush=True)
    budget = v["max_batch_tokens"] or (16384 if profiles.detect() != "cpu" else 2048)
    schema = reward_schema(table.schema)

    def work(j: int):
        import pyarrow as pa

        start, stop = job.out.units(j)
        rows = table.slice(start, stop - start).to_pylist()
        seqs = []
        for r in rows:
            ids = rewards.rm_input_ids(
                scorer.tokenizer, conversation(r), r["response"], v["chat_template"]
            )
            seqs.append(ids[: v["max_length"]] if v["max_length"] else ids)
        scores = scorer.score(seqs, max_batch_tokens=budget, max_batch_size=v["max_batch_size"])
        for r, s, ids in zip(rows, scores, seqs, strict=True):
            r["reward"], r["reward_tokens"] = float(s), len(ids)
        return pa.Table.from_pylist(rows, schema=schema)

    try:
        job.run(work, unit="sample")
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    return job.finish()


if __name__ == "__main__":
    sys.exit(main())
