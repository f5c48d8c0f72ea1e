"""`csd loop`: translate -> sample -> score -> pairs -> train -> eval, round after round, resumable.

    csd loop --config recipes/loop-csd-paired.yaml              # run (or continue) every round
    csd loop --config loop.yaml --until round-1/pairs           # stop after that step
    csd loop --config loop.yaml --from round-2/train            # redo from there on
    csd loop status --config loop.yaml                          # rounds x stages table

Layout: <root>/<name>/round-<r>/<stage>/ per step, plus <root>/<name>/loop.json, the manifest:
per step its fingerprint, state (running / done), start and end times, seconds and item count.

Resume and invalidation. A step's fingerprint hashes its own settings (the part of the config it
reads) and its inputs' fingerprints, so a change reaches exactly the steps downstream of it: a
new beta changes train's settings, hence train and eval of that round and every later round, but
not sample / score / pairs of round 1. On each run a step is
  * skipped when the manifest records it done with the same fingerprint and its output exists;
  * continued in place when it was started with the same fingerprint but not finished (a kill -9
    mid-stage): the stage's own resume (shards, checkpoints, cached scores) redoes only what is
    missing;
  * redone from scratch, its folder cleared, when its fingerprint changed; the command prints
    which steps are invalidated and which settings changed.
The manifest is rewritten atomically (tmp + rename) after every state change, so a kill at any
instant leaves a readable one; the run folder's lock (`csd_fast.rundir`) lets one `csd loop`
write it at a time. Round r+1 starts from round r's trained policy; its reference is
the base model (`reference: base`) or round r's policy (`reference: previous`, as ICR).
Test: `python -m pytest tests/pipeline/test_loop.py -q`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from csd_fast.errors import UserError
from csd_fast.pipeline.loopconfig import STAGES, LoopConfig, output_engine_options
from csd_fast.pipeline.stages import STAGE_FUNCTIONS, StageError
from csd_fast.rundir import RunDirLock, write_text_atomically

MANIFEST = "loop.json"


def _file_hash(path: str | None) -> str | None:
    """Content hash of a local file (or folder listing), so an edited prompt set invalidates."""
    if path is None or not Path(path).exists():
        return path  # a hub id: its name is what we know
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return p.name  # a model folder: identified by the step that made it, or its path


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Loop:
    """One loop run: the plan of steps, their inputs and settings, and the manifest."""

    def __init__(self, config: LoopConfig):
        self.config = config
        self.dir = config.run_dir
        self.manifest_path = self.dir / MANIFEST
        self.manifest = self._read_manifest()

    # ------------------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict:
        if self.manifest_path.exists():
            return json.loads(self.manifest_path.read_text())
        return {"name": self.config.name, "steps": {}}

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(
            self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True)
        )

    # ---------------------------------------------------------------------- the plan
    def step_dir(self, r: int, stage: str) -> Path:
        return self.dir / f"round-{r}" / stage

    def models(self) -> tuple[str, str]:
        """(base model, reward model) paths; `demo` builds the built-in tiny ones locally."""
        c = self.config
        base, rm = c.base_model, c.reward_model
        if base == "demo" or rm == "demo":
            from csd_fast.pipeline.demo import build_demo_models

            demo_base, demo_rm = build_demo_models(self.dir / "demo_assets")
            base = demo_base if base == "demo" else base
            rm = demo_rm if rm == "demo" else rm
        return str(base), str(rm)

    def prompt_files(self) -> tuple[str, str]:
        """(prompts, eval prompts); `demo` writes the built-in demo's questions."""
        c = self.config
        prompts, eval_prompts = c.prompts, c.eval_prompts or c.prompts
        if "demo" in (prompts, eval_prompts):
            from csd_fast.pipeline.demo import write_demo_prompts

            train, held = write_demo_prompts(self.dir / "demo_assets")
            prompts = str(train) if prompts == "demo" else prompts
            eval_prompts = str(held) if eval_prompts == "demo" else eval_prompts
        return prompts, eval_prompts

    def plan(self) -> list[dict]:
        """Every step with its inputs, settings and fingerprint, in execution order."""
        import yaml

        c = self.config
        base, rm = self.models()
        recipe = {}
        if c.train_recipe:
            recipe = yaml.safe_load(Path(c.train_recipe).read_text()) or {}
        recipe.update(c.train_overrides)
        if (
            isinstance(recipe.get("ref_cache_dir"), str)
            and not Path(recipe["ref_cache_dir"]).is_absolute()
        ):
            recipe["ref_cache_dir"] = str(self.dir / recipe["ref_cache_dir"])
        steps, fp = [], {}
        prompts, eval_prompts = self.prompt_files()
        prompts_fp = _file_hash(prompts)
        policy, policy_fp = base, _file_hash(base)
        # the base model's eval responses live in round 1's eval folder: redone with it
        base_responses = str(self.step_dir(1, "eval") / "resp-base")
        policies = {"base": {"model": base, "responses": base_responses}}
        base_fp = policy_fp
        ranker = None  # ICR's implicit-reward models for the next round (set by each train)
        for r, stage in c.steps():
            out = self.step_dir(r, stage)
            if stage == "translate":
                inputs = {"prompts": prompts}
                settings = {
                    "model": c.translation_model,
                    "languages": c.languages,
                    "options": {**c.translate_options, "languages": c.languages},
                    "engine": c.engine,
                }
                upstream = [prompts_fp]
            elif stage == "sample":
                if r == 1 and c.translation_model:
                    prompts, prompts_fp = str(self.step_dir(1, "translate")), fp[(1, "translate")]
                inputs = {"prompts": prompts, "policy": policy}
                settings = {
                    "num_samples": c.num_samples,
                    "sampling": c.sampling,
                    "engine": c.engine,
                }
                upstream = [prompts_fp, policy_fp]
            elif stage == "score":
                inputs = {"samples": str(self.step_dir(r, "sample"))}
                settings = {"reward_model": rm, "engine": c.engine}
                upstream = [fp[(r, "sample")], _file_hash(rm)]
            elif stage == "pairs":
                inputs = {"scores": str(self.step_dir(r, "score"))}
                upstream = [fp[(r, "score")]]
                if c.pair_strategy == "icr" and ranker is not None:
                    # ICR iterates: round r ranks with the policy round r-1 trained, against the
                    # reference it trained with (round 1 ranks with pair_options' models); the
                    # models are identified by that training's fingerprint, not their paths
                    inputs["ranker"] = {k: ranker[k] for k in ("policy", "reference")}
                    upstream.append(ranker["fingerprint"])
                settings = {
                    "strategy": c.pair_strategy,
                    "options": c.pair_options,
                    "engine": c.engine,
                }
            elif stage == "train":
                reference = base if (c.reference == "base" and r > 1) else None
                inputs = {
                    "pairs": str(self.step_dir(r, "pairs") / "pairs.jsonl"),
                    "init": policy,
                    "reference": reference,
                }
                settings = {"recipe": recipe, "reference": c.reference}
                ref_fp = base_fp if reference else policy_fp
                upstream = [fp[(r, "pairs")], policy_fp, ref_fp]
            else:  # eval
                policies[f"round-{r}"] = {
                    "model": str(self.step_dir(r, "train") / "final"),
                    "responses": str(out / f"resp-round-{r}"),
                }
                inputs = {"policies": dict(policies)}
                settings = {
                    "prompts": eval_prompts,
                    "eval": c.eval,
                    "reward_model": rm,
                    "engine": c.engine,
                }
                upstream = [fp[(k, "train")] for k in range(1, r + 1)]
                upstream += [base_fp, _file_hash(eval_prompts), _file_hash(rm)]
            if stage in ("translate", "sample", "score", "eval"):
                inputs["engine_options"] = c.engine_options
                # what changes the outputs is fingerprinted; how the stage runs (env, data
                # parallel, the hardware profile) is not, as the harness's own resume does
                settings["engine_args"] = output_engine_options(c.engine_options)
            fp[(r, stage)] = _digest([stage, settings, upstream])
            steps.append(
                {
                    "round": r,
                    "stage": stage,
                    "key": f"round-{r}/{stage}",
                    "out": out,
                    "inputs": inputs,
                    "settings": settings,
                    "fingerprint": fp[(r, stage)],
                }
            )
            if stage == "train":  # the next round starts from this round's policy
                ranker = {
                    "policy": str(out / "final"),
                    "reference": inputs["reference"] or inputs["init"],
                    "fingerprint": fp[(r, stage)],
                }
                policy, policy_fp = str(out / "final"), fp[(r, stage)]
        return steps

    # ------------------------------------------------------------------------ running
    def run(self, until: str | None = None, start: str | None = None) -> int:
        """Run (or continue) the steps; one `csd loop` per run folder at a time (its lock)."""
        with RunDirLock(self.dir, command="csd loop") as lock:
            self.manifest = self._read_manifest()  # as the last holder left it
            if lock.stale is not None:  # the last loop here died (kill -9): continued below
                print(f"[csd loop] the previous run here ended without finishing "
                      f"({lock.stale.describe()}); continuing it")  # fmt: skip
            return self._run(until, start)

    def _run(self, until: str | None, start: str | None) -> int:
        steps = self.plan()
        keys = [s["key"] for s in steps]
        until_key, start_key = (self._resolve(k, keys) for k in (until, start))
        records = self.manifest["steps"]
        changed = [
            s
            for s in steps
            if s["key"] in records and records[s["key"]]["fingerprint"] != s["fingerprint"]
        ]
        if changed:
            print("[csd loop] the config changed; invalidated (will be redone):")
            for s in changed:
                why = _diff(records[s["key"]].get("settings", {}), _jsonable(s["settings"]))
                print(f"  {s['key']}: {why or 'an upstream step changed'}")
        forced = set(keys[keys.index(start_key) :]) if start_key else set()
        if start_key:
            missing = [k for k in keys[: keys.index(start_key)] if not self._done(records, k)]
            if missing:
                print(
                    f"csd loop: --from {start_key} needs {missing[0]} done first", file=sys.stderr
                )
                return 2
        for s in steps:
            rec = records.get(s["key"])
            if s["key"] not in forced and rec and rec["fingerprint"] == s["fingerprint"]:
                if rec["state"] == "done" and s["out"].exists():
                    print(f"[csd loop] {s['key']}: done ({rec.get('count', '?')} items), skipped")
                    if s["key"] == until_key:
                        break
                    continue
                print(f"[csd loop] {s['key']}: resuming an unfinished run")
            elif s["out"].exists():
                shutil.rmtree(s["out"])  # another fingerprint, or forced: start clean
            self._run_step(s)
            if s["key"] == until_key:
                print(f"[csd loop] stopped after {until_key} (--until)")
                break
        return 0

    @staticmethod
    def _done(records, key) -> bool:
        return key in records and records[key]["state"] == "done"

    @staticmethod
    def _resolve(name: str | None, keys: list[str]) -> str | None:
        if name is None:
            return None
        if name in keys:
            return name
        hits = [k for k in keys if k.endswith(f"/{name}")]
        if not hits:
            raise SystemExit(f"csd loop: no step {name!r}; steps: {', '.join(keys)}")
        return hits[0]  # a bare stage name: its first round

    def _run_step(self, s: dict) -> None:
        key = s["key"]
        rec = {
            "fingerprint": s["fingerprint"],
            "state": "running",
            "settings": _jsonable(s["settings"]),
            "started": time.time(),
            "round": s["round"],
            "stage": s["stage"],
        }
        self.manifest["steps"][key] = rec
        self._save()
        print(f"[csd loop] {key}: running -> {s['out']}")
        t0 = time.perf_counter()
        summary = STAGE_FUNCTIONS[s["stage"]](s["inputs"], s["out"], s["settings"])
        rec.update(
            state="done",
            finished=time.time(),
            seconds=time.perf_counter() - t0,
            **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
        )
        self._save()
        print(f"[csd loop] {key}: done in {rec['seconds']:.1f} s ({rec.get('count', '?')} items)")

    # ------------------------------------------------------------------------- status
    def status(self) -> str:
        records = self.manifest["steps"]
        lines = [f"{'round':<8} {'stage':<10} {'state':<12} {'items':>8} {'seconds':>9}"]
        plan = {s["key"]: s["fingerprint"] for s in self.plan()}
        for key, fingerprint in plan.items():
            r, stage = key.split("/")
            rec = records.get(key)
            state = "pending" if rec is None else rec["state"]
            if rec is not None and rec["fingerprint"] != fingerprint:
                state = "stale"  # the config changed since it ran
            count = "" if rec is None else str(rec.get("count", ""))
            secs = "" if rec is None or "seconds" not in rec else f"{rec['seconds']:.1f}"
            lines.append(f"{r:<8} {stage:<10} {state:<12} {count:>8} {secs:>9}")
        return "\n".join(lines)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    """Which settings differ, e.g. "recipe.beta 0.1 -> 0.2"."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{k}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return "; ".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csd loop", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=("run", "status"))
    p.add_argument("--config", required=True, help="loop YAML (csd_fast.pipeline.loopconfig)")
    p.add_argument("--until", help="stop after this step: round-R/STAGE, or STAGE (round 1)")
    p.add_argument("--from", dest="start", help="redo from this step on (earlier ones done)")
    p.add_argument("--root", help="where runs go (default: the config's root, `runs`)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        overrides = {"root": a.root} if a.root else {}
        loop = Loop(LoopConfig.from_yaml(a.config, **overrides))
        if a.command == "status":
            print(loop.status())
            return 0
        return loop.run(until=a.until, start=a.start)
    except (ValueError, FileNotFoundError, StageError, UserError) as e:
        print(f"csd loop: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["STAGES", "Loop", "LoopConfig", "main"]
