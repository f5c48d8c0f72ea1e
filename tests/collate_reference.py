"""Plain per-token collators: the truth the vectorised ones (csd_fast.packing, csd_fast.batch)
are compared against, bit for bit, in tests/test_collate.py.

These are the collators as they were before vectorisation: one Python step per token, written
for reading, not speed. They share truncation, placement and the per-pair fields with the engine
(`truncate_pair`, `_place_rows`, `_pair_fields`) so that only the per-token layout is compared.
"""

from __future__ import annotations

import torch

from csd_fast.batch import _pair_fields, truncate_pair
from csd_fast.packing import BRANCH_CHOSEN, BRANCH_PROMPT, BRANCH_REJECTED, _place_rows


def _segment(prompt, a, b, seq_a, seq_b, branch_a):
    """tokens, positions, branches, scored (seq, local pred, label), varlen runs (q, keys)."""
    p, na, nb = len(prompt), len(a), len(b)
    tokens = prompt + a + b
    positions = list(range(p + na)) + list(range(p, p + nb))
    branches = [BRANCH_PROMPT] * p + [branch_a] * na + [BRANCH_REJECTED] * nb
    scored = [(seq_a, p + j - 1, t) for j, t in enumerate(a) if p + j >= 1]
    for j, t in enumerate(b):
        if p + j >= 1:  # b's first token is predicted from the prompt's last
            scored.append((seq_b, p - 1 if j == 0 else p + na + j - 1, t))
    runs = []
    if p + na:
        runs.append((p + na, list(range(p + na))))
    if nb:
        runs.append((nb, list(range(p)) + list(range(p + na, p + na + nb))))
    return tokens, positions, branches, scored, runs


def collate_packed_reference(examples, pad_token_id, *, max_length=None,
                             truncation_mode="keep_start", prefix_sharing=False,
                             row_capacity=None, attn_backend="auto"):  # fmt: skip
    """-> dict of the fields a packed PairBatch carries (model_kwargs flattened in)."""
    P = len(examples)
    segments, num_tokens = [], 0
    for i, ex in enumerate(examples):
        (pc, c), (pr, r) = truncate_pair(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode
        )
        num_tokens += len(pc) + len(c) + (len(pr) + len(r) if ex["rejected_ids"] else 0)
        if prefix_sharing and pc == pr:
            segments.append(_segment(pc, c, r, i, P + i, BRANCH_CHOSEN))
        else:
            segments.append(_segment(pc, c, [], i, -1, BRANCH_CHOSEN))
            if ex["rejected_ids"]:
                segments.append(_segment(pr, r, [], P + i, -1, BRANCH_REJECTED))
    segments = [s for s in segments if s[0]]
    lengths = [len(s[0]) for s in segments]
    rows = _place_rows(lengths, row_capacity)
    R, T = len(rows), max(max(sum(lengths[s] for s in row) for row in rows), 1)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    branch_ids = torch.zeros((R, T), dtype=torch.int8)
    scored = [[] for _ in range(2 * P)]
    q_lens, k_lens, kv_index = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for s in row:
            tokens, positions, branches, seg_scored, runs = segments[s]
            for t in range(len(tokens)):  # one token at a time
                input_ids[r, col + t] = tokens[t]
                position_ids[r, col + t] = positions[t]
                segment_ids[r, col + t] = s
                branch_ids[r, col + t] = branches[t]
            base = r * T + col
            for seq, pos, label in seg_scored:
                scored[seq].append((base + pos, label))
            for q, keys in runs:
                q_lens.append(q)
                k_lens.append(len(keys))
                kv_index += [base + k for k in keys]
            col += len(tokens)
        for t in range(col, T):
            position_ids[r, t] = t - col
        if col < T:
            q_lens.append(T - col)
            k_lens.append(T - col)
            kv_index += list(range(r * T + col, r * T + T))
    out = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "csd_segment_ids": segment_ids,
        "csd_branch_ids": branch_ids,
    }
    if attn_backend in ("auto", "flash"):
        out["cu_seqlens_q"] = _cumsum32(q_lens)
        out["cu_seqlens_k"] = _cumsum32(k_lens)
        out["max_seqlen_q"], out["max_seqlen_k"] = max(q_lens), max(k_lens)
        if kv_index != list(range(R * T)):
            out["csd_kv_index"] = torch.tensor(kv_index, dtype=torch.long)
    return _with_scored(out, scored, examples, num_tokens, sum(lengths), R * T)


def collate_padded_reference(examples, pad_token_id, max_length=None,
                             truncation_mode="keep_start", pad_to_multiple_of=None):  # fmt: skip
    """-> dict of the fields a padded PairBatch carries (model_kwargs flattened in)."""
    P = len(examples)
    seqs = [None] * (2 * P)
    for i, ex in enumerate(examples):
        seqs[i], seqs[P + i] = truncate_pair(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode
        )
    R = P if all(not ex["rejected_ids"] for ex in examples) else 2 * P
    T = max(len(p) + len(c) for p, c in seqs[:R])
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    scored = [[] for _ in range(2 * P)]
    for r, (p, c) in enumerate(seqs[:R]):
        for t, tok in enumerate(p + c):
            input_ids[r, t] = tok
            attention_mask[r, t] = 1
        for j, tok in enumerate(c):
            if len(p) + j >= 1:
                scored[r].append((r * T + len(p) + j - 1, tok))
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(T, dtype=torch.long).expand(R, T).contiguous(),
    }
    n = int(attention_mask.sum())
    return _with_scored(out, scored, examples, n, n, R * T)


def _with_scored(out, scored, examples, num_tokens, num_real_tokens, capacity):
    offsets = [0]
    for seq in scored:
        offsets.append(offsets[-1] + len(seq))
    out.update(
        token_index=torch.tensor([ix for seq in scored for ix, _ in seq], dtype=torch.long),
        token_labels=torch.tensor([lab for seq in scored for _, lab in seq], dtype=torch.long),
        seq_offsets=torch.tensor(offsets, dtype=torch.long),
        num_tokens=num_tokens,
        num_real_tokens=num_real_tokens,
        capacity=capacity,
        **_pair_fields(examples),
    )
    return out


def _cumsum32(lengths):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out
