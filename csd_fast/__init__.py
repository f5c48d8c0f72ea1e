"""csd-fast: fast DPO / CLO preference optimization.

`from csd_fast import DPOTrainer, DPOConfig` is a drop-in for TRL 1.16's classes of the same names.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["DPOConfig", "DPOTrainer", "__version__"]


def __getattr__(name: str):
    # Lazy so `import csd_fast` stays cheap (the CLI's --help, the data tools).
    if name == "DPOConfig":
        from csd_fast.config import DPOConfig

        return DPOConfig
    if name == "DPOTrainer":
        from csd_fast.trainer import DPOTrainer

        return DPOTrainer
    raise AttributeError(f"module 'csd_fast' has no attribute {name!r}")
