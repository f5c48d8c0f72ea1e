"""`csd-train`: DPO / CLO training from the command line.

    csd-train --fused                                  # built-in demo: tiny model, bilingual pairs
    csd-train --model_name_or_path M --dataset_name data.jsonl --output_dir out --loss_type sigmoid
    csd-train --config recipe.yaml --learning_rate 5e-7  # flags override the file
    csd-train --output_dir out --resume                # continue from the latest checkpoint
    csd-train --nproc 8 ...                            # FSDP2 over 8 local devices (torchrun)
    csd-train --plan --nproc 8 ...                     # per-device memory estimate, then exit
    csd-train ... --peft_config '{"r": 16, "target_modules": "all-linear"}'   # a LoRA adapter
    csd-train ... --peft_config '{...}' --model_init_kwargs '{"quantization_config":
              {"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}}'     # QLoRA (also --nproc)

Every `DPOConfig` field is a flag named as the field (`--max_steps`, also `--max-steps`), as in
`trl dpo`. The options that differ from the defaults are printed; the whole resolved
configuration is saved to `<output_dir>/config.yaml` (atomically, once every check has passed).
With no model and no data the built-in demo runs with its recipe (`csd_fast.demo.DEMO_RECIPE`),
any flag overriding it.

Safety (README "Safety"): one run per output_dir (a lock naming the holder); a directory holding
an earlier run needs `--resume` or `--overwrite_output_dir`; `--resume` verifies the checkpoint
and refuses run-changing option changes unless `--resume_with_changes`. A user error (bad option,
missing or corrupt file, locked directory) is one line on stderr and exit code 2, before any
model loads; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml

from csd_fast.errors import ConfigError, UserError, run_cli
from csd_fast.validation import base_type as _base_type
from csd_fast.validation import declared_type

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
        "resume: a checkpoint directory, or no value for the newest complete one in output_dir",
    ),
    "prepare_only": (
        bool,
        False,
        "tokenize and precompute the reference store, then exit (a sweep's prepare job)",
    ),
    "peft_config": (
        dict,
        None,
        "train a LoRA adapter: peft.LoraConfig's arguments as a JSON object (a mapping in "
        """--config), e.g. '{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}'; """
        "with a quantization_config in --model_init_kwargs this is QLoRA",
    ),
}

ALIASES = {
    "ref_model_name_or_path": ["--ref_model", "--ref-model"],
    "model_name_or_path": ["--model"],
}


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


def _json_object(v: str) -> dict:
    try:
        value = json.loads(v)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {v!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {v!r}")
    return value


def lora_config(options):
    """`--peft_config` (a mapping of peft.LoraConfig's arguments) -> a LoraConfig, checked."""
    if not isinstance(options, dict):
        raise ConfigError("peft_config", f"expected a mapping of LoraConfig arguments: {options!r}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("--peft_config needs peft: pip install 'csd-fast[peft]'") from None
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **options})
    except (TypeError, ValueError) as e:
        raise ConfigError("peft_config", f"not valid LoraConfig arguments: {e}") from None


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
        epilog="A user error (bad option, missing or corrupt file, used or locked output_dir) is "
        "one line on stderr and exit code 2; --debug shows its traceback instead.",
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
            kind = _json_object if tp is dict else tp
            script.add_argument(*flags, dest=name, type=kind, default=default, help=help_)
    train = parser.add_argument_group("training (DPOConfig)")
    for f in dataclasses.fields(DPOConfig):
        if not f.init or f.name.startswith("_"):
            continue
        tp, is_list = _base_type(declared_type(DPOConfig, f))
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
    from csd_fast.validation import coerce_fields

    ns = vars(build_parser().parse_args(argv))
    ns.pop("sweep")
    config_path = ns.pop("config")
    script = {k: ns.pop(k) for k in SCRIPT_OPTIONS}
    recipe = {}
    if config_path:
        if not Path(config_path).is_file():
            raise ConfigError("config", f"{config_path}: no such file")
        try:
            recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(recipe, dict):
            raise UserError(f"{config_path}: a recipe must be a mapping of option: value")
        for k in list(recipe):
            name = k.replace("-", "_")
            if name in SCRIPT_OPTIONS:
                value = recipe.pop(k)  # a flag given on the command line wins over the file
                if script.get(name) is None:
                    script[name] = value
        known = {f.name for f in dataclasses.fields(DPOConfig)}
        unknown = [k for k in recipe if k.replace("-", "_") not in known]
        if unknown:
            import difflib

            hints = [m[0] for k in unknown if (m := difflib.get_close_matches(k, known, n=1))]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise UserError(f"{config_path}: unknown option(s) {unknown}{hint}")
        recipe = {k.replace("-", "_"): v for k, v in recipe.items()}
        recipe = coerce_fields(DPOConfig, recipe, source=config_path)
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
        raise ConfigError("output_dir", "is required (except for the built-in demo)")
    return script, merged


def main(argv: list[str] | None = None) -> int:
    """`csd train`: user errors are one line on stderr and exit code 2 (`--debug`: traceback)."""
    return run_cli("csd-train", _train, argv)


def _checked_config(script: dict, kwargs: dict):
    """The DPOConfig, every path and option checked; nothing is written or loaded yet."""
    from csd_fast import DPOConfig
    from csd_fast.validation import check_data_source, check_model_source, check_training_args

    if not script["demo"]:
        if script["model_name_or_path"] is None or script["dataset_name"] is None:
            raise UserError("csd-train: give both --model_name_or_path and --dataset_name")
        check_model_source(script["model_name_or_path"], "model_name_or_path")
        if script["ref_model_name_or_path"]:
            check_model_source(script["ref_model_name_or_path"], "ref_model_name_or_path")
        check_data_source(script["dataset_name"], "dataset_name")
        if script["eval_dataset_name"]:
            check_data_source(script["eval_dataset_name"], "eval_dataset_name")
    has_eval = bool(script["eval_dataset_name"]) or script["demo"]
    if has_eval and "eval_strategy" not in kwargs:
        kwargs["eval_strategy"] = "steps"  # an eval set given without a strategy: evaluate
    # the command line stops on a fully truncated row unless told to drop it (TRL's API drops)
    kwargs.setdefault("on_fully_truncated", "error")
    try:
        args = DPOConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid option: {e}") from None
    check_training_args(args, has_train=True, has_eval=has_eval)
    if script["peft_config"] is not None:
        lora_config(script["peft_config"])  # a bad key is a user error before any model loads
    init = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    if init.get("quantization_config") and script["peft_config"] is None:
        raise ConfigError(
            "model_init_kwargs",
            "quantization_config (QLoRA) trains through a LoRA adapter: add --peft_config, e.g. "
            """'{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}'""",
        )
    if script["resume"] and args.overwrite_output_dir:
        raise UserError("--resume and --overwrite_output_dir contradict each other: pick one")
    return args


def _changed_options(args) -> str:
    from csd_fast import DPOConfig

    defaults = DPOConfig(output_dir=args.output_dir).to_dict()
    changed = {k: v for k, v in args.to_dict().items() if v != defaults.get(k)}
    return ", ".join(f"{k}={v}" for k, v in changed.items())


def _train(argv: list[str] | None) -> int:
    from csd_fast import DPOTrainer
    from csd_fast.distributed.launch import launch_if_asked, pop_option
    from csd_fast.resume import check_resume, read_record, select_checkpoint
    from csd_fast.rundir import claim_output_dir, write_text_atomically

    argv = list(sys.argv[1:] if argv is None else argv)
    plan = "--plan" in argv
    device_gb, argv = pop_option([a for a in argv if a != "--plan"], ("--device_memory_gb",))
    if plan:
        nproc, argv = pop_option(argv, ("--nproc", "--nproc_per_node", "--nproc-per-node"))
        return print_memory_plan(argv, int(nproc or os.environ.get("WORLD_SIZE", 1)), device_gb)
    code, argv = launch_if_asked(argv, _restarts)  # --nproc N: the command under torchrun
    if code is not None:
        return code
    if any(a == "--sweep" or a.startswith("--sweep=") for a in argv):
        from csd_fast.pipeline.sweep import main as sweep_main  # only when asked: no engine dep

        return sweep_main(_sweep_argv(argv))
    script, kwargs = resolve(argv)
    args = _checked_config(script, kwargs)
    output_dir = Path(args.output_dir)
    with claim_output_dir(
        output_dir,
        resume=bool(script["resume"]),
        overwrite=args.overwrite_output_dir or _restarted_smaller(args),
        command="csd train",
    ):
        checkpoint = select_checkpoint(script["resume"], output_dir)
        if checkpoint is not None:  # the option comparison needs no model: refuse early
            new = {
                "training": args.to_dict(),
                "run": {
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "model": script["model_name_or_path"],
                    "ref_model": script["ref_model_name_or_path"],
                },
            }
            check_resume(
                read_record(checkpoint),
                new,
                allow_changes=args.resume_with_changes,
                where=str(checkpoint),
            )
        if script["demo"]:
            from csd_fast.demo import build_demo

            assets = build_demo(output_dir / "demo_assets")
            script["model_name_or_path"] = str(assets.model_dir)
            train_file, eval_file = assets.train_file, assets.eval_file
            if "clo" in (args.loss_type or []):  # the demo's items as CLO groups
                from csd_fast.demo.preference import write_clo_files

                train_file, eval_file = write_clo_files(
                    train_file, eval_file, assets.model_dir.parent
                )
            script["dataset_name"] = str(train_file)
            script["eval_dataset_name"] = str(eval_file)
            print(
                f"[csd-train] built-in demo: tiny model and bilingual pairs in {assets.model_dir}"
            )
        resolved = {
            "script": {k: v for k, v in script.items() if k != "demo"},
            "training": args.to_dict(),
        }
        text = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None)
        if _main_rank():  # under torchrun, rank 0 speaks and writes
            write_text_atomically(output_dir / "config.yaml", text)
            print(
                f"[csd-train] options: {_changed_options(args)} (all: {output_dir / 'config.yaml'})"
            )
        return _run(DPOTrainer, script, args, checkpoint, output_dir)


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run(DPOTrainer, script: dict, args, checkpoint, output_dir: Path) -> int:
    from csd_fast.data import load_rows

    # the split options pick a split of a save_to_disk DatasetDict; files have one split
    train = load_rows(script["dataset_name"], split=script["dataset_train_split"])
    evalset = script["eval_dataset_name"]
    if evalset:
        evalset = load_rows(evalset, split=script["dataset_test_split"])
    trainer = DPOTrainer(
        model=script["model_name_or_path"],
        ref_model=script["ref_model_name_or_path"],
        args=args,
        train_dataset=train,
        eval_dataset=evalset,
        peft_config=lora_config(script["peft_config"]) if script["peft_config"] else None,
    )
    for name, pairs in (("train", trainer.train_pairs), ("eval", trainer.eval_pairs)):
        if pairs is not None and pairs.num_skipped:
            print(
                f"[csd-train] {name}: skipped {pairs.num_skipped} bad rows {dict(pairs.skipped)}"
                f"{' (from the tokenization cache)' if pairs.from_cache else ''}; see "
                f"{output_dir / f'rejected_rows_{name}.jsonl'}"
            )
    if script["prepare_only"]:  # the data, plans and reference store are now on disk
        print(f"[csd-train] prepared: {len(trainer.train_pairs)} training pairs")
        return 0
    before = _demo_preference(trainer) if script["demo"] else None
    if before:
        print("[csd-train] " + format_preference(before))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if before:
        print("[csd-train] " + format_preference(before, _demo_preference(trainer)))
    trainer.save_model(str(output_dir / "final"))
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    summary = evals[-1] if evals else {}
    if trainer.eval_pairs is not None and summary.get("step") != trainer.state.global_step:
        summary = trainer.evaluate()  # the final weights were not evaluated yet
    if not _main_rank():
        return 0
    png = trainer.plot()
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    shown = ", ".join(f"{k}={summary[k]:.4f}" for k in keys if k in summary)
    print(f"[csd-train] done: {trainer.state.global_step} steps; {shown}")
    print(f"[csd-train] metrics: {output_dir / 'metrics.jsonl'}; model: {output_dir / 'final'}")
    if png:
        print(f"[csd-train] curves: {png}")
    return 0


def _restarted_smaller(args) -> bool:
    """Whether this torchrun round restarts a run that ran out of memory (auto_find_batch_size):
    it then replaces the failed attempt's logs, as the trainer does (distributed/batch_size)."""
    if not args.auto_find_batch_size or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from csd_fast.distributed.batch_size import fresh_record
    from csd_fast.distributed.env import init_distributed

    env = init_distributed(use_cpu=args.use_cpu)  # the round every rank agrees on
    return fresh_record(args.output_dir, env, args.per_device_train_batch_size) is not None


def _restarts(argv: list[str]) -> int:
    """torchrun restarts for `csd train --nproc N`: auto_find_batch_size retries by restarting."""
    from csd_fast.distributed.launch import AUTO_BATCH_RESTARTS

    return AUTO_BATCH_RESTARTS if resolve(argv)[1].get("auto_find_batch_size") else 0


def print_memory_plan(argv: list[str], world_size: int, device_gb: str | None) -> int:
    """`--plan`: the per-device memory estimate of this command's run; exit 1 if it cannot fit."""
    from transformers import AutoConfig

    from csd_fast.config import DPOConfig
    from csd_fast.distributed.hf_options import mesh_shape
    from csd_fast.distributed.memory import device_memory_bytes, optimizer_state_bytes, plan_memory

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
    pairs = args.per_device_train_batch_size
    tp = int((args.fsdp_config or {}).get("tp_size") or 1)  # tensor ranks share their batch
    if (args.accelerator_config or {}).get("split_batches"):  # the global batch, split
        pairs = max(1, pairs // max(1, world_size // tp))
    tokens = args.max_tokens_per_batch or 2 * pairs * (
        args.max_length or config.max_position_embeddings
    )
    offload = bool((args.fsdp_config or {}).get("cpu_offload"))
    # the state is sharded over a shard group: all ranks, or a node's with hybrid_shard / HSDP
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    shard_ranks = mesh_shape(args.fsdp_config, world_size, min(local_world, world_size))[1]
    init = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    quant = init.get("quantization_config") or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    bits = 4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None
    peft = script["peft_config"]
    plan = plan_memory(
        config,
        # under TP the weights, gradients and optimizer state split over dp x tp; activations
        # are counted whole (an upper bound: TP splits the layers' inner activations too)
        world_size=shard_ranks * tp,
        lora_rank=int(peft.get("r", 8)) if isinstance(peft, dict) else None,  # peft's default r
        quantized_bits=bits,
        double_quant=bool(quant.get("bnb_4bit_use_double_quant")),
        # FSDP2 gathers packed 4-bit bytes uncast only in the compute dtype's storage
        quantized_sharded=str(quant.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
        == ("bfloat16" if args.bf16 else "float32"),
        tokens_per_micro_batch=tokens,
        compute_bytes=2 if args.bf16 else 4,
        trainable_patterns=args.trainable_params,
        live_reference=not (args.precompute_ref_log_probs or args.ref_cache_dir),
        gradient_checkpointing=args.gradient_checkpointing,
        fused_head=args.fused,
        optimizer_bytes=optimizer_state_bytes(str(args.optim), args.optim_args),
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
