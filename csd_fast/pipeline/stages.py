"""The stages `csd loop` runs, each `stage(inputs, output_dir, settings) -> summary`, resumable.

    translate  prompts -> translated prompts              csd translate (issue #9) only
    sample     prompts + policy -> K responses/prompt      csd sample, else transformers generate
    score      samples + reward model -> `reward` column   csd score, else transformers RM
    pairs      scores -> pairs.jsonl (TRL rows)            csd pairs, else paired / max-r here
    train      pairs + recipe -> checkpoints, final/       csd train (resumes from a checkpoint)
    eval       policies -> eval.json/csv/png, per round    csd eval

Every stage is itself resumable after a kill -9: sample and score write atomic shards and skip
finished ones, pairs writes one file atomically, train resumes from its latest checkpoint, eval
reuses its generated shards and cached scores. `inputs` are upstream output paths, `settings`
the JSON-able options that also make up the stage's fingerprint in the loop manifest. With
`engine: auto` the sampling harness's vLLM stages are used when vLLM is installed
(csd_fast.sampling, csd_fast.pairs), else the transformers fallbacks below; `engine: hf` forces
the fallbacks, `engine: vllm` requires the harness.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from csd_fast.pipeline.responses import (
    generate_responses,
    read_prompts,
    read_responses,
    write_shard,
)


class StageError(RuntimeError):
    """A stage that cannot run as configured (named in the message)."""


def harness_available() -> bool:
    """The vLLM stages can run here: the sampling harness and vLLM itself are installed."""
    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("csd_fast.sampling.sample", "vllm"))  # fmt: skip
    except ModuleNotFoundError:  # no csd_fast.sampling package at all
        return False


def _use_harness(settings: dict, stage: str) -> bool:
    engine = settings.get("engine", "auto")
    if engine == "hf":
        return False
    if harness_available():
        return True
    if engine == "vllm" or stage == "translate":
        raise StageError(
            f"the {stage} stage needs vLLM and the sampling harness (csd_fast.sampling), which "
            "are not installed" + ("" if stage == "translate" else "; use engine: hf")
        )
    return False


def _options_file(out: Path, options: dict[str, Any]) -> Path:
    """A harness stage's options as its `--config` YAML, beside its output folder (inside it
    would be a foreign file to the shard store). YAML keeps dicts, lists and booleans as they
    are, which flags would have to re-encode."""
    import yaml

    from csd_fast.rundir import write_text_atomically

    path = out.with_name(f".{out.name}.options.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in options.items() if v is not None}
    write_text_atomically(path, yaml.safe_dump(clean, sort_keys=True))
    return path


def _run_harness(stage: str, out: Path, options: dict[str, Any], inputs: dict) -> None:
    """`csd <stage>` on the vLLM backend with the loop's engine options and these options."""
    engine = dict(inputs.get("engine_options") or {})
    if stage != "pairs":
        engine["backend"] = "vllm"
    _run_cli(stage, ["--config", str(_options_file(out, {**engine, **options}))])


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the loop process dies (Linux), so a kill -9 of `csd loop`
    never leaves an orphaned stage writing into the folder the rerun will use."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_cli(stage: str, argv: list[str]) -> None:
    """Run a harness stage as its own `python -m csd_fast <stage>` process.

    A process of its own, not a call: the vLLM stages end their process with os._exit after
    writing their results (vLLM's teardown at exit is unreliable), and a stage's engine memory
    is returned to the device when its process ends, before training starts.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "csd_fast", stage, *argv]
    code = subprocess.run(cmd, preexec_fn=_die_with_parent).returncode
    if code:
        raise StageError(f"csd {stage} exited with code {code}: {' '.join(cmd[3:])}")


def translate(inputs: dict, out: Path, settings: dict) -> dict:
    _use_harness(settings, "translate")
    options = {"model": settings["model"], "input": str(inputs["prompts"]), "output": str(out)}
    _run_harness("translate", out, {**settings.get("options", {}), **options}, inputs)
    import pyarrow.parquet as pq

    # translated prompts have no response column: count rows, not responses
    shards = [p for p in out.glob("*.parquet") if not p.name.startswith(".")]
    return {"count": sum(pq.ParquetFile(p).metadata.num_rows for p in shards)}


def sample(inputs: dict, out: Path, settings: dict) -> dict:
    s = settings["sampling"]
    if _use_harness(settings, "sample"):
        options = {"model": str(inputs["policy"]), "prompts": str(inputs["prompts"])}
        options.update(output=str(out), num_samples=settings["num_samples"])
        _run_harness("sample", out, {**s, **options}, inputs)
    else:
        prompts = inputs["prompts"]
        rows = read_responses(prompts) if Path(prompts).is_dir() else read_prompts(prompts)
        generate_responses(
            inputs["policy"], rows, out, num_samples=settings["num_samples"],
            max_new_tokens=s.get("max_tokens", 256), temperature=s.get("temperature", 1.0),
            top_p=s.get("top_p", 1.0), seed=s.get("seed", 0),
            prompts_per_shard=s.get("shard_size", 64),
        )  # fmt: skip
    return {"count": len(read_responses(out))}


def score(inputs: dict, out: Path, settings: dict) -> dict:
    if _use_harness(settings, "score"):
        options = {"model": settings["reward_model"], "samples": str(inputs["samples"])}
        _run_harness("score", out, {**options, "output": str(out)}, inputs)
        return {"count": len(read_responses(out))}
    from csd_fast.pipeline.judges import RewardScorer

    scorer = None
    shards = sorted(p for p in Path(inputs["samples"]).glob("*.parquet") if p.name[0] != ".")
    total = 0
    for j, shard in enumerate(shards):
        dst = out / f"scores-{j:05d}.parquet"
        rows = read_responses(shard)
        total += len(rows)
        if dst.exists():
            continue  # finished by an earlier run (written atomically)
        scorer = scorer or RewardScorer(settings["reward_model"])
        rewards = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
        write_shard(dst, [{**r, "reward": x} for r, x in zip(rows, rewards, strict=True)])
    return {"count": total}


def _completion(prompt: str, response: str):
    """TRL rows: message lists when the prompt was a chat (stored as JSON), else plain text."""
    if prompt.startswith("[{"):
        return json.loads(prompt), [{"role": "assistant", "content": response}]
    return prompt, response


def pairs(inputs: dict, out: Path, settings: dict) -> dict:
    strategy = settings["strategy"]
    path = out / "pairs.jsonl"
    if _use_harness(settings, "pairs"):
        options = {"scores": str(inputs["scores"]), "strategy": strategy, "output": str(path)}
        options.update(inputs.get("ranker") or {})  # ICR's models of this round (loop.py)
        _run_harness("pairs", out, {**settings.get("options", {}), **options}, inputs)
        return {"count": sum(1 for _ in path.open()), "file": str(path)}
    if strategy not in ("paired", "max-r"):
        raise StageError(f"pair strategy {strategy!r} needs csd pairs (issue #9); the "
                         "transformers fallback builds 'paired' and 'max-r'")  # fmt: skip
    by_prompt: dict[str, list[dict]] = {}
    for row in read_responses(inputs["scores"]):
        by_prompt.setdefault(str(row["prompt_id"]), []).append(row)
    out_rows, skipped = [], 0
    for pid, rows in by_prompt.items():
        rows = sorted(rows, key=lambda r: (-r["reward"], r["sample_index"]))
        best, worst = rows[0], rows[-1]
        if (
            len(rows) < 2
            or best["reward"] == worst["reward"]
            or best["response"] == worst["response"]
        ):
            skipped += 1  # all tied: no preference to learn, never paired at random
            continue
        prompt, chosen = _completion(best["prompt"], best["response"])
        meta = {"prompt_id": pid, "lang": best["lang"], "chosen_reward": best["reward"]}
        if strategy == "max-r":
            out_rows.append({"prompt": prompt, "completion": chosen, **meta})
        else:
            _, rejected = _completion(worst["prompt"], worst["response"])
            meta["rejected_reward"] = worst["reward"]
            out_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta})
    if not out_rows:
        raise StageError(f"{inputs['scores']}: no prompt gave a pair ({skipped} all tied)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    tmp.replace(path)
    return {"count": len(out_rows), "skipped": skipped, "file": str(path)}


def train(inputs: dict, out: Path, settings: dict) -> dict:
    import yaml

    from csd_fast import checkpoint as ckpt
    from csd_fast.cli import main as train_main

    recipe = dict(settings["recipe"])
    recipe.update(
        model_name_or_path=str(inputs["init"]),
        dataset_name=str(inputs["pairs"]),
        output_dir=str(out),
    )
    if inputs.get("reference"):
        recipe["ref_model_name_or_path"] = str(inputs["reference"])
    recipe.pop("eval_dataset_name", None)  # the loop evaluates with its own eval stage
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "recipe.yaml"
    resolved.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = ["--config", str(resolved)]
    if ckpt.latest_checkpoint(out) is not None:
        argv.append("--resume")  # killed mid-training: continue from the last checkpoint
    if train_main(argv):
        raise StageError(f"csd train failed for {resolved}")
    if not (out / "final" / "config.json").exists():
        raise StageError(f"csd train wrote no final model in {out / 'final'}")
    return {"count": sum(1 for _ in open(inputs["pairs"])), "model": str(out / "final")}


def evaluate(inputs: dict, out: Path, settings: dict) -> dict:
    from csd_fast.pipeline.eval import EvalSettings, format_table
    from csd_fast.pipeline.eval import evaluate as run_eval

    e = settings["eval"]
    prompts = read_prompts(settings["prompts"])
    systems = {}
    # {"base": {"model", "responses"}, "round-1": ...}: earlier rounds' responses are complete
    # already (their shards are skipped), so each round generates only its own policy's
    harness = _use_harness(settings, "eval")
    for name, system in inputs["policies"].items():
        model, shards = system["model"], Path(system["responses"])
        gen = {"num_samples": e.get("num_samples", 1), "temperature": e.get("temperature", 0.6),
               "top_p": e.get("top_p", 0.9), "seed": e.get("seed", 0)}  # fmt: skip
        if harness:  # the sampling harness skips a finished folder without starting vLLM
            options = {"model": str(model), "prompts": settings["prompts"], "output": str(shards)}
            options.update(gen, max_tokens=e.get("max_tokens", 256))
            _run_harness("sample", shards, options, inputs)
        else:
            generate_responses(
                model, prompts, shards, max_new_tokens=e.get("max_tokens", 256), **gen
            )
        systems[name] = read_responses(shards)
    result = run_eval(
        systems,
        out,
        EvalSettings(reward_model=settings["reward_model"], baseline="base"),
    )
    print(format_table(result))
    return {"count": sum(len(v) for v in systems.values()), "file": str(out / "eval.json")}


STAGE_FUNCTIONS = {
    "translate": translate,
    "sample": sample,
    "score": score,
    "pairs": pairs,
    "train": train,
    "eval": evaluate,
}
