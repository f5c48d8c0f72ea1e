"""TRL 1.16's SFT formats, tokenized as pairs with an empty rejected side (`--loss_type sft`).

    prompt-completion  {"prompt": "The sky is", "completion": " blue."}          loss on completion
                       {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant"...}]}
    messages           {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    text               {"text": "The sky is blue."}                               loss on all tokens

The Max-R and "in-language" baselines of contrastive self-distillation are SFT on the best
response; writing them as pairs (chosen = completion, rejected = nothing) lets them run through
the same engine: packing, the fused head, the token budget, checkpoints and metrics.

Tokenization follows `trl.SFTTrainer` 1.16 (`tokenize_fn` in sft_trainer.py): plain-text
completions and texts get EOS appended when missing; a conversational prompt is rendered with
`add_generation_prompt=True`; the completion starts where the tokenized prompt and the tokenized
prompt+completion diverge (completion-only loss, TRL's default for prompt-completion data);
`messages` and `text` rows train on every token (no assistant-only masking: TRL needs
`{% generation %}` markers for that). A row whose prompt alone fills `max_length` (nothing left to
learn) is a bad row, as in the preference path. The first token of a prompt-less sequence is
never a target: nothing predicts it (the same as a causal LM's shifted cross-entropy).

Called by `tokenize_pairs` when the rows have no `chosen`; run the tests with
`python -m pytest tests/test_sft.py -q`.
"""

from __future__ import annotations

import json

from csd_fast.data.errors import PreferenceDataError
from csd_fast.data.formats import _check_extras, _check_messages, _check_text
from csd_fast.data.sources import RowSource

SFT_KINDS = ("prompt-completion", "messages", "text")


def is_sft_rows(rows: list[dict]) -> bool:
    """True when the first row is in an SFT format (no `chosen`, one of the SFT columns)."""
    if not rows:
        return False
    first = rows[0]
    return "chosen" not in first and any(k in first for k in ("completion", "messages", "text"))


def _kind_of(row: dict) -> str:
    if "completion" in row or "prompt" in row:
        return "prompt-completion"
    return "messages" if "messages" in row else "text"


def check_sft_row(row: dict, i: int, src: RowSource) -> tuple[str, bool]:
    """(kind, conversational) of a valid SFT row, else a `PreferenceDataError` naming the field."""
    kind = _kind_of(row)
    if kind == "prompt-completion":
        for name in ("prompt", "completion"):
            if name not in row:
                raise src.error(
                    i, name, f"missing column; columns: {sorted(row)}", "missing_column"
                )
        conversational = isinstance(row["completion"], list)
        if isinstance(row["prompt"], list) != conversational:
            raise src.error(
                i, "prompt", "mixed formats: prompt and completion must both be strings or both "
                "lists of messages", "mixed_format",
            )  # fmt: skip
        if conversational:
            _check_messages(row["prompt"], "prompt", src, i, "prompt")
            _check_messages(row["completion"], "completion", src, i, "completion")
        else:
            _check_text(row["prompt"], "prompt", src, i, completion=False)
            _check_text(row["completion"], "completion", src, i, completion=True)
    elif kind == "messages":
        conversational = True
        _check_messages(row["messages"], "messages", src, i, "completion")
    else:
        conversational = False
        _check_text(row["text"], "text", src, i, completion=True)
    _check_extras(row, src, i)
    return kind, conversational


def tokenize_sft_rows(
    src: RowSource,
    raw: list[dict],
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str,
    on_bad_row: str,
) -> tuple[list[tuple[int, list[int], list[int], list[int]]], list[PreferenceDataError], str]:
    """(row, prompt_ids, completion_ids, []) per good row, the bad rows, and the format name."""
    stop = on_bad_row == "error"
    bad: list[PreferenceDataError] = []
    good: list[tuple[int, str, bool]] = []
    for i, row in enumerate(raw):
        try:
            kind, conv = check_sft_row(row, i, src)
            if good and (kind, conv) != good[0][1:]:
                want = f"{good[0][1]}{' (conversational)' if good[0][2] else ''}"
                raise src.error(
                    i, None, f"mixed formats: this row is {kind}, the dataset is {want} "
                    f"(like row {good[0][0]})", "mixed_format",
                )  # fmt: skip
        except PreferenceDataError as e:
            if stop:
                raise
            bad.append(e)
            continue
        good.append((i, kind, conv))
    if not good:
        return [], bad, "sft"
    kind, conv = good[0][1:]
    out = []
    for i, _, _ in good:
        try:
            prompt_ids, completion_ids = _encode(raw[i], kind, conv, tokenizer)
        except Exception as e:  # jinja raises its own types (TemplateError, TypeError, ...)
            err = src.error(i, None, f"chat template failed: {type(e).__name__}: {e}", "template")
            if stop:
                raise err from e
            bad.append(err)
            continue
        err = None
        if max_length is not None and truncation_mode == "keep_start" and prompt_ids:
            if len(prompt_ids) >= max_length:
                err = src.error(
                    i, "prompt", f"prompt is {len(prompt_ids)} tokens, >= max_length "
                    f"{max_length}: no completion token would be trained", "prompt_too_long",
                )  # fmt: skip
        if err is None and len(prompt_ids) + len(completion_ids) < 2:
            err = src.error(i, None, "fewer than 2 tokens: nothing to predict", "too_short")
        if err is None and not completion_ids:
            err = src.error(i, "completion", "completion has no tokens", "empty_completion_tokens")
        if err is not None:
            if stop:
                raise err
            bad.append(err)
            continue
        out.append((i, prompt_ids, completion_ids, []))
    bad.sort(key=lambda e: e.row if e.row is not None else -1)
    return out, bad, f"sft {kind}" + (" (conversational)" if conv else "")


def _encode(row: dict, kind: str, conversational: bool, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids): the completion is where prompt and prompt+completion split."""
    eos = tokenizer.eos_token
    if not conversational and eos is None:
        raise ValueError("the tokenizer has no eos_token: TRL appends it to every text completion")
    if kind == "text":
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        return [], list(tokenizer(text=text)["input_ids"])
    tools = row.get("tools")
    kwargs = {
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        **(row.get("chat_template_kwargs") or {}),
    }
    if kind == "messages":
        return [], _chat(tokenizer, row["messages"], **kwargs)
    if conversational:
        p = _chat(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs)
        pc = _chat(tokenizer, row["prompt"] + row["completion"], **kwargs)
    else:
        completion = row["completion"]
        completion = completion if completion.endswith(eos) else completion + eos
        p = list(tokenizer(text=row["prompt"])["input_ids"])
        pc = list(tokenizer(text=row["prompt"] + completion)["input_ids"])
    n = 0
    for a, b in zip(p, pc, strict=False):
        if a != b:
            break
        n += 1
    return pc[:n], pc[n:]


def _chat(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])
