"""TRL 1.16 with precompute_ref_log_probs=True against csd-fast reading its sharded store.

Run: python -m pytest tests/test_refcache_trl.py -q

TRL scores the reference before training and keeps the values in dataset columns; csd-fast
writes them as safetensors shards (3 pairs each here, so a micro-batch spans shards) and the
second csd run reads every shard back from disk. Every logged key and the final weights must
agree with TRL's as in tests/test_trl_parity.py.
"""

from __future__ import annotations

import pytest
from test_trl_parity import WEIGHT_ATOL
from trl_helpers import compare_logs, rows, run

from csd_fast.refstore import list_tables, verify_table

pytest.importorskip("trl")


@pytest.mark.parametrize("extra", [{}, {"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]}],
                         ids=["sigmoid", "ld_alpha_sft"])  # fmt: skip
def test_sharded_store_matches_trl_precompute(tmp_path, extra):
    data = rows("standard", 8)
    models = tmp_path / "models"
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data,
                          precompute_ref_log_probs=True, **extra)  # fmt: skip
    store = {"ref_cache_dir": str(tmp_path / "store"), "ref_cache_shard_size": 3}
    for attempt in ("build", "read"):
        logs, w = run("csd", "llama", models, tmp_path / attempt, data, **store, **extra)
        problems = compare_logs(logs, ref_logs)
        assert not problems, "\n".join(problems)
        worst = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"
    ((table, manifest),) = list_tables(tmp_path / "store")
    assert manifest["num_shards"] == 3 and manifest["complete"] and verify_table(table) == {}
