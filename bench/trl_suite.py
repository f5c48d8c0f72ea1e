"""TRL's own DPOTrainer tests run offline twice: as TRL ships them, and with the import swapped.

    python bench/trl_suite.py --trl-tests PATH/to/trl/tests [--work DIR] [--timeout 3600]
    python bench/trl_suite.py --trl-tests /tmp/trl/tests -k "test_train and not vlm"  # a subset

PATH is the `tests/` folder of a TRL checkout (the commit nearest the installed trl): its
`test_dpo_trainer.py`, `conftest.py`, `testing_utils.py`; the dataset and tiny-model generators
are read from the `scripts/` folder beside it (`--trl-scripts` to point elsewhere). Nothing of
TRL's is copied into this repository: the work folder (a temp dir unless `--work`) gets

  data/<name>/<config>/  TRL's own `generate_{zen,harmony,toolcall}_dataset.py`, their
                         `push_to_hub` replaced by `save_to_disk`;
  models/trl-internal-testing/tiny-*/  TRL's own `generate_tiny_models` scripts for the
                         architectures the tests name, with a locally trained byte-level BPE
                         tokenizer (ChatML template with tools) in place of the Hub tokenizers, and
                         their `push_to_hub` replaced by `save_pretrained`. The vocabulary is
                         shrunk to the tokenizer's (1024): at the Hub sizes (65k-262k) the lm_head
                         is the whole cost of each test on CPU (the layers are hidden size 8);
  trl/tests/, csd/tests/ the four test files verbatim; in csd/ the one line
                         `from trl import DPOConfig, DPOTrainer` reads `from csd_fast import ...`;
  */conftest.py          the offline shim (ours): `load_dataset("trl-internal-testing/...")` reads
                         data/, the working directory is models/ so the tests' model ids resolve
                         to the local tiny models, HF_HUB_OFFLINE=1.

Left out (deselected): the vision classes (no tiny vision models are built), the GPU-only slow
class and the two tests that train with Liger's Triton kernels (GPU only; see DESELECT). Each
run is `pytest -p no:cacheprovider -q -rf --junitxml` under `timeout`; the outcome of every
test in both runs and the first line of each failure go to bench/results/trl_suite.csv (`--csv`
to change). Device: whatever runs it (the committed CSV: a 2-core CPU VM).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORG = "trl-internal-testing"
TEST_FILES = ("__init__.py", "conftest.py", "testing_utils.py", "test_dpo_trainer.py")
DATASETS = ("zen", "harmony", "toolcall")
# TRL's generator module (scripts/generate_tiny_models/for_causal_lm/<module>.py) per tiny model
# the DPO tests load by id.
MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": "qwen2_for_causal_lm_2_5",
    "tiny-Cohere2ForCausalLM": "cohere2_for_causal_lm",
    "tiny-Glm4MoeForCausalLM": "glm4_moe_for_causal_lm",
    "tiny-GptOssForCausalLM": "gpt_oss_for_causal_lm",
    "tiny-Qwen3MoeForCausalLM": "qwen3_moe_for_causal_lm",
    "tiny-NemotronHForCausalLM-nano": "nemotron_3_nano_for_causal_lm",
    "tiny-Olmo3ForCausalLM": "olmo3_for_causal_lm",
    "tiny-Lfm2ForCausalLM": "lfm2_for_causal_lm",
    "tiny-Lfm2ForCausalLM-2.5": "lfm2_for_causal_lm_2_5",
    "tiny-RemoteForCausalLM": "remote_for_causal_lm",
}
# Vision (no tiny vision models built here), the GPU-only slow class, and the two tests that run
# Liger's Triton layer kernels: they need a GPU, and on CPU they fail and leave transformers'
# Qwen2 classes patched with those kernels, failing every later Qwen2 test in the process.
# (--deselect matches by prefix: test_train_with_liger covers ..._with_liger_kernel_and_peft.)
DESELECT = (
    "TestDataCollatorForVisionPreference", "TestDPOTrainerVLM", "TestDPOTrainerSlow",
    "TestDPOTrainer::test_train_with_liger",
)  # fmt: skip
TRL_IMPORT = "from trl import DPOConfig, DPOTrainer"
CSD_IMPORT = "from csd_fast import DPOConfig, DPOTrainer"

# ChatML (the Qwen 2.5 layout) with tools and assistant tool calls: what the zen, harmony and
# toolcall datasets need from a template.
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{%- endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>"
    "<|im_end|>\n"
    "{%- elif messages[0].role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and (loop.first and tools) %}"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n"
    "{%- if message.content %}{{ message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}\n<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

SHIM = '''"""Offline shim for TRL's DPO tests (written by csd-fast's bench/trl_suite.py)."""
import importlib.util
import os

import datasets
from trl import import_utils

DATA = {data!r}
MODELS = {models!r}

# testing_utils of a newer TRL may import helpers the installed trl lacks
if not hasattr(import_utils, "is_joblib_available"):
    import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None


def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    local = os.path.join(DATA, str(path).split("/")[-1], name or "default")
    if not (str(path).startswith("{org}/") and os.path.isdir(local)):
        raise FileNotFoundError(f"offline: no local copy of {{path}} / {{name}}")
    dd = datasets.load_from_disk(local)
    if split is not None:
        ds = dd[split]
        return ds.to_iterable_dataset() if streaming else ds
    if streaming:
        return datasets.IterableDatasetDict({{k: v.to_iterable_dataset() for k, v in dd.items()}})
    return dd


datasets.load_dataset = load_dataset
os.chdir(MODELS)  # "{org}/tiny-X" is now the local folder models/{org}/tiny-X
'''


def build_tokenizer(texts: list[str]):
    """A byte-level BPE trained on the datasets' own text, ChatML specials, no BOS (as Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def build_datasets(scripts: Path, data: Path) -> list[str]:
    """Run TRL's dataset generators with push_to_hub -> save_to_disk; return all their text."""
    import datasets

    def save(self, repo_id, config_name="default", **_):
        self.save_to_disk(str(data / repo_id.split("/")[-1] / config_name))

    texts: list[str] = []
    original = datasets.DatasetDict.push_to_hub
    datasets.DatasetDict.push_to_hub = save
    try:
        for name in DATASETS:
            if not (data / name).is_dir():
                argv, sys.argv = sys.argv, [name, "--push_to_hub", "true"]
                try:
                    runpy.run_path(
                        str(scripts / f"generate_{name}_dataset.py"), run_name="__main__"
                    )
                finally:
                    sys.argv = argv
            for config in sorted((data / name).iterdir()):
                for split in datasets.load_from_disk(str(config)).values():
                    for row in split:
                        texts.extend(_texts(row))
    finally:
        datasets.DatasetDict.push_to_hub = original
    return texts


class _HubSized:
    """`tokenizer` with `.vocab` reporting `size` entries (what TRL's generators read)."""

    def __init__(self, tokenizer, size: int):
        self._tokenizer, self.vocab = tokenizer, range(size)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def build_models(scripts: Path, models: Path, tokenizer) -> None:
    """Run TRL's tiny-model generators with our tokenizer and a local save for push_to_hub."""
    import transformers

    sys.path.insert(0, str(scripts))
    import generate_tiny_models._common as common  # TRL's helpers; patched below

    def save(model, _tok, _generation_config, prefix=None, suffix=None, create_pr=None):
        name = model.__class__.__name__
        name = f"{prefix}-{name}" if prefix else name
        name = f"{name}-{suffix}" if suffix else name
        out = models / ORG / name
        # Shrink the vocabulary to our tokenizer's: on CPU a 150k-250k vocabulary makes the
        # lm_head the whole cost of every test (the layers are hidden size 8).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(model.config, key, getattr(tokenizer, key))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    for helper in ("check_transformers_version", "check_dtype_pattern", "print_config_diff"):
        setattr(common, helper, lambda *a, **k: None)  # these read the Hub's reference config
    common.push_to_hub = save
    # The generators size the vocabulary by the Hub tokenizer (`len(tokenizer.vocab)`) and set
    # its special-token ids; ours is smaller, so they see the Hub's size (o200k, the largest).
    sized = _HubSized(tokenizer, 201088)
    patches = [
        (transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: sized)),
        (transformers.GenerationConfig, "from_pretrained", classmethod(lambda cls, *a, **k: None)),
    ]
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        for name, module in MODELS.items():
            if (models / ORG / name / "config.json").is_file():
                continue
            with contextlib.redirect_stdout(sys.stderr):
                runpy.run_module(
                    f"generate_tiny_models.for_causal_lm.{module}", run_name="__main__"
                )
            print(f"built {ORG}/{name}", file=sys.stderr)
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def write_suite(trl_tests: Path, out: Path, shim: str, swap: bool) -> None:
    tests = out / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        text = (trl_tests / name).read_text()
        if swap and name == "test_dpo_trainer.py":
            if TRL_IMPORT not in text:
                raise SystemExit(f"{trl_tests / name}: no line {TRL_IMPORT!r} to swap")
            text = text.replace(TRL_IMPORT, CSD_IMPORT)
        (tests / name).write_text(text)
    (out / "conftest.py").write_text(shim)


def run_suite(out: Path, extra: list[str], timeout: int) -> dict[str, tuple[str, str]]:
    """pytest in `out`; {test id: (outcome, first line of the failure)} from its junit XML."""
    report = out / "junit.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # the csd-fast under test is this checkout's, whatever else is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(TRANSFORMERS_OFFLINE="1", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        "timeout", str(timeout), sys.executable, "-m", "pytest", "tests/test_dpo_trainer.py",
        "-p", "no:cacheprovider", "-q", "-rf", f"--junitxml={report}", "--rootdir", str(out),
        *(f"--deselect=tests/test_dpo_trainer.py::{c}" for c in DESELECT), *extra,
    ]  # fmt: skip
    log = out / "pytest.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"{out.name}: pytest exit {rc}; log {log}", file=sys.stderr)
    if not report.is_file():
        raise SystemExit(f"{out.name}: no junit report (timed out?); see {log}")
    return read_report(report)


def read_report(report: Path) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the failure)} of a pytest junit XML."""
    results = {}
    for case in ET.parse(report).iter("testcase"):
        test_id = f"{case.get('classname').split('.')[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                reason = (child.get("message") or child.text or "").strip().splitlines()
                reason = reason[0][:300] if reason else ""
        results[test_id] = (outcome, reason)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-tests", type=Path, required=True, help="a TRL checkout's tests/ folder")
    p.add_argument("--trl-scripts", type=Path, help="its scripts/ folder (default: ../scripts)")
    p.add_argument("--work", type=Path, help="work folder (default: a new temp dir)")
    p.add_argument("--csv", type=Path, default=REPO / "bench/results/trl_suite.csv")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    p.add_argument(
        "--only", choices=("trl", "csd"), help="run one side (the other: its last run in --work)"
    )
    p.add_argument("--no-run", action="store_true", help="only rewrite the CSV from --work's runs")
    args, extra = p.parse_known_args(argv)
    scripts = args.trl_scripts or args.trl_tests.parent / "scripts"
    work = args.work or Path(tempfile.mkdtemp(prefix="trl_suite_"))
    data, models = work / "data", work / "models"
    if not args.no_run:
        texts = build_datasets(scripts.resolve(), data)
        build_models(scripts.resolve(), models, build_tokenizer(texts))
    shim = SHIM.format(data=str(data), models=str(models), org=ORG)
    outcomes = {}
    for side in ("trl", "csd"):
        out = work / side
        if args.no_run or (args.only and side != args.only):
            if (out / "junit.xml").is_file():  # the other side's last run in this work folder
                outcomes[side] = read_report(out / "junit.xml")
            continue
        shutil.rmtree(out / "tests", ignore_errors=True)
        write_suite(args.trl_tests, out, shim, swap=side == "csd")
        outcomes[side] = run_suite(out, extra, args.timeout)
    ids = sorted({t for side in outcomes.values() for t in side})
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["test", "trl", "csd", "trl_reason", "csd_reason"])
        for t in ids:
            trl = outcomes.get("trl", {}).get(t, ("", ""))
            ours = outcomes.get("csd", {}).get(t, ("", ""))
            failed = ("failed", "error")
            w.writerow([t, trl[0], ours[0], trl[1] if trl[0] in failed else "",
                        ours[1] if ours[0] in failed else ""])  # fmt: skip
    for side, res in outcomes.items():
        counts = {
            o: sum(1 for v in res.values() if v[0] == o)
            for o in ("passed", "failed", "error", "skipped")
        }
        print(side, counts)
    trl_ok = {t for t, v in outcomes.get("trl", {}).items() if v[0] == "passed"}
    if "csd" in outcomes and trl_ok:
        both = sum(1 for t in trl_ok if outcomes["csd"].get(t, ("",))[0] == "passed")
        print(f"of {len(trl_ok)} tests that pass with TRL, {both} pass with csd-fast")
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
