"""`csd-train`: DPO / CLO training from the command line.

    csd-train --fused                                  # built-in demo: tiny model, bilingual pairs
    csd-train --model_name_or_path M --dataset_name data.jsonl --output_dir out --loss_type sigmoid
    csd-train --config recipe.yaml --learning_rate 5e-7  # flags override the file
    csd-train --output_dir out --resume                # continue from the latest checkpoint
    csd-train --nproc 8 ...                            # FSDP2 over 8 local devices (torchrun)
    csd-train --plan --nproc 8 ...                     # per-device memory estimate, then exit

Every `DPOConfig` field is a flag named as the field (`--max_steps`, also `--max-steps`), as in
`trl dpo`. The resolved configuration is printed and saved to `<output_dir>/config.yaml`. With no
model and no data the built-in demo runs with its recipe (`csd_fast.demo.DEMO_RECIPE`), any flag
overriding it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

import yaml

# Options of the script itself (not training hyperparameters), like TRL's ScriptArguments.
SCRIPT_OPTIONS = {
    "model_name_or_path": (str, None, "policy model: a local directory or hub id"),
    "ref_model_name_or_path": (
        str,
        None,
        "separate reference model (default: frozen initial policy)",
    ),
    "dataset_name": (str, None, "training pairs: JSONL, Parquet, or a save_to_disk directory"),
    "eval_dataset_name": (str, None, "held-out pairs (same formats)"),
    "dataset_train_split": (str, "train", "split to train on when the source has splits"),
    "dataset_test_split": (str, "test", "split to evaluate on when the source has splits"),
    "resume": (
        str,
        None,
        "resume: a checkpoint directory, or no value for the latest in output_dir",
    ),
    "prepare_only": (
        bool,
        False,
        "tokenize and precompute the reference store, then exit (a sweep's prepare job)",
    ),
}

ALIASES = {
    "ref_model_name_or_path": ["--ref_model", "--ref-model"],
    "model_name_or_path": ["--model"],
}


def _base_type(tp):
    """(scalar type, is_list) of a dataclass field annotation such as `list[str] | None`."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing, "Any": typing.Any})  # annotations are strings (PEP 563)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists:
            inner = typing.get_args(lists[0])
            return (inner[0] if inner else str), True
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        inner = typing.get_args(tp)
        return (inner[0] if inner else str), True
    if origin is dict:
        return dict, False
    return tp, False


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _converter(tp):
    if tp is bool:
        return _parse_bool
    if tp is dict:
        return json.loads
    if tp in (int, float, str):
        return tp
    return lambda v: _auto(v)


def _auto(v: str):
    """Values of fields typed loosely (`int | str`): numbers stay numbers."""
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return None if v.lower() in ("none", "null") else v


def build_parser() -> argparse.ArgumentParser:
    from csd_fast.config import DPOConfig

    parser = argparse.ArgumentParser(
        prog="csd-train",
        description="DPO / CLO preference training (TRL-compatible options).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe; flags given on the command line override it")
    parser.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="run a grid instead of one run (as `csd sweep --grid`; see csd sweep --help)",
    )
    script = parser.add_argument_group("script")
    for name, (tp, default, help_) in SCRIPT_OPTIONS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += ALIASES.get(name, [])
        if name == "resume":
            script.add_argument(*flags, dest=name, nargs="?", const=True, default=None, help=help_)
        elif tp is bool:
            script.add_argument(*flags, dest=name, action="store_true", help=help_)
        else:
            script.add_argument(*flags, dest=name, type=tp, default=default, help=help_)
    train = parser.add_argument_group("training (DPOConfig)")
    for f in dataclasses.fields(DPOConfig):
        if not f.init or f.name.startswith("_"):
            continue
        tp, is_list = _base_type(f.type)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if tp is bool and not is_list:
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        elif is_list:
            kwargs.update(nargs="+", type=_converter(tp))
        else:
            kwargs.update(type=_converter(tp))
        train.add_argument(*flags, **kwargs)
    return parser


def resolve(argv: list[str] | None = None) -> tuple[dict, dict]:
    """(script options, DPOConfig kwargs): recipe file < demo recipe < command-line flags."""
    from csd_fast.config import DPOConfig

    ns = vars(build_parser().parse_args(argv))
    ns.pop("sweep")
    config_path = ns.pop("config")
    script = {k: ns.pop(k) for k in SCRIPT_OPTIONS}
    recipe = {}
    if config_path:
        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(recipe, dict):
            raise SystemExit(f"{config_path}: a recipe must be a mapping of option: value")
        for k in list(recipe):
            name = k.replace("-", "_")
            if name in SCRIPT_OPTIONS:
                value = recipe.pop(k)  # a flag given on the command line wins over the file
                if script.get(name) is None:
                    script[name] = value
        known = {f.name for f in dataclasses.fields(DPOConfig)}
        unknown = [k for k in recipe if k.replace("-", "_") not in known]
        if unknown:
            raise SystemExit(f"{config_path}: unknown option(s) {unknown}")
        recipe = {k.replace("-", "_"): v for k, v in recipe.items()}
    demo = script["model_name_or_path"] is None and script["dataset_name"] is None
    merged = {}
    if demo:
        from csd_fast.demo import DEMO_RECIPE

        merged.update(DEMO_RECIPE)
        merged.setdefault("output_dir", "runs/demo")
    merged.update(recipe)
    merged.update(ns)  # only flags actually given (argparse.SUPPRESS drops the rest)
    script["demo"] = demo
    if "output_dir" not in merged:
        raise SystemExit("csd-train: --output_dir is required (except for the built-in demo)")
    return script, merged


def main(argv: list[str] | None = None) -> int:
    from csd_fast.distributed.launch import launch_if_asked, pop_option

    argv = list(sys.argv[1:] if argv is None else argv)
    plan = "--plan" in argv
    device_gb, argv = pop_option([a for a in argv if a != "--plan"], ("--device_memory_gb",))
    if plan:
        nproc, argv = pop_option(argv, ("--nproc", "--nproc_per_node", "--nproc-per-node"))
        return print_memory_plan(argv, int(nproc or os.environ.get("WORLD_SIZE", 1)), device_gb)
    code, argv = launch_if_asked(argv)  # --nproc N: the same command under torchrun
    if code is not None:
        return code
    from csd_fast import DPOConfig, DPOTrainer

    if any(a == "--sweep" or a.startswith("--sweep=") for a in argv):
        from csd_fast.pipeline.sweep import main as sweep_main  # only when asked: no engine dep

        return sweep_main(_sweep_argv(argv))
    script, kwargs = resolve(argv)
    output_dir = Path(kwargs["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    if script["demo"]:
        from csd_fast.demo import build_demo

        assets = build_demo(output_dir / "demo_assets")
        script["model_name_or_path"] = str(assets.model_dir)
        train_file, eval_file = assets.train_file, assets.eval_file
        if "clo" in kwargs.get("loss_type", []):  # the demo's items as CLO groups
            from csd_fast.demo.preference import write_clo_files

            train_file, eval_file = write_clo_files(train_file, eval_file, assets.model_dir.parent)
        script["dataset_name"] = str(train_file)
        script["eval_dataset_name"] = str(eval_file)
        print(f"[csd-train] built-in demo: tiny model and bilingual pairs in {assets.model_dir}")
    if script["model_name_or_path"] is None or script["dataset_name"] is None:
        raise SystemExit("csd-train: give both --model_name_or_path and --dataset_name")
    if script["eval_dataset_name"] and "eval_strategy" not in kwargs:
        kwargs["eval_strategy"] = "steps"  # an eval set given without a strategy: evaluate
    # the command line stops on a fully truncated row unless told to drop it (TRL's API drops)
    kwargs.setdefault("on_fully_truncated", "error")
    args = DPOConfig(**kwargs)
    resolved = {
        "script": {k: v for k, v in script.items() if k != "demo"},
        "training": args.to_dict(),
    }
    text = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks and writes
    if main_rank:
        print(text)
        (output_dir / "config.yaml").write_text(text)
    ref = script["ref_model_name_or_path"]
    from csd_fast.data import load_rows

    # the split options pick a split of a save_to_disk DatasetDict; files have one split
    train = load_rows(script["dataset_name"], split=script["dataset_train_split"])
    evalset = script["eval_dataset_name"]
    if evalset:
        evalset = load_rows(evalset, split=script["dataset_test_split"])
    trainer = DPOTrainer(
        model=script["model_name_or_path"],
        ref_model=ref,
        args=args,
        train_dataset=train,
        eval_dataset=evalset,
    )
    if script["prepare_only"]:  # the data, plans and reference store are now on disk
        print(f"[csd-train] prepared: {len(trainer.train_pairs)} training pairs")
        return 0
    before = _demo_preference(trainer) if script["demo"] else None
    if before:
        print("[csd-train] " + format_preference(before))
    trainer.train(resume_from_checkpoint=script["resume"])
    if before:
        print("[csd-train] " + format_preference(before, _demo_preference(trainer)))
    trainer.save_model(str(output_dir / "final"))
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    summary = evals[-1] if evals else {}
    if trainer.eval_pairs is not None and summary.get("step") != trainer.state.global_step:
        summary = trainer.evaluate()  # the final weights were not evaluated yet
    if not main_rank:
        return 0
    png = trainer.plot()
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    shown = ", ".join(f"{k}={summary[k]:.4f}" for k in keys if k in summary)
    print(f"[csd-train] done: {trainer.state.global_step} steps; {shown}")
    print(f"[csd-train] metrics: {output_dir / 'metrics.jsonl'}; model: {output_dir / 'final'}")
    if png:
        print(f"[csd-train] curves: {png}")
    return 0


def print_memory_plan(argv: list[str], world_size: int, device_gb: str | None) -> int:
    """`--plan`: the per-device memory estimate of this command's run; exit 1 if it cannot fit."""
    from transformers import AutoConfig

    from csd_fast.config import DPOConfig
    from csd_fast.distributed.memory import device_memory_bytes, plan_memory

    script, kwargs = resolve(argv)
    if script["demo"]:
        from csd_fast.demo import build_demo

        script["model_name_or_path"] = str(
            build_demo(Path(kwargs["output_dir"]) / "demo_assets").model_dir
        )
    args = DPOConfig(**kwargs)
    config = AutoConfig.from_pretrained(
        script["model_name_or_path"], trust_remote_code=args.trust_remote_code
    )
    tokens = args.max_tokens_per_batch or 2 * args.per_device_train_batch_size * (
        args.max_length or config.max_position_embeddings
    )
    offload = bool((args.fsdp_config or {}).get("cpu_offload"))
    plan = plan_memory(
        config,
        world_size=world_size,
        tokens_per_micro_batch=tokens,
        compute_bytes=2 if args.bf16 else 4,
        trainable_patterns=args.trainable_params,
        live_reference=not (args.precompute_ref_log_probs or args.ref_cache_dir),
        gradient_checkpointing=args.gradient_checkpointing,
        fused_head=args.fused,
    )
    device = float(device_gb) * 1024**3 if device_gb else device_memory_bytes()
    print(plan.render(device))
    problems = plan.warnings(device, offload)
    for line in problems:
        print(line)
    return 1 if problems else 0


def _demo_preference(trainer) -> dict[str, float] | None:
    """The demo's per-language preference for the prompt's language (held-out pairs)."""
    from csd_fast.demo.preference import language_preference

    pairs = trainer.eval_pairs
    if pairs is None or pairs.lang is None:
        return None
    return language_preference(trainer.model, pairs, trainer.processing_class.pad_token_id)


def format_preference(before, after=None) -> str:
    from csd_fast.demo.preference import format_preference as fmt

    return fmt(before, after)


def _sweep_argv(argv: list[str]) -> list[str]:
    """`csd train ... --sweep k=v1,v2` -> `csd sweep ... --grid k=v1,v2`."""
    out, it = [], iter(argv)
    for a in it:
        if a == "--sweep":
            out += ["--grid", next(it, "")]
        elif a.startswith("--sweep="):
            out += ["--grid", a.split("=", 1)[1]]
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
