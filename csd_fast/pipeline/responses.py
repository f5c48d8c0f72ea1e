"""Responses files: read the sampling stage's Parquet shards, write them, or generate them with HF.

    from csd_fast.pipeline.responses import read_responses, generate_responses
    rows = read_responses("runs/x/round-0/sample")        # a shard directory or one .parquet
    generate_responses("model/", prompts, "out/responses", num_samples=4, max_new_tokens=32)

The format is the sample shards of `csd sample` (issue #9): one row per response with columns
prompt_id, sample_index, prompt, lang, group, response, num_tokens, finish_reason ("stop" or
"length"), and optionally `reward` (the reward model's raw logit, from the score stage; `score`
is read too). A directory holds `*.parquet` shards (read in name order; hidden temporary files and
other files are ignored).

`generate_responses` is the transformers fallback for the sample stage (HF `generate`, no vLLM):
it writes one shard per `prompts_per_shard` prompts, each atomically (tmp + rename), and skips the
shards already on disk, so a killed run resumes without redoing or doubling a prompt. Sampling is
seeded per shard, so a resumed run writes the same responses as an uninterrupted one.
Test: `python -m pytest tests/pipeline/test_eval.py -q`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REQUIRED = ("prompt_id", "prompt", "lang", "response")
SCHEMA_COLUMNS = (
    "prompt_id", "sample_index", "prompt", "lang", "group", "response", "num_tokens",
    "finish_reason",
)  # fmt: skip


class ResponsesError(ValueError):
    """A responses file that cannot be used, naming the file, row and column."""


def _shards(path: Path) -> list[Path]:
    if path.is_dir():  # shard-NNNNN (here) or <kind>-NNNNN (`csd sample` / `csd score`)
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such responses file or directory")


def read_responses(path: str | os.PathLike) -> list[dict]:
    """Every response row of a shard directory or file, checked for the required columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    rows: list[dict] = []
    shards = _shards(path)
    if not shards:
        raise ResponsesError(f"{path}: no .parquet shards")
    for shard in shards:
        table = pq.read_table(shard)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ResponsesError(f"{shard}: missing column(s) {missing}")
        for i, row in enumerate(table.to_pylist()):
            for c in REQUIRED:
                if row[c] is None:
                    raise ResponsesError(f"{shard}, row {i}, column {c!r}: empty")
            row.setdefault("sample_index", 0)
            rows.append(row)
    return rows


def write_shard(path: Path, rows: list[dict]) -> None:
    """One Parquet shard, atomically: a crash leaves the old file or none, never half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompt rows (JSONL or Parquet) with prompt_id (default: the row number), prompt and lang."""
    path = Path(path)
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for i, row in enumerate(rows):
        for c in ("prompt", "lang"):
            if not row.get(c):
                raise ResponsesError(f"{path}, row {i}, column {c!r}: missing or empty")
        row.setdefault("prompt_id", str(i))
        row["prompt_id"] = str(row["prompt_id"])
    return rows


def render_prompt(tokenizer, prompt) -> str:
    """Plain text as given; a message list through the tokenizer's chat template (as TRL does)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def generate_responses(
    model_path: str | os.PathLike,
    prompts: list[dict],
    out_dir: str | os.PathLike,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    prompts_per_shard: int = 64,
) -> Path:
    """Sample `num_samples` responses per prompt with transformers into resumable shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"  # generation continues each row from its last prompt token
    model = None
    for start in range(0, len(prompts), prompts_per_shard):
        shard = out / f"shard-{start // prompts_per_shard:05d}.parquet"
        if shard.exists():
            continue  # written whole by an earlier run (atomic rename)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        chunk = prompts[start : start + prompts_per_shard]
        torch.manual_seed(seed + start)
        texts = [render_prompt(tok, p["prompt"]) for p in chunk]
        # chat templates write their own BOS; plain text gets the tokenizer's special tokens
        add_special = all(isinstance(p["prompt"], str) for p in chunk)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tok.pad_token_id,
            )
        width = enc["input_ids"].shape[1]
        rows = []
        for j, full in enumerate(gen.tolist()):
            prompt = chunk[j // num_samples]
            prompt_ids = [t for t in full[:width] if t != tok.pad_token_id]
            ids = [t for t in full[width:] if t != tok.pad_token_id]
            stopped = bool(ids) and ids[-1] == tok.eos_token_id
            content = ids[:-1] if stopped else ids
            # decode the continuation in context, so prompt + response reads (and tokenizes)
            # as the model wrote it: a leading space survives, unlike decoding `content` alone
            head = tok.decode(prompt_ids, skip_special_tokens=True)
            text = tok.decode(prompt_ids + content, skip_special_tokens=True)
            response = (
                text[len(head) :]
                if text.startswith(head)
                else tok.decode(content, skip_special_tokens=True)
            )
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "sample_index": j % num_samples,
                    "prompt": json.dumps(prompt["prompt"])
                    if not isinstance(prompt["prompt"], str)
                    else prompt["prompt"],
                    "lang": prompt["lang"],
                    "group": str(prompt.get("group", prompt["prompt_id"])),
                    "response": response,
                    "num_tokens": len(ids),
                    "finish_reason": "stop" if stopped else "length",
                }
            )
        write_shard(shard, rows)
    return out
