"""Generate the built-in bilingual preference set: "answer in the language of the prompt".

    python -m csd_fast.demo.make_data          # rewrites csd_fast/demo/{train,eval}.jsonl

Each item is a short context plus a question, written from templates in English and Danish. One
item gives two preference pairs in TRL's standard format, linked by `id`:

    {"id": 7, "lang": "en", "prompt": "The car is red. What colour is the car?",
     "chosen": " The car is red.", "rejected": " Bilen er rød."}
    {"id": 7, "lang": "da", "prompt": "Bilen er rød. Hvilken farve har bilen?",
     "chosen": " Bilen er rød.", "rejected": " The car is red."}

so chosen and rejected carry the same content and differ only in language, which the first tokens
of the completion already show (a random-init model learns that quickly). This is the data layout
of Cross-Lingual Optimization (chosen = same-language answer, rejected = the translation), so the
CLO path can reuse it: `id` groups the two pairs of an item, `lang` names the prompt's language.
Completions start with a space so that `prompt + chosen` reads as text and tokenizes with the
prompt's tokens as a prefix (TRL's prompt/completion boundary rule). Everything is deterministic
(fixed seed, sorted lexicons); eval items are combinations never drawn for train.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "train.jsonl"
EVAL_FILE = HERE / "eval.jsonl"
SEED = 1234
NUM_TRAIN_ITEMS = 320  # -> 640 pairs
NUM_EVAL_ITEMS = 80  # -> 160 pairs

# Danish predicate adjectives agree with the noun's gender: "bilen er rød", "huset er rødt".
# (english noun, danish definite form, gender "c" common / "n" neuter)
OBJECTS = [
    ("apple", "æblet", "n"), ("bag", "tasken", "c"), ("ball", "bolden", "c"),
    ("bed", "sengen", "c"), ("bike", "cyklen", "c"), ("boat", "båden", "c"),
    ("book", "bogen", "c"), ("box", "kassen", "c"), ("car", "bilen", "c"),
    ("chair", "stolen", "c"), ("cup", "koppen", "c"), ("door", "døren", "c"),
    ("flag", "flaget", "n"), ("hat", "hatten", "c"), ("house", "huset", "n"),
    ("lamp", "lampen", "c"), ("shirt", "skjorten", "c"), ("table", "bordet", "n"),
    ("window", "vinduet", "n"), ("kite", "dragen", "c"),
]  # fmt: skip
# (english, danish common, danish neuter)
COLOURS = [
    ("black", "sort", "sort"), ("blue", "blå", "blåt"), ("brown", "brun", "brunt"),
    ("green", "grøn", "grønt"), ("grey", "grå", "gråt"), ("red", "rød", "rødt"),
    ("white", "hvid", "hvidt"), ("yellow", "gul", "gult"),
]  # fmt: skip
NAMES = ["Anna", "Clara", "Emma", "Ida", "Jonas", "Lars", "Maria", "Mikkel", "Noah", "Oscar",
         "Peter", "Sofie"]  # fmt: skip
PLACES = [
    ("city", "byen"), ("forest", "skoven"), ("garden", "haven"), ("harbour", "havnen"),
    ("kitchen", "køkkenet"), ("library", "biblioteket"), ("office", "kontoret"),
    ("park", "parken"), ("school", "skolen"), ("shop", "butikken"), ("station", "stationen"),
    ("church", "kirken"),
]  # fmt: skip
NUMBERS = [("two", "to"), ("three", "tre"), ("four", "fire"), ("five", "fem"), ("six", "seks"),
           ("seven", "syv"), ("eight", "otte"), ("nine", "ni"), ("ten", "ti")]  # fmt: skip
ANIMALS = [("birds", "fugle"), ("cats", "katte"), ("cows", "køer"), ("dogs", "hunde"),
           ("ducks", "ænder"), ("horses", "heste"), ("mice", "mus"), ("sheep", "får")]  # fmt: skip
FOODS = [("apples", "æbler"), ("bread", "brød"), ("cake", "kage"), ("carrots", "gulerødder"),
         ("cheese", "ost"), ("coffee", "kaffe"), ("eggs", "æg"), ("milk", "mælk"),
         ("rice", "ris"), ("soup", "suppe"), ("tea", "te")]  # fmt: skip
DAYS = [("Monday", "mandag"), ("Tuesday", "tirsdag"), ("Wednesday", "onsdag"),
        ("Thursday", "torsdag"), ("Friday", "fredag"), ("Saturday", "lørdag"),
        ("Sunday", "søndag")]  # fmt: skip


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _colour(obj, col) -> dict[str, tuple[str, str]]:
    (en, da, gender), (c_en, c_da, c_da_n) = obj, col
    adj = c_da_n if gender == "n" else c_da
    return {
        "en": (f"The {en} is {c_en}. What colour is the {en}?", f"The {en} is {c_en}."),
        "da": (f"{_cap(da)} er {adj}. Hvilken farve har {da}?", f"{_cap(da)} er {adj}."),
    }


def _place(name, place) -> dict[str, tuple[str, str]]:
    en, da = place
    return {
        "en": (f"{name} is in the {en}. Where is {name}?", f"{name} is in the {en}."),
        "da": (f"{name} er i {da}. Hvor er {name}?", f"{name} er i {da}."),
    }


def _count(num, animal, place) -> dict[str, tuple[str, str]]:
    (n_en, n_da), (a_en, a_da), (p_en, p_da) = num, animal, place
    fact_en = f"There are {n_en} {a_en} in the {p_en}."
    fact_da = f"Der er {n_da} {a_da} i {p_da}."
    return {
        "en": (f"{fact_en} How many {a_en} are in the {p_en}?", fact_en),
        "da": (f"{fact_da} Hvor mange {a_da} er der i {p_da}?", fact_da),
    }


def _food(name, food) -> dict[str, tuple[str, str]]:
    en, da = food
    return {
        "en": (f"{name} likes {en}. What does {name} like?", f"{name} likes {en}."),
        "da": (f"{name} kan lide {da}. Hvad kan {name} lide?", f"{name} kan lide {da}."),
    }


def _day(name, day) -> dict[str, tuple[str, str]]:
    en, da = day
    return {
        "en": (f"{name} comes on {en}. When does {name} come?", f"{name} comes on {en}."),
        "da": (f"{name} kommer på {da}. Hvornår kommer {name}?", f"{name} kommer på {da}."),
    }


# (task name, builder, slot lists): every combination of the slots is a candidate item
TASKS = [
    ("colour", _colour, (OBJECTS, COLOURS)),
    ("place", _place, (NAMES, PLACES)),
    ("count", _count, (NUMBERS, ANIMALS, PLACES)),
    ("food", _food, (NAMES, FOODS)),
    ("day", _day, (NAMES, DAYS)),
]


def _words(item: dict) -> set[str]:
    return {w for lang in ("en", "da") for text in item[lang] for w in re.findall(r"\w+", text)}


def make_items(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train_items, eval_items): each item is {task, en: (prompt, answer), da: (prompt, answer)}.

    Every task gets an equal share of both splits. Eval items are drawn from the combinations left
    over after train, skipping any that holds a word train never shows: held-out accuracy should
    measure the language rule on new combinations, not the untrained embedding of a new word.
    """
    rng = random.Random(seed)
    pools = []
    for task, build, slots in TASKS:
        combos = list(itertools.product(*slots))
        rng.shuffle(combos)
        pools.append([{"task": task, **build(*c)} for c in combos])
    n_train, n_eval = NUM_TRAIN_ITEMS // len(pools), NUM_EVAL_ITEMS // len(pools)
    train = [item for pool in pools for item in pool[:n_train]]
    seen = set().union(*map(_words, train))
    evals = []
    for task, pool in zip(TASKS, pools, strict=True):
        fits = [item for item in pool[n_train:] if _words(item) <= seen][:n_eval]
        if len(fits) < n_eval:
            raise ValueError(f"task {task[0]!r} has too few combinations for {n_eval} eval items")
        evals.extend(fits)
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def to_pairs(items: list[dict], first_id: int) -> list[dict]:
    """Two TRL standard-format rows per item, chosen = the answer in the prompt's language."""
    rows = []
    for k, item in enumerate(items):
        for lang, other in (("en", "da"), ("da", "en")):
            prompt, answer = item[lang]
            rows.append(
                {
                    "id": first_id + k,
                    "lang": lang,
                    "task": item["task"],
                    "prompt": prompt,
                    "chosen": " " + answer,
                    "rejected": " " + item[other][1],
                }
            )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, evals = make_items()
    # eval ids follow the train ids so an id names one item across both files
    write_jsonl(to_pairs(train, 0), TRAIN_FILE)
    write_jsonl(to_pairs(evals, len(train)), EVAL_FILE)
    print(f"wrote {2 * len(train)} pairs to {TRAIN_FILE} and {2 * len(evals)} to {EVAL_FILE}")


if __name__ == "__main__":
    main()
