"""The sharded reference store on its own (no model): shards, checksums, resume, ranks, naming.

Run: python -m pytest tests/test_refstore.py -q
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from csd_fast.refcache import fingerprint_components, reference_table
from csd_fast.refstore import COLUMNS, RefStore, StoreError, list_tables, verify_table

N = 10  # rows; shards of 3 -> 4 shards, the last one short
BASE = fingerprint_components(
    model="m0", tokenizer="t0", data="d0", max_length=64, truncation_mode="keep_start",
    layout="padded", head_impl="eager", attention="sdpa", dtype="float32", autocast="none",
    device="cpu",
)  # fmt: skip


class Scorer:
    """Deterministic fake reference columns; records which positions it was asked for."""

    def __init__(self, seed: int = 0):
        self.calls: list[list[int]] = []
        rng = np.random.default_rng(seed)
        self.values = rng.normal(size=(N, 4)).astype(np.float32)

    def __call__(self, positions: list[int]) -> dict[str, np.ndarray]:
        self.calls.append(list(positions))
        p = np.asarray(positions, dtype=np.int64)
        v = self.values[p]
        return {"rows": p + 100, "ref_chosen_logps": v[:, 0], "ref_rejected_logps": v[:, 1],
                "ref_chosen_tail_logps": v[:, 2], "ref_rejected_tail_logps": v[:, 3],
                "chosen_tokens": p % 5 + 1, "rejected_tokens": p % 3 + 1}  # fmt: skip


PAIRS = [{"row": i + 100} for i in range(N)]


def build(root, scorer, components=BASE, **kw):
    return reference_table(PAIRS, split="train", score=scorer, root=root,
                           components=lambda: components, shard_rows=3, **kw)  # fmt: skip


def test_table_round_trips_and_second_open_scores_nothing(tmp_path):
    scorer = Scorer()
    table, report = build(tmp_path, scorer)
    assert report.built == [0, 1, 2, 3] and report.reused == 0
    assert [len(c) for c in scorer.calls] == [3, 3, 3, 1]
    want = scorer(list(range(N)))
    for c in COLUMNS:
        np.testing.assert_array_equal(table.columns[c], want[c])
    again = Scorer()
    table2, report2 = build(tmp_path, again)
    assert again.calls == [] and report2.reused == 4 and report2.built == []
    assert table2[105] == table[105]
    ((d, manifest),) = list_tables(tmp_path)
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [
        [0, 3], [3, 6], [6, 9], [9, 10]]  # fmt: skip
    assert verify_table(d) == {}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "swap"])
def test_damaged_shard_is_detected_and_only_it_rebuilt(tmp_path, damage):
    build(tmp_path, Scorer())
    ((d, _),) = list_tables(tmp_path)
    shard = d / "shard-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one bit in the last tensor's data, header intact
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "delete":
        shard.unlink()
    else:  # a whole, valid shard, but another one's
        shard.write_bytes((d / "shard-00002.safetensors").read_bytes())
    bad = verify_table(d)
    assert list(bad) == [1], bad
    scorer = Scorer()
    table, report = build(tmp_path, scorer)
    assert scorer.calls == [[3, 4, 5]] and report.built == [1] and report.reused == 3
    if damage != "delete":
        assert 1 in report.bad and "rebuilt" in report.describe()
    np.testing.assert_array_equal(table.columns["ref_chosen_logps"], Scorer().values[:, 0])
    assert verify_table(d) == {}


def test_interrupted_build_resumes_from_finished_shards(tmp_path):
    class Crash(Exception):
        pass

    scorer = Scorer()

    def dies_on_third(positions):
        if len(scorer.calls) == 2:
            raise Crash
        return scorer(positions)

    with pytest.raises(Crash):
        build(tmp_path, dies_on_third)
    ((d, manifest),) = list_tables(tmp_path)
    assert not manifest["complete"]
    again = Scorer()
    table, report = build(tmp_path, again)
    assert report.reused == 2 and again.calls == [[6, 7, 8], [9]]
    np.testing.assert_array_equal(table.columns["ref_rejected_logps"], Scorer().values[:, 1])


@pytest.mark.parametrize("component", sorted(BASE))
def test_each_changed_component_is_named_and_gets_its_own_table(tmp_path, component):
    build(tmp_path, Scorer())
    changed = {**BASE, component: BASE[component] + "-changed"}
    with pytest.raises(StoreError, match=component):
        build(tmp_path, Scorer(), components=changed, strict=True)
    scorer = Scorer(seed=1)
    table, report = build(tmp_path, scorer, components=changed)
    assert report.differing == [component] and component in report.describe()
    assert len(scorer.calls) == 4  # rebuilt under the new fingerprint
    assert len(list_tables(tmp_path)) == 2  # the old table stays for runs that still match it
    np.testing.assert_array_equal(table.columns["ref_chosen_logps"], scorer.values[:, 0])


def test_strict_with_a_complete_table_reads_it(tmp_path):
    build(tmp_path, Scorer())
    scorer = Scorer()
    build(tmp_path, scorer, strict=True)
    assert scorer.calls == []


def test_ranks_write_their_own_shards(tmp_path):
    """Two ranks (threads standing in for FSDP processes): each writes pending[rank::2], a rank
    without a shard left still gets its turn (score([])), and both read the whole table."""
    barrier = threading.Barrier(2)
    scorers = [Scorer(), Scorer()]
    results: dict[int, object] = {}

    def rank_main(rank):
        results[rank] = build(tmp_path, scorers[rank], rank=rank, world_size=2,
                              barrier=barrier.wait)  # fmt: skip

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0][1].built == [0, 2] and results[1][1].built == [1, 3]
    ((d, manifest),) = list_tables(tmp_path)
    assert manifest["complete"]
    for rank in (0, 1):
        np.testing.assert_array_equal(results[rank][0].columns["ref_chosen_logps"],
                                      Scorer().values[:, 0])  # fmt: skip
    # resume with one shard missing: rank 0 rebuilds it, rank 1 joins with an empty turn
    (d / "shard-00003.safetensors").unlink()
    scorers[:] = [Scorer(), Scorer()]
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scorers[0].calls == [[9]] and scorers[1].calls == [[]]


def test_shards_for_rank_pads_to_equal_turns(tmp_path):
    stores = [RefStore(tmp_path, BASE, N, shard_rows=3, rank=r, world_size=3) for r in range(3)]
    shares = [s.shards_for_rank([0, 2, 3, 5]) for s in stores]
    assert shares == [[0, 5], [2, None], [3, None]]


def test_data_size_mismatch_under_the_same_id_is_refused(tmp_path):
    build(tmp_path, Scorer())
    with pytest.raises(StoreError, match="rows"):
        RefStore(tmp_path, BASE, N + 1, shard_rows=3)


def test_csd_cache_ls_inspect_verify_rm(tmp_path, capsys):
    from csd_fast.__main__ import main

    build(tmp_path, Scorer())
    other = {**BASE, "model": "m1"}
    with pytest.raises(RuntimeError):  # an interrupted second table
        build(tmp_path, lambda p: (_ for _ in ()).throw(RuntimeError("stop")), components=other)
    (full, _), (partial, _) = list_tables(tmp_path)
    full_id = full.name.removeprefix("ref-")
    assert main(["cache", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{full_id}" in out and "4/4" in out and "0/4*" in out
    assert main(["cache", "inspect", str(tmp_path), full_id[:6]]) == 0
    out = capsys.readouterr().out
    assert "model            m0" in out and "ref_chosen_logps" in out and "complete: True" in out
    assert main(["cache", "verify", str(tmp_path), full_id]) == 0
    (full / "shard-00002.safetensors").write_bytes(b"garbage")
    assert main(["cache", "verify", str(tmp_path), full_id]) == 1
    assert "shard 2: checksum mismatch" in capsys.readouterr().out
    assert main(["cache", "rm", str(tmp_path), "--incomplete"]) == 0
    assert [d for d, _ in list_tables(tmp_path)] == [full]
    assert main(["cache", "rm", str(tmp_path), full_id]) == 0
    assert list_tables(tmp_path) == [] and tmp_path.is_dir()


def test_token_budget_plans_are_shared_through_the_plan_cache(tmp_path, monkeypatch):
    import csd_fast.plancache as pc
    from csd_fast.batching import BatchingOptions

    opts = BatchingOptions(batch_size=4, max_tokens_per_batch=40, layout="packed", seed=3)
    costs = np.random.default_rng(0).integers(3, 20, size=50)
    calls = []
    real = pc.rank_plans
    monkeypatch.setattr(pc, "rank_plans", lambda *a: calls.append(a[1]) or real(*a))
    first = pc.cached_rank_plans(tmp_path, 50, 1, opts, 1, costs)
    again = pc.cached_rank_plans(tmp_path, 50, 1, opts, 1, costs)  # another run, same settings
    assert first == again == real(50, 1, opts, 1, costs) and calls == [1]
    two = pc.cached_rank_plans(tmp_path, 50, 1, opts, 2, costs)  # two ranks: their own plans
    assert (
        two == pc.cached_rank_plans(tmp_path, 50, 1, opts, 2, costs) == real(50, 1, opts, 2, costs)
    )
    pc.cached_rank_plans(tmp_path, 50, 2, opts, 1, costs)  # another epoch: its own plan
    pc.cached_rank_plans(tmp_path, 50, 1, BatchingOptions(**{**opts.__dict__, "seed": 4}), 1, costs)
    assert calls == [1, 1, 2, 1] and len(list(tmp_path.glob("plan-*.npz"))) == 4
