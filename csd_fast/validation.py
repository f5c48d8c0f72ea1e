"""Configuration checked before anything heavy runs: every error names the field (and the file).

    data = coerce_fields(DPOConfig, yaml.safe_load(text), source="recipe.yaml")  # '5e-3' -> 5e-3
    check_training_args(args, has_train=True, has_eval=False)  # ConfigError("--beta: ...")
    check_model_source("org/model", "model_name_or_path")      # exists, or a cached hub id offline

Three layers, all raising `csd_fast.errors.ConfigError` (a ValueError, exit code 2 in the CLI):
  * `coerce_fields`: YAML 1.1 reads `5e-3` (no dot) as a string and `1e3` as a string too; values
    are converted by the field's declared type, or refused naming the file and the key.
  * `check_training_args`: types (a str learning_rate names the field instead of failing at the
    first step), sizes >= 1, max_length > 0, beta > 0 for every loss that scales or divides by it,
    an eval strategy needs an eval set. These are what cannot run (a zero batch, a zero
    division) or what runs and silently does nothing (beta 0, evaluation with no set); they are
    checked by `DPOTrainer` before it loads a model, so the TRL face keeps accepting at
    `DPOConfig(...)` construction everything TRL accepts there.
  * `check_model_source`: a local directory that exists and holds a model, or a plausible hub id;
    with HF_HUB_OFFLINE=1 the id must already be in the local hub cache.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import re
import types
import typing
from typing import Any

from csd_fast.errors import ConfigError


def base_type(tp) -> tuple[Any, bool]:
    """(scalar type, is_list) of a dataclass field annotation such as `list[str] | None`.

    A union of several scalar types (`int | str`) gives `str`: such fields take loose values.
    """
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing, "Any": typing.Any})  # annotations are strings (PEP 563)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists:
            inner = typing.get_args(lists[0])
            return (inner[0] if inner else str), True
        return base_type(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        inner = typing.get_args(tp)
        return (inner[0] if inner else str), True
    if origin is dict:
        return dict, False
    return tp, False


_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as `tp` (int, float, bool), or raise ValueError with what was expected."""
    if value is None:
        return None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, (int, float)):
            return float(value) if isinstance(value, int) else value
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError("expected an integer") from None
            if number.is_integer():
                return int(number)
        raise ValueError("expected an integer")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    return value


def declared_type(cls, f: dataclasses.Field):
    """A field's annotation as the class declares it. HF's argument parser (TRL's TrlParser)
    rewrites `Field.type` in place (`int | None` becomes `int`) for every later use of the
    class in the process; the class's own `__annotations__` stay as written."""
    for klass in cls.__mro__:
        annotations = klass.__dict__.get("__annotations__", {})
        if f.name in annotations:
            return annotations[f.name]
    return f.type


def _is_optional(tp) -> bool:
    if isinstance(tp, str):
        return "None" in tp
    return type(None) in typing.get_args(tp)


def coerce_fields(cls, data: dict, *, source: str | None = None) -> dict:
    """`data` (field -> value, e.g. read from YAML) with values converted by `cls`'s field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            out[key] = value
            continue
        tp, is_list = base_type(declared_type(cls, f))
        try:
            if is_list and isinstance(value, (list, tuple)):
                value = [_coerce(v, tp) for v in value]
            elif not (is_list and isinstance(value, str) and tp is str):
                value = _coerce(value, tp)
        except ValueError as e:
            raise ConfigError(key, f"{e}, got {value!r}", source=source) from None
        out[key] = value
    return out


@functools.cache
def _upstream_str_fields() -> frozenset[str]:
    """TrainingArguments fields whose declared type admits a string (`str | bool`, ...); the
    declared type, since a TrlParser run rewrites `str | bool` to `bool` (`declared_type`)."""
    from transformers import TrainingArguments

    fields = dataclasses.fields(TrainingArguments)
    return frozenset(f.name for f in fields if "str" in str(declared_type(TrainingArguments, f)))


def _check_types(args) -> None:
    """Every int/float/bool field holds a value of its type (None where the field allows it)."""
    for f in dataclasses.fields(args):
        declared = declared_type(type(args), f)
        tp, is_list = base_type(declared)
        if tp not in (int, float, bool) or is_list:
            continue
        value = getattr(args, f.name)
        if isinstance(value, str) and f.name in _upstream_str_fields():
            continue  # transformers takes a string here too (include_num_input_tokens_seen="no")
        if value is None and (_is_optional(declared) or f.default is None):
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if tp is bool:
            ok = isinstance(value, bool)
        else:  # numpy scalars are numbers too; an int field takes 4.0 but not 4.5
            ok = number and (tp is float or float(value).is_integer())
        if not ok:
            kind = {int: "an integer", float: "a number", bool: "true or false"}[tp]
            raise ConfigError(f.name, f"expected {kind}, got {value!r} ({type(value).__name__})")


# Losses that do not read beta at all; every other loss multiplies by it or divides by it.
_BETA_FREE_LOSSES = frozenset({"sft"})


def check_training_args(args, *, has_train: bool = True, has_eval: bool = False) -> None:
    """What cannot run, or runs and does nothing, named by field (module docstring)."""
    _check_types(args)
    at_least_one = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    ]
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(args, name)}")
    for name in ("precompute_ref_batch_size", "max_tokens_per_batch", "max_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(name, f"must be > 0 (or unset), got {value}")
    if args.learning_rate < 0:
        raise ConfigError("learning_rate", f"must be >= 0, got {args.learning_rate}")
    if has_train and not (args.max_steps and args.max_steps > 0) and args.num_train_epochs <= 0:
        raise ConfigError(
            "num_train_epochs",
            f"must be > 0 when max_steps is not set, got {args.num_train_epochs}",
        )
    scaled = [t for t in args.loss_type if t not in _BETA_FREE_LOSSES]
    if scaled and not args.beta > 0:
        raise ConfigError(
            "beta",
            f"must be > 0 for loss_type {scaled} (they scale or divide by beta; beta "
            f"{args.beta} gives {'zero gradients' if args.beta == 0 else 'a reversed preference'})",
        )
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")
    if args.eval_strategy != "no" and not has_eval:
        raise ConfigError(
            "eval_strategy",
            f"is {args.eval_strategy!r} but no eval dataset was given: pass one "
            "(--eval_dataset_name / eval_dataset=) or set eval_strategy 'no'",
        )


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_.-]{1,96})?$")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_model_source(name: str, field: str) -> None:
    """`name` is an existing model directory, or a hub id (cached, when offline)."""
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ConfigError(field, f"{name} is a file; give the directory of a saved model")
        if not any(
            os.path.exists(os.path.join(name, f)) for f in ("config.json", "adapter_config.json")
        ):
            raise ConfigError(field, f"{name} has no config.json: not a saved model directory")
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or not _HUB_ID.match(name) or ".." in name or "--" in name:
        raise ConfigError(field, f"{name}: no such directory (and not a hub id like org/name)")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                field,
                f"{name!r} is not a local directory and not in the hub cache, and offline mode "
                f"(HF_HUB_OFFLINE=1) forbids downloading it: download it first "
                f"(`hf download {name}`) or give a local directory",
            )


def check_data_source(path: str, field: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(field, f"{path}: no such file or directory")
