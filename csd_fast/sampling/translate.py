"""`csd translate`: prompts (and, for CLO, responses) into other languages, resumable.

    csd translate --model translategemma-4b --input prompts.jsonl --languages da,de,fr \
        --output translated/ [--fields prompt,response] [--template translategemma|plain|FILE]
    csd sample --prompts translated/ ...        # the output is a prompt set for `csd sample`

Each input row gives one output row per target language (and, with --keep-source, itself): the
same `id` and `group` (the group defaults to the id, linking a prompt's translations), `lang` set
to the target, `prompt` / `messages` / `response` translated. Markdown survives: code blocks,
inline code, URLs, headings, list markers and tables are kept and only the prose between them is
sent to the model (`csd_fast.sampling.markdown`). Decoding is greedy. The same shards, manifest
and resume rules as `csd sample` apply.

Templates: `translategemma` (the instruction TranslateGemma-style models are tuned on, sent as a
user turn through the model's chat template), `plain` (a one-line instruction), or a file whose
text uses {source_lang}, {source_code}, {target_lang}, {target_code} and {text}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from csd_fast.sampling.options import Option, output_settings, parse_options
from csd_fast.sampling.sample import ENGINE_OPTIONS

PROG = "csd translate"
LANGUAGES = {
    "en": "English", "da": "Danish", "de": "German", "fr": "French", "es": "Spanish",
    "it": "Italian", "nl": "Dutch", "sv": "Swedish", "no": "Norwegian", "nb": "Norwegian Bokmål",
    "fi": "Finnish", "pl": "Polish", "pt": "Portuguese", "cs": "Czech", "el": "Greek",
    "is": "Icelandic", "ru": "Russian", "uk": "Ukrainian", "tr": "Turkish", "ar": "Arabic",
    "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "hi": "Hindi",
}  # fmt: skip
TEMPLATES = {
    "translategemma": (
        "You are a professional {source_lang} ({source_code}) to {target_lang} ({target_code}) "
        "translator. Your goal is to accurately convey the meaning and nuances of the original "
        "{source_lang} text while adhering to {target_lang} grammar, vocabulary, and cultural "
        "sensitivities.\nProduce only the {target_lang} translation, without any additional "
        "explanations or commentary. Please translate the following {source_lang} text into "
        "{target_lang}:\n\n\n{text}"
    ),
    "plain": "Translate from {source_lang} to {target_lang}:\n{text}",
}

OPTIONS = [
    Option("model", str, None, "translation model directory (or hub id)", required=True),
    Option(
        "input",
        str,
        None,
        "rows to translate (JSONL / Parquet / save_to_disk / csd folder)",
        required=True,
    ),
    Option("output", str, None, "output folder", required=True),
    Option(
        "languages", list, [], "target language codes, e.g. da,de,fr", output=True, required=True
    ),
    Option(
        "source_lang",
        str,
        "en",
        "language of the input rows (when they have no `lang`)",
        output=True,
    ),
    Option("fields", list, ["prompt"], "what to translate: prompt and/or response", output=True),
    Option(
        "template", str, "translategemma", "translategemma | plain | template file", output=True
    ),
    Option(
        "chat_template", str, "auto", "auto | none | Jinja file for the model's turn", output=True
    ),
    Option("keep_source", bool, True, "also write each source row, unchanged", output=True),
    Option("max_tokens", int, 1024, "max new tokens per translated piece", output=True),
    *ENGINE_OPTIONS,
]


def instruction(template: str, source: str, target: str, text: str) -> str:
    body = TEMPLATES.get(template)
    if body is None:
        body = Path(template).read_text()
    return body.format(
        source_lang=LANGUAGES.get(source, source),
        source_code=source,
        target_lang=LANGUAGES.get(target, target),
        target_code=target,
        text=text,
    )


def translation_schema():
    import pyarrow as pa

    fields = ["id", "prompt_id", "group", "lang", "source_lang", "prompt", "messages", "response"]
    return pa.schema([(f, pa.string()) for f in fields])


class Translator:
    """Greedy translation of many texts in one engine call, markdown kept (two passes at most)."""

    def __init__(self, engine, tokenizer, v: dict):
        from csd_fast.sampling.engines import GenParams

        self.engine, self.tokenizer, self.v = engine, tokenizer, v
        self.params = GenParams(n=1, temperature=0.0, max_tokens=v["max_tokens"])
        self.fragmentwise = 0
        self.empty = 0  # target rows dropped because the model returned no text

    def _generate(self, jobs: list[tuple[str, str, str]]) -> list[str]:
        """jobs: (source, target, text) -> translations."""
        from csd_fast.sampling.inputs import PromptRow, render_prompt

        if not jobs:
            return []
        ids = []
        for src, tgt, text in jobs:
            row = PromptRow(
                "t", tgt, None, instruction(self.v["template"], src, tgt, text), None, 0
            )
            ids.append(render_prompt(self.tokenizer, row, chat_template=self.v["chat_template"]))
        outs = self.engine.generate(ids, self.params, [0] * len(ids))
        return [o[0].text.strip() for o in outs]

    def translate(self, jobs: list[tuple[str, str, str]]) -> list[str]:
        from csd_fast.sampling import markdown

        split = [markdown.split_markdown(text) for _, _, text in jobs]
        flat = [
            (j, p)
            for j, pieces in enumerate(split)
            for p in pieces
            if isinstance(p, markdown.Prose)
        ]
        first = self._generate([(jobs[j][0], jobs[j][1], p.masked) for j, p in flat])
        restored = [markdown.restore(p, t) for (_, p), t in zip(flat, first, strict=True)]
        # a lost placeholder: translate the fragments around the protected spans one by one
        retry = [
            (k, frag)
            for k, r in enumerate(restored)
            if r is None
            for frag in flat[k][1].fragments()
            if frag[0]
        ]
        second = iter(
            self._generate(
                [(jobs[flat[k][0]][0], jobs[flat[k][0]][1], text) for k, (_, text) in retry]
            )
        )
        for k, r in enumerate(restored):
            if r is None:
                self.fragmentwise += 1
                parts = [next(second) if tr else text for tr, text in flat[k][1].fragments()]
                restored[k] = " ".join(x.strip() for x in parts if x.strip())
        per_job: list[list[str]] = [[] for _ in jobs]
        for (j, _), text in zip(flat, restored, strict=True):
            per_job[j].append(text)
        return [markdown.join_markdown(pieces, per_job[j]) for j, pieces in enumerate(split)]


def translate_rows(translator: Translator, rows, v: dict) -> list[dict]:
    """Output rows of one shard: per input row the source (optional) and each target language."""
    jobs, slots = [], []
    out = []
    for r in rows:
        src = r.lang or v["source_lang"]
        group = r.group or r.id
        response = dict(r.extra).get("response")
        if v["keep_source"]:
            out.append(
                {
                    "id": r.id,
                    "prompt_id": r.id,
                    "group": group,
                    "lang": src,
                    "source_lang": src,
                    "prompt": r.prompt,
                    "messages": r.messages_json(),
                    "response": response,
                }
            )
        for tgt in v["languages"]:
            if tgt == src:
                continue
            row = {
                "id": r.id,
                "prompt_id": r.id,
                "group": group,
                "lang": tgt,
                "source_lang": src,
                "prompt": None,
                "messages": None,
                "response": None,
            }
            if "prompt" in v["fields"]:
                if r.messages is not None:
                    for k, (_, content) in enumerate(r.messages):
                        jobs.append((src, tgt, content))
                        slots.append((row, ("messages", k)))
                else:
                    jobs.append((src, tgt, r.prompt))
                    slots.append((row, ("prompt", None)))
            if "response" in v["fields"] and response is not None:
                jobs.append((src, tgt, response))
                slots.append((row, ("response", None)))
            row["_source"] = r
            out.append(row)
    texts = translator.translate(jobs)
    chats: dict[int, list] = {}
    for (row, (field, k)), text in zip(slots, texts, strict=True):
        if field == "messages":
            chats.setdefault(id(row), [row, [dict(m) for m in row["_source"].as_messages()]])
            chats[id(row)][1][k]["content"] = text
        else:
            row[field] = text
    for row, msgs in chats.values():
        row["messages"] = json.dumps(msgs, ensure_ascii=False)
        users = [m["content"] for m in msgs if m["role"] == "user"]
        row["prompt"] = users[-1] if users else msgs[-1]["content"]
    kept = []
    for row in out:
        src_row = row.pop("_source", None)
        if src_row is not None and row["prompt"] is None:
            row["prompt"] = src_row.prompt  # prompts not translated (--fields response)
            row["messages"] = src_row.messages_json()
        if src_row is not None and _lost_text(row, src_row):
            translator.empty += 1  # an empty translation is no prompt to sample from: dropped
            continue
        kept.append(row)
    return kept


def _lost_text(row: dict, source) -> bool:
    """Whether a translation came back empty for a non-empty source text."""
    if row["messages"] is not None and source.messages is not None:
        turns = json.loads(row["messages"])
        pairs = zip(turns, source.messages, strict=True)
        if any(not m["content"].strip() and text.strip() for m, (_, text) in pairs):
            return True
    if not row["prompt"].strip():
        return True
    response = dict(source.extra).get("response")
    return bool(response and response.strip() and not (row["response"] or "").strip())


def main(argv: list[str] | None = None) -> int:
    from csd_fast.sampling import engines, inputs
    from csd_fast.sampling.stage import open_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    v = parse_options(PROG, "Translate prompts (and responses), markdown kept.", OPTIONS, argv)
    bad = [f for f in v["fields"] if f not in ("prompt", "response")]
    if bad:
        raise SystemExit(f"{PROG}: --fields takes prompt and/or response, got {bad}")
    rows = inputs.load_prompts(v["input"], keep=("response",))
    fingerprint = {
        "model": inputs.model_fingerprint(v["model"]),
        "input": inputs.input_fingerprint(v["input"]),
    }
    settings = output_settings(OPTIONS, v)
    job = open_stage(PROG, "translate", "translations", v, argv, settings, fingerprint, len(rows))
    if isinstance(job, int):
        return job
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(v["model"])
    dtype = v["dtype"] if v["dtype"] != "auto" else job.profile.engine.get("dtype", "auto")
    engine = engines.open_engine(
        v["backend"], v["model"], job.profile, seed=0, max_model_len=v["max_model_len"],
        dtype=dtype,
    )  # fmt: skip
    translator = Translator(engine, tokenizer, v)

    def work(j: int):
        import pyarrow as pa

        start, stop = job.out.units(j)
        return pa.Table.from_pylist(
            translate_rows(translator, rows[start:stop], v), schema=translation_schema()
        )

    try:
        job.run(work, unit="row")
    finally:
        engine.close()
    if translator.fragmentwise:
        print(
            f"[{PROG}] {translator.fragmentwise} line(s) lost a code placeholder and were "
            "translated fragment by fragment"
        )
    if translator.empty:
        print(
            f"[{PROG}] dropped {translator.empty} translation(s) that came back empty "
            "(the model stopped at once; try another --template or model)"
        )
    return job.finish()


if __name__ == "__main__":
    sys.exit(main())
