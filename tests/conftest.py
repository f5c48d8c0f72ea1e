"""Suite-wide setup: Triton runs in its interpreter where there is no GPU, offline hub.

TRITON_INTERPRET must be set before anything imports triton (csd_fast.kernels does), so it is
set here, at collection start, rather than in the kernel tests' own conftest.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# tests never write the user's tokenization cache; the cache tests point it at a tmp dir
os.environ.setdefault("CSD_FAST_CACHE", "off")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder per test module for the tiny models the TRL-parity tests save once and reload."""
    return tmp_path_factory.mktemp("models")
