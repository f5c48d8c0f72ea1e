"""Builds the optional native extension `csd_fast._planner` from csrc/; everything else is in
pyproject.toml.

    python setup.py build_ext --inplace     # csd_fast/_planner*.so next to csd_fast/planner.py
    pip install -e .                        # also builds it when a C++ compiler is present

A failed build (no compiler, no Python headers) prints a warning and the install goes on:
csd_fast.planner then uses its pure-Python loop, which gives the same plans.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure only loses speed
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    @staticmethod
    def _warn(e: Exception) -> None:
        print(
            f"WARNING: csd_fast native planner not built ({e}); using the pure-Python planner",
            file=sys.stderr,
        )


compile_args = ["/O2", "/std:c++17"] if sys.platform == "win32" else ["-O3", "-std=c++17"]
setup(
    ext_modules=[
        Extension(
            "csd_fast._planner",
            sources=["csrc/planner.cpp"],
            language="c++",
            extra_compile_args=compile_args,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
