"""Padding-free layouts of preference pairs: packed sequences and prefix-shared pairs.

    from csd_fast.packing import collate_packed
    batch = collate_packed(examples, pad_token_id, prefix_sharing=True)  # a PairBatch

Both layouts produce a `PairBatch` (contract in `csd_fast.batch`) whose backbone inputs carry, next
to `input_ids` and `position_ids`, the metadata the `csd_packed` attention function
(`csd_fast.attention`) needs: per-token segment and branch ids for the dense-mask path, and
`cu_seqlens_*` / `max_seqlen_*` / `csd_kv_index` for flash-attn's variable-length kernel.

Packed (`prefix_sharing=False`): every sequence prompt+completion is its own segment, positions
restart at 0, and attention is causal inside a segment (block-causal). Two pairs, prompt p, chosen
c, rejected r, padding ·, one row (R = 1):

    tokens     p0 p1 c0 c1 | p0 p1 r0 | q0 d0 | q0 s0 s1
    positions   0  1  2  3 |  0  1  2 |  0  1 |  0  1  2
    segment     0  0  0  0 |  1  1  1 |  2  2 |  3  3  3

    mask (1 = attend), block-causal:
        1
        1 1
        1 1 1
        1 1 1 1
                1
                1 1
                1 1 1
                       ...

Prefix-shared (`prefix_sharing=True`): one segment per pair [prompt, chosen, rejected]. Rejected's
positions continue from the end of the prompt, so each completion sees exactly the positions it has
in its own padded row. Rejected tokens attend to the prompt and to earlier rejected tokens, never to
chosen (branch ids: prompt 0, chosen 1, rejected 2):

    tokens     p0 p1 p2 c0 c1 r0 r1 r2
    positions   0  1  2  3  4  3  4  5
    branch      0  0  0  1  1  2  2  2

    mask        p0 p1 p2 c0 c1 r0 r1 r2
        p0       1
        p1       1  1
        p2       1  1  1
        c0       1  1  1  1
        c1       1  1  1  1  1
        r0       1  1  1  .  .  1
        r1       1  1  1  .  .  1  1
        r2       1  1  1  .  .  1  1  1

Scoring: c0 and r0 are both predicted from p2's hidden state (so that flat position appears twice
in `token_index`), c1 from c0, r1 from r0, r2 from r1. The prompt is computed once instead of twice.
When truncation (`keep_end`) left chosen and rejected with different prompts, that pair falls back
to two packed segments.

Rows: with `row_capacity=None` everything goes in one row (R = 1, T = tokens, no padding);
otherwise segments are placed best-fit-decreasing into rows of at most `row_capacity` tokens and
all rows are padded at the end to the longest (T). Padding tokens belong to no segment (id -1),
attend only to earlier padding of their row (so no softmax row is empty) and are never scored.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from csd_fast.batch import PairBatch, _pair_fields, truncate_pair, unscored_first_tensor

BRANCH_PROMPT, BRANCH_CHOSEN, BRANCH_REJECTED = 0, 1, 2
ATTN_BACKENDS = ("auto", "sdpa", "flash")


class _Segments:
    """The attention segments of a micro-batch before placement, as parallel arrays.

    Segment k is [prompt (p[k]) | a (a[k]) | b (b[k])]: `a` is a completion scored as sequence
    seq_a[k] (chosen, or the rejected of an unshared pair) on branch branch_a[k]; `b` is the
    rejected completion of a prefix-shared pair (sequence seq_b[k], branch rejected), 0 otherwise.
    Only per-pair work happens in Python (truncation, the shared-or-not choice); the per-token
    layout is array arithmetic over these (see `collate_packed`).
    """

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []  # token lists, [prompt, a, b] per segment, in order
        self.fields: list[tuple[int, int, int, int, int, int]] = []  # p, a, b, branch, seqs

    def add(self, prompt, a, b, branch_a: int, seq_a: int, seq_b: int) -> None:
        if prompt or a or b:  # an empty segment is never placed
            self.chunks += (prompt, a, b)
            self.fields.append((len(prompt), len(a), len(b), branch_a, seq_a, seq_b))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(tokens (sum of lengths,), p, a, b, branch_a, seq_a, seq_b (S,) each), int64."""
        cols = np.array(self.fields, dtype=np.int64).reshape(-1, 6).T
        total = int(cols[:3].sum())
        tokens = np.fromiter(chain.from_iterable(self.chunks), dtype=np.int64, count=total)
        return (tokens, *cols)


def _place_rows(lengths: list[int], row_capacity: int | None) -> list[list[int]]:
    """Segment indices per row: one row, or best-fit-decreasing into rows of row_capacity."""
    if row_capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    free: list[int] = []
    for s in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
        if lengths[s] > row_capacity:
            raise ValueError(
                f"a sequence of {lengths[s]} tokens does not fit row_capacity={row_capacity}"
            )
        fits = [r for r in range(len(rows)) if free[r] >= lengths[s]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            rows.append([])
            free.append(row_capacity)
            r = len(rows) - 1
        rows[r].append(s)
        free[r] -= lengths[s]
    for row in rows:
        row.sort()  # keep the pairs' order inside a row: easier to read, same numbers
    return rows


def collate_packed(
    examples: list[dict],
    pad_token_id: int,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    prefix_sharing: bool = False,
    row_capacity: int | None = None,
    attn_backend: str = "auto",
    pad_to_multiple_of: int | None = None,
) -> PairBatch:
    """Lay out P pairs without padding (packed) or with one shared prompt per pair (prefix).

    Each example has `prompt_ids`, `chosen_ids`, `rejected_ids` and optionally `row`, `group`,
    `sft`, `ref_chosen_logps`, `ref_rejected_logps` (as for `collate_padded`). `attn_backend`
    picks the metadata: "sdpa" (dense-mask ids only), "flash" or "auto" (both).
    `pad_to_multiple_of` only sizes `trl_numel` (TRL's padded rows); packed rows are not padded.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    P = len(examples)
    segs = _Segments()
    num_tokens, longest, trl_rows = 0, 1, 0  # TRL's padded rows: their count and width
    unscored = np.zeros(2 * P, dtype=np.int64)  # completions with no prompt before them
    for i, ex in enumerate(examples):  # per pair: truncation and the shared-or-not choice
        (pc, c), (pr, r) = truncate_pair(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode
        )
        unscored[i], unscored[P + i] = not pc and bool(c), not pr and bool(r)
        num_tokens += len(pc) + len(c) + (len(pr) + len(r) if ex["rejected_ids"] else 0)
        longest = max(longest, len(pc) + len(c), len(pr) + len(r))
        trl_rows += 2 if ex["rejected_ids"] else 1
        if prefix_sharing and pc == pr:
            segs.add(pc, c, r, BRANCH_CHOSEN, i, P + i)
        else:
            segs.add(pc, c, [], BRANCH_CHOSEN, i, -1)
            if ex["rejected_ids"]:  # an SFT row (csd_fast.data.sft) has no rejected side
                segs.add(pr, r, [], BRANCH_REJECTED, P + i, -1)
    tokens, p, a, b, branch_a, seq_a, seq_b = segs.arrays()
    lengths = p + a + b  # (S,)
    rows = _place_rows(lengths.tolist(), row_capacity)
    R, S = len(rows), lengths.size

    # placement: segment k starts at flat position base[k] = row * T + column
    placed = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=S)
    per_row = np.array([len(row) for row in rows], dtype=np.int64)  # (R,)
    row_of = np.repeat(np.arange(R), per_row)  # (S,) in placement order
    ends = np.cumsum(lengths[placed])
    row_start = np.concatenate([[0], ends])[np.cumsum(per_row) - per_row]  # (R,)
    used = np.concatenate([[0], ends])[np.cumsum(per_row)] - row_start  # tokens in each row
    T = max(int(used.max()), 1)
    base = np.empty(S, dtype=np.int64)
    base[placed] = row_of * T + (ends - lengths[placed]) - np.repeat(row_start, per_row)

    # per token, in segment order: local index j, the part it is in, where it lands
    seg = np.repeat(np.arange(S), lengths)  # (n_tok,)
    j = np.arange(seg.size) - (np.cumsum(lengths) - lengths)[seg]
    ps, pa = p[seg], p[seg] + a[seg]
    in_b, in_a = j >= pa, (j >= ps) & (j < pa)
    dest = base[seg] + j
    # filled in numpy: one scatter per field, no torch op (nor its thread pool) per field
    input_ids = np.full(R * T, pad_token_id, dtype=np.int64)
    segment_ids = np.full(R * T, -1, dtype=np.int64)
    branch_ids = np.zeros(R * T, dtype=np.int8)
    # padding continues 0, 1, ... after each row's last token; real tokens overwrite the rest
    position_ids = (np.arange(T)[None, :] - used[:, None]).reshape(-1)
    input_ids[dest] = tokens
    position_ids[dest] = np.where(in_b, j - a[seg], j)  # rejected continues after the prompt
    segment_ids[dest] = seg
    branch_ids[dest] = np.where(in_b, BRANCH_REJECTED, np.where(in_a, branch_a[seg], BRANCH_PROMPT))

    # scored tokens: each completion token, predicted from the token before it (b's first
    # token from the prompt's last); a completion with no prompt loses its first token, as padded
    jj = np.where(in_b, j - pa, j - ps)  # index inside the completion
    scored = (in_a | in_b) & (ps + jj >= 1)
    pred = np.where(in_b & (jj == 0), ps - 1, j - 1)
    seq = np.where(in_b, seq_b[seg], seq_a[seg])[scored]
    by_seq = np.argsort(seq, kind="stable")  # sequence order; tokens in order inside each
    offsets = np.concatenate([[0], np.cumsum(np.bincount(seq, minlength=2 * P))])
    model_kwargs: dict = {
        name: torch.from_numpy(x.reshape(R, T))
        for name, x in (("input_ids", input_ids), ("position_ids", position_ids),
                        ("csd_segment_ids", segment_ids), ("csd_branch_ids", branch_ids))
    }  # fmt: skip
    if attn_backend in ("auto", "flash"):
        model_kwargs.update(_varlen(p, a, b, base, placed, row_of, used, per_row, T))
    return PairBatch(
        model_kwargs=model_kwargs,
        token_index=torch.from_numpy((base[seg] + pred)[scored][by_seq]),
        token_labels=torch.from_numpy(tokens[scored][by_seq]),
        seq_offsets=torch.from_numpy(offsets),
        layout="prefix" if prefix_sharing else "packed",
        **_pair_fields(examples),
        num_tokens=num_tokens,
        num_real_tokens=int(lengths.sum()),
        capacity=R * T,
        host_seq_offsets=tuple(offsets.tolist()),
        unscored_first=unscored_first_tensor(unscored),
        # TRL pads every chosen row and (unless all are SFT rows) every rejected one
        trl_numel=(2 * P if trl_rows > P else P) * _round_up(longest, pad_to_multiple_of),
    )


def _round_up(n: int, multiple: int | None) -> int:
    return -(-n // multiple) * multiple if multiple else n


def _varlen(p, a, b, base, placed, row_of, used, per_row, T: int) -> dict:
    """flash-attn's varlen metadata: query runs and the flat key positions each run sees.

    In row order, per segment: run 1 = queries [prompt, a] on keys [prompt, a]; run 2 (prefix
    sharing) = queries b on keys [prompt, b] (flash aligns causality bottom-right, so query j
    sees keys <= p + j); after a row's last segment its padding, one causal run of its own (so
    flash sees no empty softmax row). Runs and key ranges are ordered by one integer key.
    """
    R = used.size
    pp, pa, pb, start = p[placed], p[placed] + a[placed], b[placed], base[placed]
    o = np.arange(placed.size)
    pad = T - used  # (R,)
    pad_key = np.cumsum(per_row) - 1  # just before the next row's first segment
    has_b = pb > 0
    # query runs: key 3o (run 1), 3o + 1 (run 2), 3(next row's first o) - 1 (padding)
    q = np.concatenate([pa, pb, pad])
    k = np.concatenate([pa, pp + pb, pad])
    key = np.concatenate([3 * o, 3 * o + 1, 3 * pad_key + 2])
    keep = np.argsort(key, kind="stable")
    keep = keep[q[keep] > 0]
    q_lens, k_lens = q[keep], k[keep]
    # key ranges (start, length): run 1's, run 2's prompt then b, the padding's
    pad_start = np.arange(R) * T + used
    starts = np.concatenate([start, start, start + pa, pad_start])
    lens = np.concatenate([pa, np.where(has_b, pp, 0), pb, pad])
    rkey = np.concatenate([4 * o, 4 * o + 1, 4 * o + 2, 4 * pad_key + 3])
    order = np.argsort(rkey, kind="stable")
    starts, lens = starts[order], lens[order]
    kv_index = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
    out = dict(
        cu_seqlens_q=_cumsum32(q_lens),
        cu_seqlens_k=_cumsum32(k_lens),
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=int(k_lens.max()),
    )
    if kv_index.size != R * T or (kv_index != np.arange(R * T)).any():
        out["csd_kv_index"] = torch.from_numpy(kv_index)  # only prefix sharing needs the gather
    return out


def _cumsum32(lengths) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.as_tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out


def truncated_lengths(
    prompt, chosen, rejected, max_length: int | None, truncation_mode: str = "keep_start"
) -> tuple[np.ndarray, ...]:
    """(chosen's prompt, chosen, rejected's prompt, rejected) token counts kept by TRL's
    per-sequence truncation (`csd_fast.batch.truncate_pair`), for arrays of lengths."""
    p, c, r = (np.asarray(x, dtype=np.int64) for x in (prompt, chosen, rejected))
    if max_length is None:
        return p, c, p, r
    if truncation_mode == "keep_start":
        pc = pr = np.minimum(p, max_length)
        return pc, np.minimum(c, max_length - pc), pr, np.minimum(r, max_length - pr)
    if truncation_mode == "keep_end":
        c, r = np.minimum(c, max_length), np.minimum(r, max_length)
        return np.minimum(p, max_length - c), c, np.minimum(p, max_length - r), r
    raise ValueError(f"Unsupported truncation mode: {truncation_mode}")


def pair_costs(
    prompt: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    prefix_sharing: bool = False,
) -> np.ndarray:
    """Exact tokens `collate_packed` places for each pair (lengths in, (n,) int64 out).

    The planner's budget is then a hard bound: with keep_end the two sequences may keep prompts
    of different lengths, and such a pair is not shared (two segments), as in `collate_packed`.
    """
    pc, c, pr, r = truncated_lengths(prompt, chosen, rejected, max_length, truncation_mode)
    # an SFT row (no rejected at all) places no rejected segment, not even its prompt
    unshared = pc + c + np.where(np.asarray(rejected) > 0, pr + r, 0)
    if not prefix_sharing:
        return unshared
    return np.where(pc == pr, pc + c + r, unshared)
