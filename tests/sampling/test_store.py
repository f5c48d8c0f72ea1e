"""Shards and manifest: atomic writes, resume state, the i/N split, refusal of other settings.

python -m pytest -q tests/sampling/test_store.py
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from csd_fast.sampling import read_samples
from csd_fast.sampling.runner import worker_index
from csd_fast.sampling.store import (
    ManifestMismatch,
    ShardStore,
    parse_shard_spec,
    worker_shards,
)


def _store(tmp_path, **kw):
    args = dict(
        settings={"temperature": 1.0, "num_samples": 4},
        fingerprint={"model": "m1"},
        num_units=10,
        shard_size=3,
    )
    args.update(kw)
    return ShardStore(tmp_path, "samples", args.pop("settings"), args.pop("fingerprint"), **args)


def _table(j, store):
    start, stop = store.units(j)
    return pa.table({"prompt_id": [f"p{i}" for i in range(start, stop)]})


@pytest.mark.parametrize(
    "units,size,n,dp", [(10, 3, 3, 1), (7, 2, 3, 2), (23, 4, 5, 1), (5, 1, 8, 2)]
)
def test_shard_split_covers_every_unit_once(units, size, n, dp):
    """--shard i/N x data-parallel ranks over counts that do not divide: each unit exactly once."""
    num_shards = -(-units // size)
    seen = []
    for i in range(n):
        for rank in range(dp):
            w, workers = worker_index((i, n), rank, dp)
            for j in worker_shards(num_shards, w, workers):
                seen += list(range(j * size, min((j + 1) * size, units)))
    assert sorted(seen) == list(range(units))


def test_parse_shard_spec():
    assert parse_shard_spec("2/5") == (2, 5)
    assert parse_shard_spec(None) == (0, 1)
    for bad in ("5/5", "x/2", "1/0", "-1/3"):
        with pytest.raises(ValueError):
            parse_shard_spec(bad)


def test_write_resume_and_read(tmp_path):
    store = _store(tmp_path)
    assert store.num_shards == 4 and store.todo() == [0, 1, 2, 3]
    for j in (0, 2):
        store.write(j, _table(j, store))
    again = _store(tmp_path)  # a new process on the same folder
    assert again.todo() == [1, 3]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [r["units"] for r in manifest["shards"]] == [[0, 3], [6, 9]]
    assert not manifest["complete"]
    with pytest.raises(ValueError, match="2 of 4 shards not written"):
        read_samples(tmp_path)
    for j in again.todo():
        again.write(j, _table(j, again))
    ds = read_samples(tmp_path)
    assert ds["prompt_id"] == [f"p{i}" for i in range(10)]
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]


def test_damaged_or_unrecorded_shard_is_redone(tmp_path):
    store = _store(tmp_path)
    store.write(0, _table(0, store))
    store.write(1, _table(1, store))
    path = tmp_path / store.name(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    path.write_bytes(bytes(data))
    (tmp_path / "shards" / f"{store.name(1)}.json").unlink()  # killed before its record
    assert _store(tmp_path).todo() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="checksum"):
        read_samples(tmp_path, allow_partial=True)


def test_differing_settings_are_refused_with_the_difference_named(tmp_path, capsys):
    _store(tmp_path).write(0, _table(0, _store(tmp_path)))
    with pytest.raises(ManifestMismatch) as e:
        _store(tmp_path, settings={"temperature": 0.7, "num_samples": 4})
    assert "settings.temperature: manifest has 1.0, this command 0.7" in e.value.message
    with pytest.raises(ManifestMismatch) as e:
        _store(tmp_path, fingerprint={"model": "m2"})
    assert "fingerprint.model: manifest has 'm1', this command 'm2'" in e.value.message
    with pytest.raises(ManifestMismatch) as e:
        _store(tmp_path, num_units=11)
    assert "num_units" in e.value.message
    fresh = _store(tmp_path, settings={"temperature": 0.7, "num_samples": 4}, overwrite=True)
    assert fresh.todo() == [0, 1, 2, 3]
    assert not list(tmp_path.glob("samples-*.parquet"))


def test_temp_files_of_a_killed_write_are_not_shards(tmp_path):
    store = _store(tmp_path)
    (tmp_path / f".{store.name(0)}.tmp-12345").write_bytes(b"half a parquet file")
    assert store.todo() == [0, 1, 2, 3]
    store.write(0, _table(0, store))
    assert read_samples(tmp_path, allow_partial=True).num_rows == 3
