"""`csd` (also `python -m csd_fast`): one command line, one subcommand per part of the method.

    csd train --fused                      # == csd-train: DPO / CLO training
    csd <subcommand> --help                # each part owns its own options

Each subcommand lives with the part that owns it as a `main(argv) -> int`; this dispatcher only
maps names to those functions and imports the one asked for, so `csd train` never imports vLLM
and `csd sample` never imports the trainer.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Parts register themselves here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("csd_fast.cli:main", "DPO / CLO training (also `csd-train`)"),
    "cache": ("csd_fast.cache_cli:main", "reference store: ls | inspect | verify | rm DIR"),
    "sweep": ("csd_fast.pipeline.sweep:main", "grid of training runs sharing data and reference"),
    "sample": ("csd_fast.sampling.sample:main", "K responses per prompt (vLLM or transformers)"),
    "score": ("csd_fast.sampling.score:main", "reward-model scores of samples (raw logits)"),
    "translate": ("csd_fast.sampling.translate:main", "translate prompts (and responses)"),
    "pairs": ("csd_fast.pairs.cli:main", "preference pairs from scored samples"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: csd <subcommand> [options]   (csd <subcommand> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"csd: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[name]
    module, func = target.split(":")
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
