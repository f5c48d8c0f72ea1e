"""Built-in demo: a tiny Llama-style model, a local tokenizer and a bilingual preference set.

    python -m csd_fast.demo.make_data          # regenerate the packaged train/eval jsonl
    python -m csd_fast.demo.assets DIR         # write the tiny model + tokenizer to DIR/model

`csd-train --fused` with no model or data trains on this: `build_demo(workdir)` gives the paths and
`DEMO_RECIPE` the hyperparameters that make the random-init model learn the task.
"""

from __future__ import annotations

__all__ = [
    "DEMO_EVAL_FILE",
    "DEMO_RECIPE",
    "DEMO_TRAIN_FILE",
    "DemoAssets",
    "build_demo",
    "build_demo_tokenizer",
    "demo_model_config",
]


def __getattr__(name: str):
    # Lazy so `python -m csd_fast.demo.make_data` / `.assets` run without importing the other
    # module first (runpy warns), and importing the package stays cheap.
    if name in __all__:
        from csd_fast.demo import assets

        return getattr(assets, name)
    raise AttributeError(f"module 'csd_fast.demo' has no attribute {name!r}")
