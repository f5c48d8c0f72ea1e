"""The installed package holds every subpackage of the tree (an editable install hides a gap).

Run: `python -m pytest tests/test_packaging.py -q`
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "csd_fast").rglob("__init__.py")
    }
    on_disk.add("csd_fast.kernels")  # kernels/ installs under csd_fast (package-dir mapping)
    assert config["package-dir"]["csd_fast.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").exists()
    assert on_disk - listed == set(), (
        f"subpackages missing from pyproject packages: {on_disk - listed}"
    )
    assert listed - on_disk == set(), (
        f"pyproject lists packages that do not exist: {listed - on_disk}"
    )


def test_every_subcommand_target_exists():
    import importlib

    from csd_fast.__main__ import SUBCOMMANDS

    for name, (target, _) in SUBCOMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
