"""Command-line options shared by `csd sample | score | translate | pairs`.

    opts = [Option("num_samples", int, 8, "responses per prompt"), ...]
    settings = parse_options("csd sample", "what it does", opts, argv)   # a plain dict

Each option is a flag spelt both ways (`--num-samples` and `--num_samples`); `--config FILE.yaml`
gives defaults that the flags override (keys spelt either way). An option marked `output=True`
changes what the stage writes: those are the settings a resumed run must share with the manifest
(`csd_fast.sampling.store`); the others (batching, devices, progress) may change between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class UsageError(SystemExit):
    """A bad command line or config file: printed without a traceback, exit code 2."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)


@dataclass(frozen=True)
class Option:
    name: str
    type: (
        Any  # int, float, str, bool, list (comma-separated or repeated), dict (KEY=VALUE, repeated)
    )
    default: Any
    help: str
    output: bool = False  # part of the manifest's settings (what the stage writes depends on it)
    choices: tuple | None = None
    required: bool = False


def _bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value) if value else ""


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    out: list = []
    for v in value:
        out += _as_list(v) if isinstance(v, str) else [v]
    return out


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """A value from the YAML file or the command line, as the option's type."""
    if value is None:
        return None
    try:
        if opt.type is list:
            return _as_list(value)
        if opt.type is dict:
            if isinstance(value, dict):
                return {str(k).replace("-", "_"): v for k, v in value.items()}
            return dict(_key_value(v) for v in (value if isinstance(value, list) else [value]))
        if opt.type is bool:
            return value if isinstance(value, bool) else _bool(value)
        return opt.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UsageError(f"{where}: option {opt.name}: {e}") from None


def build_parser(prog: str, description: str, options: list[Option]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of options; flags given here override it")
    for opt in options:
        flags = [f"--{opt.name.replace('_', '-')}"]
        if "_" in opt.name:
            flags.append(f"--{opt.name}")
        kw: dict = {"dest": opt.name, "default": argparse.SUPPRESS}
        help_ = opt.help + ("" if opt.default in (None, [], {}) else f" (default: {opt.default})")
        if opt.choices:
            help_ += f" [{'|'.join(map(str, opt.choices))}]"
        help_ = help_.replace("%", "%%")  # argparse formats help strings with %
        if opt.type is bool:
            kw.update(nargs="?", const=True, type=_bool)
            parser.add_argument(*flags, help=help_, **kw)
            negs = [f"--no-{opt.name.replace('_', '-')}"] + (
                [f"--no_{opt.name}"] if "_" in opt.name else []
            )
            parser.add_argument(
                *negs,
                dest=opt.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        elif opt.type in (list, dict):
            parser.add_argument(*flags, action="append", help=help_, **kw)
        else:
            parser.add_argument(*flags, help=help_, **kw)
    return parser


def parse_options(
    prog: str, description: str, options: list[Option], argv: list[str] | None
) -> dict:
    """Defaults < `--config` file < flags -> {name: value} for every option (plus `config`)."""
    parser = build_parser(prog, description, options)
    ns = vars(parser.parse_args(argv))
    by_name = {o.name: o for o in options}
    values = {o.name: o.default for o in options}
    config = ns.pop("config", None)
    if config:
        try:
            recipe = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{prog}: cannot read --config {config}: {e}") from None
        if not isinstance(recipe, dict):
            raise UsageError(f"{config}: expected a mapping of option: value")
        for key, value in recipe.items():
            name = str(key).replace("-", "_")
            if name not in by_name:
                raise UsageError(f"{config}: unknown option {key!r} for {prog}")
            values[name] = _coerce(by_name[name], value, config)
    for name, value in ns.items():  # only the flags actually given (SUPPRESS drops the rest)
        opt = by_name[name]
        if opt.type is list:
            value = _as_list(value)
        values[name] = _coerce(opt, value, "command line")
    for opt in options:
        if opt.required and values[opt.name] in (None, "", []):
            raise UsageError(f"{prog}: --{opt.name.replace('_', '-')} is required")
        if opt.choices and values[opt.name] not in opt.choices:
            raise UsageError(
                f"{prog}: --{opt.name.replace('_', '-')} must be one of "
                f"{', '.join(map(str, opt.choices))}, got {values[opt.name]!r}"
            )
    values["config"] = config
    return values


def output_settings(options: list[Option], values: dict) -> dict:
    """The settings that decide what the stage writes (compared with a manifest on resume)."""
    return {o.name: values[o.name] for o in options if o.output}


def show_settings(prog: str, resolved: dict, path: str | os.PathLike | None) -> str:
    """Print the resolved settings as YAML and save them beside the output (atomically)."""
    text = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, allow_unicode=True)
    print(f"[{prog}] resolved settings:\n{text}", flush=True)
    if path is not None:
        from csd_fast.rundir import write_text_atomically as atomic_write_text

        atomic_write_text(Path(path), text)
    return text
