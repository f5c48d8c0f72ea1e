"""The micro-batch contract shared by every layout, the forward, the losses and the trainer.

A `PairBatch` holds P preference pairs laid out in R rows of T tokens. Whatever the layout
(padded, packed, prefix-shared), the forward only needs three things from it:

* `model_kwargs`: what the backbone is called with (`input_ids`, `position_ids`, an attention
  mask or the varlen metadata the registered attention function reads);
* `token_index` / `token_labels`: the N completion tokens to score. `token_index[n]` is the flat
  position (row * T + t) whose hidden state *predicts* `token_labels[n]`. Prompt and padding
  positions never reach the LM head. In the prefix-shared layout the prompt's last position predicts
  the first token of both completions, so the same index can appear twice: a gather handles it,
  a shift could not;
* `seq_offsets`: the N tokens are ordered by sequence; sequence s owns
  `token_index[seq_offsets[s]:seq_offsets[s + 1]]`. Sequences 0..P-1 are the chosen completions of
  pairs 0..P-1, sequences P..2P-1 the rejected ones (TRL's `[chosen; rejected]` order).

    padded layout, P = 2 (TRL's collator; pad = ·, prompt = p, chosen = c, rejected = r):
        row 0  p p p c c          seq 0 (chosen, pair 0)   predicted from positions 2, 3
        row 1  p p c · ·          seq 1 (chosen, pair 1)   predicted from position 1
        row 2  p p p r ·          seq 2 (rejected, pair 0) predicted from position 2
        row 3  p p r r ·          seq 3 (rejected, pair 1) predicted from positions 1, 2

The packed and prefix-shared layouts are built in `csd_fast.packing` and drawn there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import chain

import numpy as np
import torch
from torch import Tensor

# the engine imports the kernels, never the reverse: one deterministic segment sum for both
from csd_fast.kernels.pair_loss import segment_sum  # noqa: F401 - re-exported for the engine

IGNORE_INDEX = -100
LAYOUTS = ("padded", "packed", "prefix")


@dataclass
class PairBatch:
    """P preference pairs in R rows of T tokens; see the module docstring for the layout rules."""

    model_kwargs: dict[str, Tensor]  # backbone inputs: input_ids (R, T), position_ids, masks
    token_index: Tensor  # (N,) long, flat position in R*T that predicts each scored token
    token_labels: Tensor  # (N,) long, the scored token ids
    seq_offsets: Tensor  # (2P+1,) long, sequence s owns tokens seq_offsets[s]:seq_offsets[s+1]
    pair_ids: Tensor  # (P,) long, dataset row of each pair (ref cache key, CLO grouping)
    layout: str = "padded"
    ref_chosen_logps: Tensor | None = None  # (P,) fp32, precomputed / cached reference
    ref_rejected_logps: Tensor | None = None  # (P,)
    group_ids: Tensor | None = None  # (P,) long, pairs sharing an id belong to one CLO example
    sft_mask: Tensor | None = None  # (P,) bool, pairs whose chosen feeds the NLL term (None: all)
    langs: tuple[str, ...] | None = None  # (P,) prompt language of each pair, for per-language logs
    num_tokens: int = 0  # tokens TRL counts for `num_tokens` (its padded attention-mask sum)
    num_real_tokens: int = 0  # tokens actually in the rows (after prefix sharing)
    capacity: int = 0  # R * T, for padding_efficiency
    # input_ids elements of TRL's padded rows for these pairs (transformers' flos estimate counts
    # them); 0 when that is `capacity` (the padded layouts)
    trl_numel: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)  # room for later features
    # seq_offsets as the collator computed them on the host: `to(device)` leaves this tuple
    # where it is, so the fused head plans its chunks without reading the device copy back
    host_seq_offsets: tuple[int, ...] | None = None
    # (2P,) long, 1 where a completion starts its row or segment (keep_end cut the whole prompt):
    # nothing predicts its first token, yet TRL counts that token in ipo's and sigmoid_norm's
    # |c| (its unshifted completion mask). None when no sequence is so, the usual case.
    unscored_first: Tensor | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def num_pairs(self) -> int:
        return int(self.pair_ids.numel())

    @property
    def input_ids(self) -> Tensor:
        return self.model_kwargs["input_ids"]

    def sequence_lengths(self) -> Tensor:
        """(2P,) number of scored tokens of each sequence."""
        return self.seq_offsets[1:] - self.seq_offsets[:-1]

    def padded_numel(self) -> int:
        return self.trl_numel or self.capacity

    def completion_lengths(self) -> Tensor:
        """(2P,) completion tokens of each sequence as TRL counts them for length normalisation:
        the scored ones plus an unscored first token (see `unscored_first`)."""
        lengths = self.sequence_lengths()
        return lengths if self.unscored_first is None else lengths + self.unscored_first

    def sequence_ids(self) -> Tensor:
        """(N,) sequence id of each scored token (0..P-1 chosen, P..2P-1 rejected)."""
        lengths = self.sequence_lengths()
        seq = torch.arange(lengths.numel(), device=lengths.device)
        # output_size from the host-known shape: without it repeat_interleave syncs to size it
        return torch.repeat_interleave(seq, lengths, output_size=self.token_labels.numel())

    def pin_memory(self) -> PairBatch:
        """Page-locked host copies (the DataLoader calls this with pin_memory=True)."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.pin_memory()
            elif isinstance(value, dict):
                value = {
                    k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in value.items()
                }
            pinned[f.name] = value
        return replace(self, **pinned)

    def to(self, device: torch.device | str) -> PairBatch:
        def move(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int | None,
    truncation_mode: str = "keep_start",
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """TRL 1.16's per-sequence truncation: ((prompt, chosen), (prompt, rejected)) after cutting.

    TRL truncates `prompt + completion` to `max_length` per sequence, then marks which of the kept
    tokens are completion. With keep_end the two sequences may keep different amounts of prompt,
    which is why the prompts are returned per sequence (prefix sharing needs them equal).
    """
    out = []
    for completion in (chosen_ids, rejected_ids):
        p, c = list(prompt_ids), list(completion)
        if max_length is not None and len(p) + len(c) > max_length:
            if truncation_mode == "keep_start":
                keep_p = min(len(p), max_length)
                p, c = p[:keep_p], c[: max_length - keep_p]
            elif truncation_mode == "keep_end":
                keep_c = min(len(c), max_length)
                c = c[len(c) - keep_c :]
                p = p[len(p) - (max_length - keep_c) :] if max_length > keep_c else []
            else:
                raise ValueError(
                    f"Unsupported truncation mode: {truncation_mode}, "
                    "expected 'keep_start' or 'keep_end'"
                )
        out.append((p, c))
    return out[0], out[1]


def collate_padded(
    examples: list[dict],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    pad_to_multiple_of: int | None = None,
) -> PairBatch:
    """TRL's `DataCollatorForPreference` layout: rows [prompt+chosen]*P then [prompt+rejected]*P.

    Each example has `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of ints) and optionally
    `row` (dataset row id), `group` (CLO example id), `ref_chosen_logps`, `ref_rejected_logps`.
    """
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    P = len(examples)
    seqs: list[tuple[list[int], list[int]]] = [None] * (2 * P)  # type: ignore[list-item]
    for i, ex in enumerate(examples):  # per pair: TRL's truncation
        seqs[i], seqs[P + i] = truncate_pair(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode
        )
    # SFT rows (csd_fast.data.sft) have no rejected side: no rows for it, only empty sequences
    R = P if all(not ex["rejected_ids"] for ex in examples) else 2 * P
    lens = np.array([(len(p), len(c)) for p, c in seqs[:R]], dtype=np.int64).reshape(R, 2)
    p, c = lens[:, 0], lens[:, 1]
    n = p + c  # (R,) tokens of each row
    T = int(n.max())
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    # per token, row-major: row r, column j; one scatter fills the rows
    tokens = np.fromiter(chain.from_iterable(chain.from_iterable(seqs[:R])), np.int64,
                         count=int(n.sum()))  # fmt: skip
    row = np.repeat(np.arange(R), n)
    j = np.arange(row.size) - (np.cumsum(n) - n)[row]
    dest = row * T + j
    input_ids = np.full(R * T, pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(R * T, dtype=np.int64)
    input_ids[dest] = tokens
    attention_mask[dest] = 1
    # token p+j is predicted from position p+j-1; a completion that starts the row (no prompt
    # kept) loses its first token, exactly as TRL's shifted completion mask does
    skip = ((p == 0) & (c > 0)).astype(np.int64)
    scored = j >= (p + skip)[row]
    counts = np.zeros(2 * P, dtype=np.int64)  # the empty rejected sequences of SFT rows stay 0
    counts[:R] = c - skip
    unscored = np.zeros(2 * P, dtype=np.int64)
    unscored[:R] = skip
    offsets = np.concatenate([[0], np.cumsum(counts)])
    position_ids = torch.arange(T, dtype=torch.long).expand(R, T).contiguous()
    return PairBatch(
        model_kwargs={
            "input_ids": torch.from_numpy(input_ids.reshape(R, T)),
            "attention_mask": torch.from_numpy(attention_mask.reshape(R, T)),
            "position_ids": position_ids,
        },
        token_index=torch.from_numpy((row * T + j - 1)[scored]),
        token_labels=torch.from_numpy(tokens[scored]),
        seq_offsets=torch.from_numpy(offsets),
        layout="padded",
        **_pair_fields(examples),
        num_tokens=int(n.sum()),
        num_real_tokens=int(n.sum()),
        capacity=R * T,
        host_seq_offsets=tuple(offsets.tolist()),
        unscored_first=unscored_first_tensor(unscored),
    )


def unscored_first_tensor(flags) -> Tensor | None:
    """`PairBatch.unscored_first` from (2P,) 0/1 flags: None when none is set (no work later)."""
    flags = np.asarray(flags, dtype=np.int64)
    return torch.from_numpy(flags) if flags.any() else None


def _pair_fields(examples: list[dict]) -> dict:
    """The per-pair tensors every layout carries (row ids, CLO groups, cached reference)."""
    out: dict = {
        "pair_ids": torch.tensor([int(ex.get("row", i)) for i, ex in enumerate(examples)]),
    }
    if all("group" in ex for ex in examples):
        out["group_ids"] = torch.tensor([int(ex["group"]) for ex in examples])
    if all("sft" in ex for ex in examples):
        out["sft_mask"] = torch.tensor([bool(ex["sft"]) for ex in examples])
    if all("lang" in ex for ex in examples):
        out["langs"] = tuple(str(ex["lang"]) for ex in examples)
    if all(ex.get("ref_chosen_logps") is not None for ex in examples):
        out["ref_chosen_logps"] = torch.tensor(
            [float(ex["ref_chosen_logps"]) for ex in examples], dtype=torch.float32
        )
        out["ref_rejected_logps"] = torch.tensor(
            [float(ex["ref_rejected_logps"]) for ex in examples], dtype=torch.float32
        )
    return out
