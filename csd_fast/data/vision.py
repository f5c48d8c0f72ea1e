"""Vision preference rows (`image` / `images` columns) for vision-language models, as TRL 1.16.

    pairs = vision_pairs(dataset, name="train")     # rows kept raw: images are processed per batch
    collate = VisionCollator(processor, max_length=1024)
    batch = collate([dict(pairs[i]) for i in (0, 1)])   # a padded PairBatch with pixel_values

TRL keeps a vision dataset unprepared (turning every image into pixel values up front costs too
much disk and memory) and processes each batch in its collator; so does this module. Per batch:

  1. conversational rows get an image placeholder per image before the first user message, and
     are rendered as text with the processor's chat template (the prompt with the generation
     prompt, the completions as what the full conversation adds to it);
  2. the processor encodes the prompts with their images (left-padded; each image's
     placeholder expands to its visual tokens) and the completions as text (right-padded);
     rows are [prompt + chosen] * P then [prompt + rejected] * P, every image given twice;
  3. each row's tokens are flushed left (its prompt padding moves to its end), then the rows are
     cut to max_length (keep_start);
  4. what the processor returned besides the text (pixel_values, image_grid_thw,
     mm_token_type_ids, token_type_ids, ...) goes to the model with the rows: no position ids
     are given, so a model with multimodal rotary positions (Qwen2-VL) computes its own.

Only the padded layout exists for these rows (an image's tokens cannot be packed apart from its
pixel values), and no reference table: the reference runs live, as TRL requires.
Tests: tests/test_vision_dpo.py (against TRL's DPOTrainer on tiny LLaVA and Qwen2-VL models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from csd_fast.data.errors import PreferenceDataError
from csd_fast.data.formats import extract_prompt

_TEXT_KEYS = ("input_ids", "attention_mask")


def is_vision_sample(sample) -> bool:
    return isinstance(sample, dict) and ("image" in sample or "images" in sample)


def is_vision_dataset(dataset) -> bool:
    """Whether a dataset's rows carry `image` / `images` (a datasets.Dataset, a stream or a
    list of dicts; a file path holds text rows)."""
    if isinstance(dataset, str | bytes) or dataset is None:
        return False
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return "image" in names or "images" in names
    if isinstance(dataset, list | tuple):
        return bool(dataset) and is_vision_sample(dataset[0])
    try:  # a stream without declared columns: its first row tells
        return is_vision_sample(next(iter(dataset)))
    except (TypeError, StopIteration):
        return False


def is_processor(obj) -> bool:
    from transformers import ProcessorMixin

    return isinstance(obj, ProcessorMixin)


def text_tokenizer(processing_class):
    """The tokenizer of a processor (or the tokenizer itself)."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


@dataclass
class VisionPairs:
    """Vision preference rows, read lazily: pair i is row `rows[i]` of `dataset`, its images
    decoded only when a batch needs them (a whole VLM set of decoded images does not fit)."""

    dataset: Any  # a datasets.Dataset or a list of dicts
    texts: list[dict]  # per pair: prompt, chosen, rejected (+ tools / chat_template_kwargs)
    rows: np.ndarray  # (n,) int64 source row of each pair
    source: str = "<Dataset>"
    format: str = "vision"
    lang: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        record = self.dataset[row]
        images = [record["image"]] if "image" in record else record.get("images")
        if images is None:
            images = []
        if not isinstance(images, list | tuple):
            raise PreferenceDataError(self.source, row, "images", "must be a list of images")
        return {**self.texts[i], "images": list(images), "row": row}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def is_sft(self) -> bool:
        return False

    def groups(self) -> None:
        return None  # CLO groups are a text-pipeline column

    @property
    def num_skipped(self) -> int:
        return 0


_TEXT_FIELDS = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "lang")


def vision_pairs(dataset, source: str = "<Dataset>") -> VisionPairs:
    """A map-style vision dataset's pairs, its text fields checked (prompt explicit or implicit,
    chosen, rejected) without decoding a single image."""
    names = getattr(dataset, "column_names", None)
    text_rows = dataset
    if names is not None:  # a datasets.Dataset: read the text columns only
        text_rows = dataset.select_columns([c for c in names if c in _TEXT_FIELDS])
    texts, langs = [], []
    for i, row in enumerate(text_rows):
        row = {k: v for k, v in dict(row).items() if k in _TEXT_FIELDS}
        missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
        if missing:
            raise PreferenceDataError(source, i, missing[0], "is missing (a vision preference "
                                      "row needs chosen and rejected)")  # fmt: skip
        if "prompt" not in row:
            row.update(extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]}))
        langs.append(row.pop("lang", None))
        texts.append(row)
    lang = np.array(langs, dtype=object) if any(x is not None for x in langs) else None
    rows = np.arange(len(texts), dtype=np.int64)
    return VisionPairs(dataset, texts, rows, source, lang=lang)


def with_image_placeholders(messages: list[dict], num_images: int) -> list[dict]:
    """Structured content for every message, one {"type": "image"} block per image placed
    before the text of the first user message whose content is plain text."""
    out, placed = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                blocks = [{"type": "image"} for _ in range(num_images)] + blocks
                placed = True
            message = {**message, "content": blocks}
        elif message["role"] == "user" and isinstance(content, list):
            placed = placed or any(b.get("type") == "image" for b in content)
        out.append(message)
    given = sum(b.get("type") == "image" for m in out for b in (m.get("content") or [])
                if isinstance(m.get("content"), list))  # fmt: skip
    if given != num_images:
        raise ValueError(f"{given} image placeholder(s) in the prompt for {num_images} image(s)")
    return out


def render_conversation(example: dict, processor) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of a conversational row through the chat template: the
    completions are what the full conversation adds to the prompt's rendering."""
    kw = dict(example.get("chat_template_kwargs") or {})
    tools = example.get("tools")
    prompt_msgs = with_image_placeholders(example["prompt"], len(example["images"]))
    last = prompt_msgs[-1]["role"]
    prompt = processor.apply_chat_template(
        prompt_msgs, tools=tools, tokenize=False, add_generation_prompt=last != "assistant",
        continue_final_message=last == "assistant", **kw,
    )  # fmt: skip
    full = {}
    for side in ("chosen", "rejected"):
        msgs = prompt_msgs + with_image_placeholders(example[side], 0)
        full[side] = processor.apply_chat_template(msgs, tools=tools, tokenize=False, **kw)
        # a template may render the generation prompt differently from the continued
        # conversation (DeepSeek-R1's tool-call token): keep the common part as the prompt
        n = 0
        while n < min(len(prompt), len(full[side])) and prompt[n] == full[side][n]:
            n += 1
        prompt = prompt[:n]
    return prompt, full["chosen"][len(prompt) :], full["rejected"][len(prompt) :]


def flush_left(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's kept positions (mask 1) to its start, in order, and drop the columns no
    row keeps; the other tensors move with the mask."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # kept first
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    moved = [t.gather(1, order)[:, :width] for t in (mask, *tensors)]
    return tuple(moved)


class VisionCollator:
    """Vision preference examples -> a padded PairBatch whose model inputs carry the images."""

    def __init__(self, processor, max_length: int | None):
        self.processor, self.max_length = processor, max_length
        tok = text_tokenizer(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, examples: list[dict]) -> dict:
        """The TRL-format batch: input_ids, attention_mask, completion_mask and the images'."""
        images = [ex["images"] for ex in examples] * 2  # the rejected rows see them again
        if all(not x for x in images):
            images = None  # the processor wants at least one image, or none at all
        texts = [self._texts(ex) for ex in examples]
        prompts = [t[0] for t in texts] * 2
        p = self.processor
        common = dict(padding=True, return_tensors="pt", add_special_tokens=False)
        prompt = p(images=images, text=prompts, padding_side="left", **common)
        comps = [p(text=[t[k] for t in texts], padding_side="right", **common) for k in (1, 2)]
        width = max(c["input_ids"].shape[1] for c in comps)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)
        comp_ids = torch.cat([pad(c["input_ids"], self.pad_id) for c in comps])
        comp_mask = torch.cat([pad(c["attention_mask"], 0) for c in comps])
        ids = torch.cat([prompt["input_ids"], comp_ids], dim=1)
        mask = torch.cat([prompt["attention_mask"], comp_mask], dim=1)
        scored = torch.cat([torch.zeros_like(prompt["attention_mask"]), comp_mask], dim=1)
        extra = {}
        if "token_type_ids" in prompt:  # Gemma 3: the completions' own types follow the prompt's
            types = [pad(c["token_type_ids"], 0) for c in comps]
            extra["token_type_ids"] = torch.cat([prompt["token_type_ids"], torch.cat(types)], 1)
        if "mm_token_type_ids" in prompt:  # Qwen2.5-VL: completions hold no image token
            mm = prompt["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(comp_ids)], 1)
        mask, ids, scored, *moved = flush_left(mask, ids, scored, *extra.values())
        out = {k: v for k, v in prompt.items() if k not in (*_TEXT_KEYS, *extra)}
        out.update(zip(extra, moved, strict=True))
        cut = slice(None, self.max_length)  # keep_start
        out["input_ids"], out["attention_mask"], out["completion_mask"] = (
            ids[:, cut], mask[:, cut], scored[:, cut])  # fmt: skip
        for k in extra:
            out[k] = out[k][:, cut]
        return out

    def _texts(self, ex: dict) -> tuple[str, str, str]:
        if isinstance(ex["prompt"], list):
            return render_conversation(ex, self.processor)
        return ex["prompt"], ex["chosen"], ex["rejected"]

    def __call__(self, examples: list[dict]):
        from csd_fast.trl_collate import batch_from_collated, extra_model_inputs

        out = self.encode(examples)
        return batch_from_collated(examples, out, model_inputs=extra_model_inputs(out))


def rows_without_images(dataset) -> int:
    """How many rows have no image, read from the arrow table (no image decoded)."""
    table = getattr(dataset, "data", None)
    names = getattr(dataset, "column_names", None) or []
    if table is not None and ("images" in names or "image" in names):
        import pyarrow.compute as pc

        column = table.column("images" if "images" in names else "image")
        if "images" in names:
            lengths = pc.fill_null(pc.list_value_length(column), 0)
            return int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
        return int(column.null_count)
    rows = [dict(r) for r in dataset]
    return sum(1 for r in rows if not (r.get("images") or r.get("image") is not None))


def prepare_vision_set(dataset, name: str, args, processing_class, world_size: int = 1):
    """A trainer's vision set, after TRL's checks (same errors) and csd-fast's own."""
    if not is_processor(processing_class):
        raise ValueError(
            "The dataset appears to be vision-related (contains 'image' or 'images' keys), but "
            "the provided model does not seem to be a vision-language model. Please check your "
            "model and dataset."
        )
    if args.max_length is not None and args.truncation_mode == "keep_end":
        raise ValueError(
            "truncation_mode='keep_end' is not supported for vision-language models: image "
            "tokens sit in the prompt, which keep_end may cut away while the pixel values stay. "
            "Use truncation_mode='keep_start' (the default) or set max_length=None."
        )
    if args.precompute_ref_log_probs or args.ref_cache_dir:
        raise ValueError(
            "precompute_ref_log_probs=True / ref_cache_dir is not supported for vision "
            "datasets: their rows are processed per batch (as TRL does), so the reference runs "
            "live. Set precompute_ref_log_probs=False."
        )
    if args.prefix_sharing or args.max_tokens_per_batch:
        raise NotImplementedError(
            "prefix_sharing / max_tokens_per_batch with vision rows: these rows use the padded "
            "layout only (an image's tokens travel with its pixel values)"
        )
    if args.pad_to_multiple_of is not None:
        raise NotImplementedError(
            "Padding to a multiple of a value is not yet implemented for vision-language "
            "modeling and prompt-completion data."
        )
    if world_size > 1 and rows_without_images(dataset):
        raise NotImplementedError(
            f"{name} dataset: rows without images under torchrun: a batch with no image skips "
            "the vision tower on its rank while other ranks run it, so FSDP's collectives "
            "would not match; give every row an image, or train on one process"
        )
    return vision_pairs(dataset, source=f"<{name} dataset>")
