"""Test helpers for the data pipeline: a tiny local tokenizer and TRL's own preprocessing as truth.

Nothing here downloads: the tokenizer is a byte-level BPE trained in ~0.1 s on the sentences below,
so tokens merge across a prompt/completion boundary as real tokenizers do (which is what makes the
common-prefix rule matter). Also the source builders, the tokenizer-call counter and the CLO tables
of tests/test_data.py and tests/test_data_clo.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
SPECIAL += ["<think>", "</think>", "<|tools|>"]

# A generation prompt that differs from the rendered conversation when `think` is set, as in
# Gemma/Qwen-style templates: the prompt alone is then not a prefix of prompt+completion.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if think %}<think></think>{% endif %}{% endif %}"
)

SENTENCES = [
    "The sky is blue. The sky is green. The sun is in the sky, not in the sea.",
    "What color is the sky? It is blue. It is green. Where is the sun?",
    "Hello world, how are you today? I am fine, thank you very much.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Le ciel est bleu. Der Himmel ist blau. El cielo es azul.",
]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A PreTrainedTokenizerFast with BOS added to plain text, EOS/PAD set and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = chat_template
    return fast


IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def trl_prepare(rows: list[dict], tokenizer, max_length=1024, truncation_mode="keep_start"):
    """TRL 1.16's `DPOTrainer._prepare_dataset` on `rows`, without building a trainer."""
    from datasets import Dataset
    from trl import DPOTrainer

    stub = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode
    )
    ds = rows if isinstance(rows, Dataset) else Dataset.from_list(rows)
    out = DPOTrainer._prepare_dataset(stub, ds, tokenizer, args, "train")
    return [{k: ex[k] for k in IDS} for ex in out]


def pair_ids(pairs) -> list[dict]:
    """The token ids of every pair in a TokenizedPairs, in trl_prepare's shape."""
    return [{k: pairs[i][k] for k in IDS} for i in range(len(pairs))]


def count_tokenizer_calls(monkeypatch, tok) -> dict:
    """Count every call into the tokenizer (plain text and chat template) in calls["n"]."""
    calls = {"n": 0}
    cls = type(tok)
    for name in ("__call__", "apply_chat_template"):
        orig = getattr(cls, name)

        def wrapped(self, *a, _orig=orig, **kw):
            calls["n"] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(cls, name, wrapped)
    return calls


def write_jsonl(path, rows, blank_first=False):
    lines = ([""] if blank_first else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_source(kind: str, rows: list[dict], tmp_path):
    """`rows` as a .jsonl / .parquet file, a Dataset, a DatasetDict or a save_to_disk folder."""
    import datasets

    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "train.jsonl", rows))
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "train.parquet"))
        return str(tmp_path / "train.parquet")
    if kind == "dataset":
        return ds
    if kind == "datasetdict":
        return datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    ds.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {
        "prompt": "Where is the sun?",
        "chosen": " The sun is in the sky.",
        "rejected": " In the sea.",
    },
    # the prompt ends mid-word: tokens merge across the boundary, the prefix rule decides
    {"prompt": "Hello wor", "chosen": "ld, how are you?</s>", "rejected": "ld! I am fine."},
    {"prompt": "", "chosen": "Paris is the capital.", "rejected": "Berlin is the capital."},
]

IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Where is the sun? In the sky.", "rejected": "Where is the sun? In the sea."},
    {"chosen": "Le ciel est bleu.", "rejected": "Le ciel est bleu. Der Himmel ist blau."},
]


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {
        "prompt": [_msg("user", "What color is the sky?")],
        "chosen": [_msg("assistant", "It is blue.")],
        "rejected": [_msg("assistant", "It is green.")],
    },
    {
        "prompt": [_msg("system", "Be brief."), _msg("user", "Where is the sun?")],
        "chosen": [_msg("assistant", "In the sky.")],
        "rejected": [_msg("assistant", "In the sea.")],
    },
]

IMPLICIT_CONVERSATIONAL = [
    {
        "chosen": [_msg("user", "What color is the sky?"), _msg("assistant", "It is blue.")],
        "rejected": [_msg("user", "What color is the sky?"), _msg("assistant", "It is green.")],
    },
    {
        "chosen": [_msg("user", "Hello world"), _msg("assistant", "I am fine.")],
        "rejected": [_msg("user", "Hello world"), _msg("assistant", "How are you?")],
    },
]

# CLO: English SFT examples and their translations, ids out of order and two target languages
TRANSLATIONS = [
    {"id": "a", "lang": "en", "prompt": "What color is the sky?", "response": " It is blue."},
    {"id": "b", "lang": "fr", "prompt": "Le ciel?", "response": " Le ciel est bleu."},
    {"id": "a", "lang": "de", "prompt": "Der Himmel?", "response": " Der Himmel ist blau."},
    {"id": "b", "lang": "en", "prompt": "The sky?", "response": " The sky is blue."},
]

_T = TRANSLATIONS
BAD_TRANSLATIONS = {  # rows, (row, field) of the error, words in the reason
    "no_translation": (_T[:2] + _T[3:], (0, "id"), "'a' has no translation"),
    "no_english": (_T[1:], (1, "id"), "'a' has no 'en' row"),
    "two_english": (_T + [{**_T[0], "prompt": "Sky?"}], (4, "lang"), "(row 0)"),
    "two_targets": (_T + [{**_T[2], "lang": "es"}], (4, "lang"), "target-language row (row 2)"),
    "missing_field": (_T[:3] + [{"id": "b", "lang": "en", "prompt": "x"}], (3, "response"), ""),
    "bad_id": (_T + [{**_T[0], "id": 1.5}], (4, "id"), "got float"),
}


def _with(i, **kw):
    rows = [{**r, "group": g, "sft": g == 1} for r, g in zip(STANDARD, [0, 0, 1, 1], strict=True)]
    rows[i] = {**rows[i], **kw}
    return rows


def _without(i, col):
    rows = _with(0)
    del rows[i][col]
    return rows


BAD_CLO = {  # rows, (row, field, kind)
    "float_group": (_with(2, group=1.5), (2, "group", "bad_group")),
    "bool_group": (_with(1, group=True), (1, "group", "bad_group")),
    "str_sft": (_with(3, sft="yes"), (3, "sft", "bad_sft")),
    "missing_group": (_without(2, "group"), (2, "group", "missing_group")),
    "missing_sft": (_without(1, "sft"), (1, "sft", "missing_sft")),
    "stray_sft": ([dict(STANDARD[0], sft=True)] + STANDARD[1:], (0, "sft", "stray_sft")),
    "mixed_id_types": (_with(3, group="x"), (3, "group", "bad_group")),
}
