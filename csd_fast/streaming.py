"""Streaming preference data: a `datasets.IterableDataset` tokenized and batched on the fly.

    stream = load_dataset("json", data_files="pairs.jsonl", streaming=True)["train"]
    trainer = DPOTrainer(model, args=DPOConfig(max_steps=1000), train_dataset=stream)

A stream has no length and no random access, so unlike a map-style set it is never tokenized
up front. `StreamPairs` reads rows in chunks, tokenizes each chunk exactly as a map-style set
(`tokenize_pairs`, TRL 1.16's rules), and numbers the surviving pairs in stream order; a
`StreamPlan` is one pass over the stream as micro-batches (for every rank under torchrun: each
reads the whole stream and keeps its share), fetched only as the loop asks:

    count batches:  [p0 p1 p2 p3] [p4 p5 p6 p7] ...       per_device_*_batch_size pairs, in order
    token budget:   buffer of stream_buffer_size pairs -> best-fit-decreasing plan -> emit -> next

Memory stays bounded: a pair is kept from when its chunk is read until its micro-batch has been
handed out. Like transformers with an IterableDataset: training needs `max_steps`, one epoch is
one pass (the stream is re-read, with `set_epoch(epoch)` so its own shuffle buffer reshuffles),
the logged `epoch` counts micro-batches against max_steps * gradient_accumulation_steps, and
resuming replays the stream up to the saved position. Tests: tests/test_streaming.py.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np

_CHUNK = 256  # rows read and tokenized per call: batched tokenization without a big buffer


def check_same_rows_on_every_rank(dataset, dist, name: str, rows: int = 64) -> None:
    """Under torchrun every rank reads the whole stream and keeps its share of each global
    batch, which is right only if every rank reads the same rows in the same order: compare a
    digest of the first `rows` (an unseeded `shuffle()` draws a different order per process)."""
    import hashlib
    import json

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)  # as the first training pass reads it
    digest = hashlib.sha256()
    for row in itertools.islice(iter(dataset), rows):
        digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
    digests = dist.all_processes_gather(digest.hexdigest())  # tensor peers read it too
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"{name} dataset: the stream gives processes {differ} other rows than process 0 "
            f"(its first "
            f"{rows} rows differ). Every rank must read the same stream in the same order: give "
            "IterableDataset.shuffle() a seed, and do not split it per rank"
        )


def is_stream(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


class StreamPairs:
    """Tokenized pairs of a stream, produced lazily; `pairs[i]` while pair i is buffered."""

    def __init__(self, dataset, tokenize, name: str, rejects_path=None):
        from csd_fast.data.sources import RowSource

        self.dataset, self.name, self.rejects_path = dataset, name, rejects_path
        self._tokenize = tokenize  # RowSource -> TokenizedPairs (the trainer's own settings)
        self._row_source = RowSource
        self._buffer: dict[int, dict] = {}
        self.rejects: list[dict] = []
        self.skipped: dict[str, int] = {}

    def __getitem__(self, i: int) -> dict:
        try:
            return self._buffer[i]
        except KeyError:
            raise IndexError(f"stream pair {i} is not buffered (streams are read once)") from None

    def release(self, indices) -> None:
        for i in indices:
            self._buffer.pop(i, None)

    def pairs(self, epoch: int):
        """Yield (index, pair) of one pass over the stream; rows that fail are recorded."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.rejects, self.skipped = [], {}
        for index, pair in enumerate(self._read(record=True)):
            self._buffer[index] = pair
            yield index, pair

    def __iter__(self):
        """The tokenized pairs (prompt_ids, chosen_ids, rejected_ids, ...) of a fresh pass, as
        iterating TRL's tokenized IterableDataset gives them; the training pass is untouched."""
        return self._read(record=False)

    def _read(self, record: bool):
        rows, start = iter(self.dataset), 0
        while chunk := list(itertools.islice(rows, _CHUNK)):
            source = self._row_source(chunk, f"{self.name} (stream rows {start}-)")
            tokenized = self._tokenize(source)
            if tokenized.group is not None or tokenized.sft is not None:
                raise NotImplementedError(
                    f"{self.name}: CLO columns (group/sft) in a stream: an example's pairs could "
                    "fall in different micro-batches. Load the set map-style."
                )
            if record:
                self._record(tokenized, start)
            for k in range(len(tokenized)):
                pair = tokenized[k]
                pair["row"] += start  # the row number in the stream, for errors and rejects
                yield pair
            start += len(chunk)

    def _record(self, tokenized, start: int) -> None:
        if not tokenized.rejects:
            return
        for r in tokenized.rejects:
            self.rejects.append({**r, "row": None if r["row"] is None else r["row"] + start})
        for kind, n in tokenized.skipped.items():
            self.skipped[kind] = self.skipped.get(kind, 0) + n
        if self.rejects_path is not None:  # the whole list so far, replaced atomically
            from csd_fast.data.tokenize import _write_rejects

            _write_rejects(self.rejects, os.fspath(self.rejects_path))


class StreamPlan:
    """One pass of micro-batches for `world_size` ranks, fetched on demand; sized like
    transformers' iterable epoch. Entry k holds every rank's k-th micro-batch.

    Every rank reads the whole stream (the same rows in the same order, so the same plan) and
    keeps only what it collates; a global batch of world_size * batch_size pairs is dealt to the
    ranks as a map-style set's is (`batching._deal`), a token-budget buffer is planned for all
    ranks at once. `view(rank)` is what the loop indexes. `len()` is the nominal length
    (max_steps * gradient_accumulation_steps when training) until the stream runs out, then the
    real count; it reads one entry ahead so the loop's `micro < len(plan)` test is exact at the
    end of the stream.
    """

    def __init__(
        self, stream: StreamPairs, epoch: int, opts, nominal: int | None, buffer: int,
        world_size: int = 1,
    ):  # fmt: skip
        self.stream, self.opts, self.nominal = stream, opts, nominal or sys.maxsize
        self.buffer = buffer  # pairs planned together under a token budget
        self.world_size = world_size
        self._pairs = stream.pairs(epoch)
        self._entries: list[list[list[int]]] = []  # [micro][rank] -> pair indices
        self._done = False
        self._wanted = 0  # entries asked for so far (slice ends)
        self._released = 0  # entries whose pairs have left the buffer

    def view(self, rank: int) -> StreamRankPlan:
        return StreamRankPlan(self, rank)

    def _fetch(self, n: int) -> None:
        from csd_fast.batching import _deal

        wide = self.opts.batch_size * self.world_size
        while not self._done and len(self._entries) < n:
            if self.opts.max_tokens_per_batch:
                self._fill_from_buffer()
            else:
                block = [i for i, _ in itertools.islice(self._pairs, wide)]
                if block and not (self.opts.drop_last and len(block) < wide):
                    self._entries.append(_deal(block, self.world_size, None))
                if len(block) < wide:
                    self._done = True

    def _fill_from_buffer(self) -> None:
        from csd_fast.planner import plan_batches

        buffered = list(itertools.islice(self._pairs, self.buffer))
        if len(buffered) < self.buffer:
            self._done = True
        if not buffered:
            return
        ids = [i for i, _ in buffered]
        costs = _costs([p for _, p in buffered], self.opts)
        plans = plan_batches(
            costs, self.opts.max_tokens_per_batch, seed=self.opts.seed, epoch=ids[0],
            world_size=self.world_size,
        )  # fmt: skip
        for per_rank in zip(*plans, strict=True):  # the planner gives every rank one length
            self._entries.append([[ids[j] for j in batch] for batch in per_rank])

    def length(self) -> int:
        self._fetch(self._wanted + 1)
        return len(self._entries) if self._done else max(self.nominal, len(self._entries))

    def entries(self, key):
        """Entry `key` (or the entries of a slice); the ones before it leave the buffer."""
        if isinstance(key, slice):
            stop = key.stop if key.stop is not None else sys.maxsize
            self._wanted = max(self._wanted, stop)
            self._fetch(stop)
            out = self._entries[key]
        else:
            self._wanted = max(self._wanted, key + 1)
            self._fetch(key + 1)
            out = self._entries[key]
        # what the loop has asked for is consumed once collated: release pairs before `start`
        self._release_until((key.start or 0) if isinstance(key, slice) else key)
        return out

    def _release_until(self, first: int) -> None:
        while self._released < min(first, len(self._entries)):
            for batch in self._entries[self._released]:
                self.stream.release(batch)
            self._released += 1

    def iterate(self):
        k = 0
        while True:
            self._fetch(k + 1)
            if k >= len(self._entries):
                return
            yield self._entries[k]
            self._release_until(k)
            k += 1


class StreamRankPlan:
    """One rank's micro-batches of a `StreamPlan`, indexed like a list of index lists."""

    def __init__(self, plan: StreamPlan, rank: int):
        self.plan, self.rank = plan, rank

    def __len__(self) -> int:
        return self.plan.length()

    def __bool__(self) -> bool:
        self.plan._fetch(1)
        return bool(self.plan._entries)

    def __getitem__(self, key):
        out = self.plan.entries(key)
        return [entry[self.rank] for entry in out] if isinstance(key, slice) else out[self.rank]

    def __iter__(self):
        return (entry[self.rank] for entry in self.plan.iterate())


def _costs(pairs: list[dict], opts) -> np.ndarray:
    """Token costs of pairs in the layout (what the planner packs), as `batching.pair_costs`."""
    from csd_fast.batching import pair_costs

    lengths = tuple(
        np.array([len(p[f"{k}_ids"]) for p in pairs], dtype=np.int64)
        for k in ("prompt", "chosen", "rejected")
    )
    return pair_costs(lengths, opts)
