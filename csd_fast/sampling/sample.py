"""`csd sample`: K on-policy responses per prompt, written as resumable Parquet shards.

    csd sample --model M --prompts prompts.jsonl --output samples/ --num-samples 64 \
        --temperature 1.0 --top-p 1.0 --max-tokens 1024 --profile auto
    csd sample ... --shard 3/8                 # SLURM array task 3 of 8: its share of the shards
    python -c "from csd_fast.sampling import read_samples; print(read_samples('samples'))"

One row per sample: prompt_id, sample_index, prompt, messages (the chat as JSON, when the prompt
was one), lang, group, response, num_tokens, finish_reason, cumulative_logprob, seed. Each prompt
draws with its own seed (from `--seed` and its id), so a resumed or re-split run draws the same
samples. Rerunning the same command after a crash or kill -9 skips finished shards; a folder made
with other settings or another model is refused with the difference named (`--overwrite`).
"""

from __future__ import annotations

import hashlib
import sys

from csd_fast.sampling.options import (
    Option,
    UsageError,
    output_settings,
    parse_options,
)

PROG = "csd sample"

ENGINE_OPTIONS = [
    Option("backend", str, "vllm", "generation engine", output=True, choices=("vllm", "hf")),
    Option(
        "profile",
        str,
        "auto",
        "hardware profile (sets engine args and environment)",
        choices=("auto", "cuda", "rocm-mi250x", "cpu"),
    ),
    Option(
        "engine_arg",
        dict,
        {},
        "vLLM LLM(...) argument KEY=VALUE, repeatable; overrides the profile",
    ),
    Option(
        "env", dict, {}, "environment KEY=VALUE for the engine, repeatable; overrides the profile"
    ),
    Option("dtype", str, "auto", "weights dtype for --backend hf (auto: the profile's)"),
    Option("max_model_len", int, None, "engine context length (default: the model's)"),
    Option(
        "data_parallel",
        str,
        "auto",
        "engine processes on this node: auto (one per visible device) or a count",
    ),
    Option("shard", str, None, "i/N: this process takes the shards j with j % N == i"),
    Option("shard_size", int, 64, "prompts per output shard (the unit of resume)", output=True),
    Option("overwrite", bool, False, "delete what the output folder holds and start over"),
    Option("dp_rank", int, None, "(internal) data-parallel rank"),
    Option("dp_size", int, None, "(internal) data-parallel size"),
]

OPTIONS = [
    Option("model", str, None, "policy model directory (or hub id)", required=True),
    Option(
        "prompts", str, None, "JSONL / Parquet / save_to_disk / csd output folder", required=True
    ),
    Option("output", str, None, "output folder", required=True),
    Option("num_samples", int, 8, "responses per prompt (K)", output=True),
    Option("temperature", float, 1.0, "sampling temperature (0: greedy)", output=True),
    Option("top_p", float, 1.0, "nucleus sampling mass", output=True),
    Option("top_k", int, 0, "top-k sampling (0: off)", output=True),
    Option("max_tokens", int, 512, "max new tokens per response", output=True),
    Option("stop", list, [], "stop strings (comma-separated or repeated)", output=True),
    Option(
        "seed",
        int,
        0,
        "base seed; each prompt's seed derives from it and the prompt id",
        output=True,
    ),
    Option("drop_truncated", bool, False, "drop responses cut by --max-tokens", output=True),
    Option(
        "drop_duplicates",
        bool,
        False,
        "drop exact repeats of a response within a prompt",
        output=True,
    ),
    Option("chat_template", str, "auto", "auto | none | path to a Jinja template", output=True),
    Option("system_prompt", str, None, "system turn prepended to every chat", output=True),
    *ENGINE_OPTIONS,
]


def prompt_seed(seed: int, prompt_id: str, lang: str | None) -> int:
    """A prompt's own seed: stable across runs, shards and batch compositions."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{lang}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


SCHEMA_FIELDS = (
    ("prompt_id", "string"),
    ("sample_index", "int32"),
    ("prompt", "string"),
    ("messages", "string"),
    ("lang", "string"),
    ("group", "string"),
    ("response", "string"),
    ("num_tokens", "int32"),
    ("finish_reason", "string"),
    ("cumulative_logprob", "float64"),
    ("seed", "int64"),
)


def samples_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, t)()) for name, t in SCHEMA_FIELDS])


def sample_rows(prompts, completions, seeds, *, drop_truncated: bool, drop_duplicates: bool):
    """Output rows of one shard (and how many samples each filter dropped)."""
    rows, dropped = [], {"truncated": 0, "duplicate": 0}
    for row, comps, seed in zip(prompts, completions, seeds, strict=True):
        seen: set[str] = set()
        for k, c in enumerate(comps):
            if drop_truncated and c.finish_reason == "length":
                dropped["truncated"] += 1
                continue
            if drop_duplicates and c.text in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(c.text)
            rows.append(
                {
                    "prompt_id": row.id,
                    "sample_index": k,
                    "prompt": row.prompt,
                    "messages": row.messages_json(),
                    "lang": row.lang,
                    "group": row.group,
                    "response": c.text,
                    "num_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "cumulative_logprob": c.cumulative_logprob,
                    "seed": seed,
                }
            )
    return rows, dropped


def data_parallel_size(value: str, backend: str, profile) -> int:
    if value == "auto":
        return max(len(profile.devices), 1) if backend == "vllm" else 1
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"--data-parallel: expected auto or a count, got {value!r}") from None
    return max(n, 1)


def strip_dp_flags(argv: list[str]) -> list[str]:
    """The command line for data-parallel children: no --overwrite (the parent did it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0].replace("_", "-")
        if flag in ("--overwrite", "--no-overwrite"):
            # `--overwrite VALUE` (a bool given as the next word) goes too
            skip = "=" not in a and a is not argv[-1] and _is_bool_word(argv[argv.index(a) + 1])
            continue
        if flag in ("--data-parallel", "--dp-rank", "--dp-size"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _is_bool_word(word: str) -> bool:
    return word.lower() in ("1", "0", "true", "false", "yes", "no", "y", "n", "on", "off")


def settings_path(out_dir, shard: tuple[int, int]):
    from pathlib import Path

    name = "settings.yaml" if shard == (0, 1) else f"settings.shard-{shard[0]}-of-{shard[1]}.yaml"
    return Path(out_dir) / name


def main(argv: list[str] | None = None) -> int:
    from csd_fast.sampling import engines, inputs
    from csd_fast.sampling.stage import open_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    v = parse_options(PROG, "K responses per prompt on vLLM (or transformers).", OPTIONS, argv)
    if v["temperature"] <= 0 and v["num_samples"] != 1:
        raise UsageError(
            f"{PROG}: greedy decoding (--temperature 0) draws one sample; "
            f"got --num-samples {v['num_samples']}"
        )
    prompts = inputs.load_prompts(v["prompts"])
    fingerprint = {
        "model": inputs.model_fingerprint(v["model"]),
        "input": inputs.input_fingerprint(v["prompts"]),
    }
    settings = output_settings(OPTIONS, v)
    job = open_stage(
        PROG, "sample", "samples", v, argv, settings, fingerprint, len(prompts),
        describe_profile=True,
    )  # fmt: skip
    if isinstance(job, int):
        return job
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(v["model"])
    dtype = v["dtype"] if v["dtype"] != "auto" else job.profile.engine.get("dtype", "auto")
    engine = engines.open_engine(
        v["backend"],
        v["model"],
        job.profile,
        seed=v["seed"],
        max_model_len=v["max_model_len"],
        dtype=dtype,
    )
    params = engines.GenParams(
        n=v["num_samples"],
        temperature=v["temperature"],
        top_p=v["top_p"],
        top_k=v["top_k"],
        max_tokens=v["max_tokens"],
        stop=tuple(v["stop"]),
    )
    dropped_total = {"truncated": 0, "duplicate": 0}

    def work(j: int):
        import pyarrow as pa

        start, stop = job.out.units(j)
        rows = prompts[start:stop]
        ids = [
            inputs.render_prompt(
                tokenizer, r, chat_template=v["chat_template"], system_prompt=v["system_prompt"]
            )
            for r in rows
        ]
        seeds = [prompt_seed(v["seed"], r.id, r.lang) for r in rows]
        comps = engine.generate(ids, params, seeds)
        table_rows, dropped = sample_rows(
            rows,
            comps,
            seeds,
            drop_truncated=v["drop_truncated"],
            drop_duplicates=v["drop_duplicates"],
        )
        for k in dropped:
            dropped_total[k] += dropped[k]
        return pa.Table.from_pylist(table_rows, schema=samples_schema())

    try:
        job.run(work, unit="sample", rows_per_unit=v["num_samples"])
    finally:
        engine.close()
    if any(dropped_total.values()):
        print(
            f"[{PROG}] dropped {dropped_total['truncated']} truncated and "
            f"{dropped_total['duplicate']} duplicate sample(s)"
        )
    return job.finish()


def resolved_settings(v: dict, profile, fingerprint: dict) -> dict:
    """What the run uses, printed and saved beside the output."""
    return {
        "settings": {k: x for k, x in v.items() if k not in ("dp_rank", "dp_size")},
        "profile": {
            "name": profile.name,
            "engine": profile.engine,
            "env": profile.env,
            "devices": profile.devices,
        },
        "fingerprint": fingerprint,
    }


if __name__ == "__main__":
    sys.exit(main())
