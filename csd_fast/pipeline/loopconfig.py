"""`LoopConfig`: what `csd loop --config loop.yaml` reads (not a DPOConfig: training is one stage).

    name: csd-paired-eurollm           # outputs in <root>/<name>/round-<r>/<stage>/
    base_model: utter-project/EuroLLM-9B-Instruct
    reward_model: Skywork/Skywork-Reward-V2-Llama-3.1-8B
    prompts: prompts.jsonl             # prompt_id, prompt, lang (already translated, or English)
    translation_model: null            # set it to translate `prompts` into `languages` first
    languages: [da, de]
    translate_options: {template: translategemma, max_tokens: 1024}   # more csd translate flags
    num_samples: 64                    # K responses per prompt per round
    sampling: {temperature: 1.0, top_p: 1.0, max_tokens: 1024, seed: 0}
    engine: auto                       # auto | vllm (csd sample/score/translate) | hf (fallbacks)
    engine_options: {profile: cuda}    # csd sample/score/translate engine flags: profile, env,
                                       # engine_arg, max_model_len, data_parallel
    pair_strategy: paired              # paired | sweet-spot | max-r | clo | icr | cm-align
    train_recipe: recipes/csd-paired-eurollm-9b-h100.yaml
    train_overrides: {beta: 0.1}
    rounds: 2
    reference: base                    # round r+1's reference: base | previous (round r's policy)
    eval_prompts: eval_prompts.jsonl
    eval: {num_samples: 1, max_tokens: 512, temperature: 0.6, top_p: 0.9}

Relative paths are relative to the YAML file. `base_model: demo` (and `reward_model: demo`) build
the built-in tiny model (and a tiny random reward model) locally, for the CPU walk-through.
Every round starts from the previous round's policy (round 1 from base_model); `reference`
decides what DPO compares against. Test: `python -m pytest tests/pipeline/test_loop.py -q`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("translate", "sample", "score", "pairs", "train", "eval")
PAIR_STRATEGIES = ("paired", "sweet-spot", "max-r", "clo", "icr", "cm-align")
REFERENCES = ("base", "previous")
ENGINES = ("auto", "hf", "vllm")
# the vLLM engine flags `csd sample | score | translate` share (sampling.sample.ENGINE_OPTIONS)
ENGINE_OPTION_NAMES = ("profile", "engine_arg", "env", "max_model_len", "data_parallel")
# of those, what changes what a stage writes (the engine's own arguments: dtype, quantization,
# kv-cache dtype ...; the context length): part of a step's fingerprint. `profile` (which also
# picks a dtype), `env` and `data_parallel` say how it runs on this machine and are not, as in
# the harness's own resume rules
OUTPUT_ENGINE_OPTIONS = ("engine_arg", "max_model_len")


def output_engine_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in OUTPUT_ENGINE_OPTIONS if options.get(k) not in (None, {})}


@dataclass
class LoopConfig:
    name: str
    base_model: str
    reward_model: str
    prompts: str
    train_recipe: str | None = None  # a `csd train --config` YAML (None: the DPO defaults)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    translation_model: str | None = None
    languages: list[str] = field(default_factory=list)
    translate_options: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 8
    sampling: dict[str, Any] = field(default_factory=dict)
    engine: str = (
        "auto"  # auto: csd sample/score/pairs (issue #9) when installed, else transformers
    )
    engine_options: dict[str, Any] = field(default_factory=dict)
    pair_strategy: str = "paired"
    pair_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 1
    reference: str = "base"
    eval_prompts: str | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    root: str = "runs"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        for name, value, allowed in (
            ("pair_strategy", self.pair_strategy, PAIR_STRATEGIES),
            ("reference", self.reference, REFERENCES),
            ("engine", self.engine, ENGINES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        unknown = sorted(set(self.engine_options) - set(ENGINE_OPTION_NAMES))
        if unknown:
            raise ValueError(
                f"engine_options: unknown option(s) {unknown}; known: {list(ENGINE_OPTION_NAMES)}"
            )
        if self.translation_model and not self.languages:
            raise ValueError("translation_model needs `languages` (the target languages)")

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LoopConfig:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a loop config is a mapping of option: value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        data.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("name", "base_model", "reward_model", "prompts") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing required option(s) {missing}")
        for key in ("prompts", "eval_prompts", "train_recipe", "base_model", "reward_model",
                    "translation_model", "root"):  # fmt: skip
            value = data.get(key)
            if isinstance(value, str) and value != "demo":
                local = path.parent / value
                # a relative path that exists next to the YAML; hub ids stay as written
                if not Path(value).is_absolute() and (local.exists() or key == "root"):
                    data[key] = str(local)
        return cls(**data)

    def steps(self) -> list[tuple[int, str]]:
        """(round, stage) in execution order; translate runs once, in round 1."""
        out = []
        for r in range(1, self.rounds + 1):
            for stage in STAGES:
                if stage == "translate" and (r > 1 or not self.translation_model):
                    continue
                out.append((r, stage))
        return out
