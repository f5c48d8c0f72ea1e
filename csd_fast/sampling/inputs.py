"""Prompts in, rendered token ids out: the input side of `csd sample` and `csd translate`.

    prompts = load_prompts("prompts.jsonl")        # .jsonl / .json / .parquet / save_to_disk / a
                                                   # csd output folder (e.g. `csd translate`'s)
    ids = render_prompt(tokenizer, prompts[0], chat_template="auto")

A row has `prompt` (a string) or `messages` (a chat: a list of {role, content}), and optionally
`id` (or `prompt_id`, as csd's outputs call it, when unique per language), `lang` and `group`
(the id shared by the translations of one prompt). A missing id is made stable from the
content: `p-` + the first 16 hex digits of sha256(lang + prompt), so the same prompt gets the
same id in every run and on every shard. Ids must be unique per language; an exact repeat of a
row without an id is dropped (and counted), a clash of different rows is an error that names the
file, both rows and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csd_fast.data.errors import PreferenceDataError


@dataclass(frozen=True)
class PromptRow:
    id: str
    lang: str | None
    group: str | None
    prompt: str  # the text (for a chat: the last user turn), as written to the output
    messages: tuple | None  # ((role, content), ...) when the row came as a chat
    source_row: int  # row index in the input, for error messages
    extra: tuple = ()  # (name, value) of other string columns kept for translate (e.g. response)

    def as_messages(self) -> list[dict]:
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.prompt}]

    def messages_json(self) -> str | None:
        return None if self.messages is None else json.dumps(self.as_messages(), ensure_ascii=False)


def stable_id(lang: str | None, prompt: str, messages: tuple | None, extra: tuple = ()) -> str:
    # extra columns (translate's `response`) count only when present: sample ids stay as they are
    content = json.dumps(
        [lang, prompt, messages, *([list(extra)] if extra else [])], ensure_ascii=False
    )
    return "p-" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def _rows_of(source: str | Path) -> tuple[list[dict], Any]:
    """(rows, RowSource) of a file or folder; a csd output folder is read through its manifest."""
    from csd_fast.data.sources import RowSource, load_rows

    path = Path(source)
    if path.is_dir() and (path / "manifest.json").exists():
        from csd_fast.sampling.store import read_table

        rows = read_table(path).to_pylist()
        return rows, RowSource(rows, str(path))
    src = load_rows(str(source))
    rows = src.raw if src.raw is not None else src.to_list()
    return rows, src


def _messages(value: Any, src, i: int) -> tuple:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise src.error(i, "messages", f"not a JSON chat: {e.msg}") from None
    if not isinstance(value, list) or not value:
        raise src.error(i, "messages", "expected a non-empty list of {role, content}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise src.error(i, "messages", f"turn {k}: expected {{role, content}}, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise src.error(i, "messages", f"turn {k}: content must be a string")
        out.append((m["role"], m["content"]))
    return tuple(out)


def load_prompts(source: str | Path, *, keep: tuple[str, ...] = ()) -> list[PromptRow]:
    """Validated prompt rows in input order; `keep` names extra string columns to carry along."""
    rows, src = _rows_of(source)
    if not rows:
        raise PreferenceDataError(str(source), None, None, "no rows", kind="empty_source")
    out: list[PromptRow] = []
    seen: dict[tuple, int] = {}  # (id, lang) -> index in out
    dropped = 0
    # `prompt_id` is what csd's own outputs call an id: rows read back as prompts keep theirs,
    # unless it repeats (K samples of one prompt, read to translate responses: content ids)
    by_prompt_id = all(r.get("id") is None and r.get("prompt_id") is not None for r in rows)
    if by_prompt_id:
        keys = [(str(r["prompt_id"]), r.get("lang")) for r in rows]
        by_prompt_id = len(set(keys)) == len(keys)
    id_field = "prompt_id" if by_prompt_id else "id"
    for i, r in enumerate(rows):
        messages = None
        if r.get("messages") is not None:
            messages = _messages(r["messages"], src, i)
            users = [c for role, c in messages if role == "user"]
            prompt = users[-1] if users else messages[-1][1]
        elif isinstance(r.get("prompt"), str):
            prompt = r["prompt"]
        elif isinstance(r.get("prompt"), list):  # TRL's conversational prompt column
            messages = _messages(r["prompt"], src, i)
            prompt = [c for role, c in messages if role == "user"][-1:] or [messages[-1][1]]
            prompt = prompt[0]
        else:
            field = "prompt" if "prompt" in r else None
            raise src.error(i, field, "each row needs `prompt` (a string) or `messages` (a chat)")
        if not prompt.strip() and messages is None:
            raise src.error(i, "prompt", "empty prompt")
        lang = r.get("lang")
        if lang is not None and not isinstance(lang, str):
            raise src.error(i, "lang", f"expected a string, got {type(lang).__name__}")
        given = r.get(id_field)
        if isinstance(given, bool) or (given is not None and not isinstance(given, (int, str))):
            raise src.error(i, id_field, f"expected an int or str id, got {type(given).__name__}")
        extra = []
        for name in keep:
            value = r.get(name)
            if value is not None and not isinstance(value, str):
                raise src.error(i, name, f"expected a string, got {type(value).__name__}")
            extra.append((name, value))
        pid = str(given) if given is not None else stable_id(lang, prompt, messages, tuple(extra))
        group = r.get("group")
        group = None if group is None else str(group)
        row = PromptRow(pid, lang, group, prompt, messages, i, tuple(extra))
        key = (pid, lang)
        if key in seen:
            first = out[seen[key]]
            same = (first.prompt, first.messages, first.group, first.extra) == (
                prompt,
                messages,
                group,
                tuple(extra),
            )
            if given is None and same:
                dropped += 1  # the same prompt twice: sampling it twice would double its weight
                continue
            raise src.error(
                i,
                id_field,
                f"id {pid!r} (lang {lang!r}) already used by row {first.source_row}; "
                "ids must be unique per language",
                "duplicate_id",
            )
        seen[key] = len(out)
        out.append(row)
    if dropped:
        print(f"[inputs] {source}: dropped {dropped} exact repeat(s) of prompts without an id")
    return out


def render_prompt(
    tokenizer, row: PromptRow, *, chat_template: str = "auto", system_prompt: str | None = None
) -> list[int]:
    """Token ids of the prompt as the model expects it.

    chat_template: "auto" (the tokenizer's template when it has one, else the plain text),
    "none" (plain text, the tokenizer's own special tokens), or a path to a Jinja template file.
    A rendered template writes its own BOS, so the text is tokenized without adding another.
    """
    template = None
    if chat_template not in ("auto", "none"):
        template = Path(chat_template).read_text()
    use_chat = chat_template != "none" and (template or getattr(tokenizer, "chat_template", None))
    if not use_chat:
        if row.messages is not None:
            raise ValueError(
                f"row {row.source_row} ({row.id}) is a chat but the tokenizer has no chat "
                "template; pass --chat-template FILE"
            )
        return list(tokenizer(row.prompt)["input_ids"])
    messages = row.as_messages()
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def input_fingerprint(source: str | Path) -> str:
    """sha256 of the input file (or of a folder's files / a csd output's shard checksums)."""
    path = Path(source)
    h = hashlib.sha256()
    if (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text())
        for rec in sorted(manifest.get("shards", []), key=lambda r: r["index"]):
            h.update(rec["sha256"].encode())
        return h.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(model: str) -> str:
    """Cheap identity of a model: config/tokenizer bytes, and name, size, head and tail of weights.

    Hashing whole checkpoints (tens of GB) on every start would take minutes; a retrained or
    replaced checkpoint changes its first or last MiB (the safetensors header holds the tensor
    table) or its size. A hub id that is not a local folder is identified by the id itself.
    """
    path = Path(model)
    if not path.is_dir():
        return f"id:{model}"
    h = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            if size <= 4 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()
