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

from dataclasses import dataclass, field

import numpy as np
import torch

from csd_fast.batch import PairBatch, _pair_fields, truncate_pair

BRANCH_PROMPT, BRANCH_CHOSEN, BRANCH_REJECTED = 0, 1, 2
ATTN_BACKENDS = ("auto", "sdpa", "flash")


@dataclass
class _Segment:
    """One attention segment before placement: its tokens and what is scored inside it."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    # (sequence id, local position predicting the label, label), sequence id = pair or P + pair
    scored: list[tuple[int, int, int]] = field(default_factory=list)
    # varlen view: query runs (lengths, in segment order) and the local key indices of each run
    q_lens: list[int] = field(default_factory=list)
    k_local: list[list[int]] = field(default_factory=list)


def _plain_segment(prompt: list[int], completion: list[int], seq: int, branch: int) -> _Segment:
    p, n = len(prompt), len(prompt) + len(completion)
    seg = _Segment(
        prompt + completion, list(range(n)), [BRANCH_PROMPT] * p + [branch] * len(completion)
    )
    # a completion with no prompt kept loses its first token, exactly as the padded layout does
    seg.scored = [(seq, p + j - 1, t) for j, t in enumerate(completion) if p + j >= 1]
    if n:
        seg.q_lens, seg.k_local = [n], [list(range(n))]
    return seg


def _shared_segment(prompt: list[int], chosen: list[int], rejected: list[int], i: int, P: int):
    p, c, r = len(prompt), len(chosen), len(rejected)
    seg = _Segment(
        prompt + chosen + rejected,
        list(range(p + c)) + list(range(p, p + r)),
        [BRANCH_PROMPT] * p + [BRANCH_CHOSEN] * c + [BRANCH_REJECTED] * r,
    )
    seg.scored = [(i, p + j - 1, t) for j, t in enumerate(chosen) if p + j >= 1]
    for j, t in enumerate(rejected):
        pred = p - 1 if j == 0 else p + c + j - 1  # r0 is predicted from the prompt's last token
        if p + j >= 1:
            seg.scored.append((P + i, pred, t))
    # varlen: queries [prompt, chosen] see keys [prompt, chosen]; queries [rejected] see keys
    # [prompt, rejected] with flash's bottom-right causal alignment (query j sees keys <= p + j)
    if p + c:
        seg.q_lens.append(p + c)
        seg.k_local.append(list(range(p + c)))
    if r:
        seg.q_lens.append(r)
        seg.k_local.append(list(range(p)) + list(range(p + c, p + c + r)))
    return seg


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
) -> PairBatch:
    """Lay out P pairs without padding (packed) or with one shared prompt per pair (prefix).

    Each example has `prompt_ids`, `chosen_ids`, `rejected_ids` and optionally `row`, `group`,
    `sft`, `ref_chosen_logps`, `ref_rejected_logps` (as for `collate_padded`). `attn_backend`
    picks the metadata: "sdpa" (dense-mask ids only), "flash" or "auto" (both).
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    P = len(examples)
    segments: list[_Segment] = []
    num_tokens = 0
    for i, ex in enumerate(examples):
        (pc, c), (pr, r) = truncate_pair(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode
        )
        num_tokens += len(pc) + len(c) + (len(pr) + len(r) if ex["rejected_ids"] else 0)
        if prefix_sharing and pc == pr:
            segments.append(_shared_segment(pc, c, r, i, P))
        else:
            segments.append(_plain_segment(pc, c, i, BRANCH_CHOSEN))
            if ex["rejected_ids"]:  # an SFT row (csd_fast.data.sft) has no rejected side
                segments.append(_plain_segment(pr, r, P + i, BRANCH_REJECTED))
    segments = [s for s in segments if s.tokens]
    lengths = [len(s.tokens) for s in segments]
    rows = _place_rows(lengths, row_capacity)
    R, T = len(rows), max(max(sum(lengths[s] for s in row) for row in rows), 1)

    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    branch_ids = torch.zeros((R, T), dtype=torch.int8)
    scored: list[list[tuple[int, int]]] = [[] for _ in range(2 * P)]  # per sequence (index, label)
    q_lens: list[int] = []
    kv_index: list[int] = []
    k_lens: list[int] = []
    for r, row in enumerate(rows):
        col = 0
        for s in row:
            seg, n = segments[s], lengths[s]
            input_ids[r, col : col + n] = torch.tensor(seg.tokens)
            position_ids[r, col : col + n] = torch.tensor(seg.positions)
            segment_ids[r, col : col + n] = s
            branch_ids[r, col : col + n] = torch.tensor(seg.branches, dtype=torch.int8)
            base = r * T + col
            for seq, pos, label in seg.scored:
                scored[seq].append((base + pos, label))
            for ql, keys in zip(seg.q_lens, seg.k_local, strict=True):
                q_lens.append(ql)
                k_lens.append(len(keys))
                kv_index.extend(base + k for k in keys)
            col += n
        if col < T:  # trailing padding: its own causal run, so flash sees no empty softmax row
            position_ids[r, col:] = torch.arange(T - col)
            q_lens.append(T - col)
            k_lens.append(T - col)
            kv_index.extend(range(r * T + col, r * T + T))

    index = [ix for seq in scored for ix, _ in seq]
    labels = [lab for seq in scored for _, lab in seq]
    offsets = [0]
    for seq in scored:
        offsets.append(offsets[-1] + len(seq))
    model_kwargs: dict = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "csd_segment_ids": segment_ids,
        "csd_branch_ids": branch_ids,
    }
    if attn_backend in ("auto", "flash"):
        model_kwargs.update(
            cu_seqlens_q=_cumsum32(q_lens),
            cu_seqlens_k=_cumsum32(k_lens),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
        )
        if kv_index != list(range(R * T)):  # only prefix sharing needs the key gather
            model_kwargs["csd_kv_index"] = torch.tensor(kv_index, dtype=torch.long)
    return PairBatch(
        model_kwargs=model_kwargs,
        token_index=torch.tensor(index, dtype=torch.long),
        token_labels=torch.tensor(labels, dtype=torch.long),
        seq_offsets=torch.tensor(offsets, dtype=torch.long),
        layout="prefix" if prefix_sharing else "packed",
        **_pair_fields(examples),
        num_tokens=num_tokens,
        num_real_tokens=sum(lengths),
        capacity=R * T,
    )


def _cumsum32(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
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
