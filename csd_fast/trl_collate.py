"""A user's `data_collator` in the TRL face: its TRL-format batch read as a padded `PairBatch`.

    collator = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=8)   # TRL's, or yours
    trainer = DPOTrainer(model, args=args, train_dataset=ds, data_collator=collator)

TRL's DPOTrainer feeds its collator the tokenized examples (prompt_ids, chosen_ids,
rejected_ids, and ref_*_logps when precomputed) and reads back TRL's padded layout:

    input_ids, attention_mask, completion_mask: (2P, T), rows [prompt+chosen]*P, [prompt+rejected]*P

Token t of row r is scored when completion_mask[r, t] == 1 and t >= 1 (TRL shifts the mask by
one: position t - 1 predicts token t), which is exactly csd_fast.batch's padded layout, so
`batch_from_collated` turns the collator's output into the PairBatch the engine runs on. Extra
keys the collator adds are ignored (as TRL's loss ignores them). Tests: tests/test_trl_dropin.py.
"""

from __future__ import annotations

import torch

from csd_fast.batch import PairBatch, _pair_fields, unscored_first_tensor


def batch_from_collated(examples: list[dict], out: dict, model_inputs=None) -> PairBatch:
    """The padded PairBatch of a TRL-format collator output `out` for `examples`.

    `model_inputs` (a vision batch's pixel_values, image_grid_thw, ...) go to the model with the
    rows and no position ids: the model derives them (multimodal rotary positions included)."""
    missing = [k for k in ("input_ids", "attention_mask", "completion_mask") if k not in out]
    if missing:
        raise ValueError(
            f"data_collator returned {sorted(out)}: a DPO collator must return input_ids, "
            f"attention_mask and completion_mask (TRL's DataCollatorForPreference); missing "
            f"{missing}"
        )
    input_ids = torch.as_tensor(out["input_ids"], dtype=torch.long)
    attention = torch.as_tensor(out["attention_mask"], dtype=torch.long)
    completion = torch.as_tensor(out["completion_mask"], dtype=torch.long)
    P = len(examples)
    R, T = input_ids.shape
    if R != 2 * P or attention.shape != (R, T) or completion.shape != (R, T):
        raise ValueError(
            f"data_collator returned input_ids {tuple(input_ids.shape)}, attention_mask "
            f"{tuple(attention.shape)}, completion_mask {tuple(completion.shape)} for {P} "
            f"pairs: expected three ({2 * P}, T) tensors, chosen rows then rejected rows"
        )
    scored = (completion * attention).bool()
    scored[:, 0] = False  # nothing predicts a row's first token (TRL's shift drops it)
    rows, cols = scored.nonzero(as_tuple=True)  # row-major: sequence by sequence, in order
    counts = scored.sum(dim=1)
    offsets = torch.zeros(R + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    positions = torch.arange(T, dtype=torch.long).expand(R, T).contiguous()
    tokens = int(attention.sum())
    kwargs = {"input_ids": input_ids, "attention_mask": attention}
    if model_inputs is None:
        kwargs["position_ids"] = positions
    else:
        kwargs.update(model_inputs)
    return PairBatch(
        model_kwargs=kwargs,
        token_index=rows * T + cols - 1,
        token_labels=input_ids[rows, cols],
        seq_offsets=offsets,
        layout="padded",
        **_pair_fields(examples),
        num_tokens=tokens,
        num_real_tokens=tokens,
        capacity=R * T,
        unscored_first=unscored_first_tensor((completion * attention)[:, 0].numpy()),
    )


# what a TRL-format batch holds besides the model's other inputs (a vision batch's pixels, ...)
_TRL_KEYS = ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps",
             "ref_rejected_logps")  # fmt: skip


def extra_model_inputs(out: dict) -> dict:
    """The collated outputs that go to the model besides the rows (pixel_values, ...)."""
    return {k: v for k, v in out.items() if k not in _TRL_KEYS}


def custom_collate(collator, vision: bool = False):
    """examples -> PairBatch through the user's collator; a vision collator's other outputs
    (pixel_values, ...) go to the model."""

    def collate(examples):
        out = collator(list(examples))
        extra = extra_model_inputs(out) if vision else None
        return batch_from_collated(list(examples), out, model_inputs=extra)

    return collate
