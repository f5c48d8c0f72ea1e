"""End-to-end DPO training steps: TRL's DPOTrainer vs csd-fast, same model, data and batch size.

    python -m bench --only dpo_train --quick
    python -m bench --only dpo_train --providers trl,csd-all --shape model=tiny,B=4,P=128,C=64

The model is a random-init Llama saved with a word-level tokenizer to a temp dir (nothing is
downloaded); both trainers load it by path, the reference too. Every provider runs `train()` for
warmup + reps optimizer steps; step times come from on_step_end callbacks and the warm-up steps
(data loading, the reference precompute, first-call costs) are dropped. Metrics: pairs/s, tokens/s
(real prompt+completion tokens of both sequences, the same count for every provider) and the peak
memory of train() above the built trainer. `train_wall` also counts the one-off precompute.

Providers (csd-fast switches on top of TRL's defaults; gradient checkpointing off for all):
  trl            trl.DPOTrainer (padded batches, live reference)
  csd-padded     csd_fast.DPOTrainer, same padded layout and live reference
  csd-packed     + padding_free
  csd-prefix     + prefix_sharing (prompt once per pair)
  csd-cached     + prefix_sharing, precompute_ref_log_probs
  csd-all        + prefix_sharing, precompute_ref_log_probs, fused head
  bare           the floor: the policy's forward + backward + AdamW step over the same real
                 tokens csd-all computes (prompt once, both completions, one packed row), with the
                 stock causal attention and lm_head on the completion positions; no reference,
                 no loss machinery, no collation. The goal: csd-all step <= 1.2x bare.

Lengths are long-tailed, not uniform (uniform lengths hide what packing is for): prompt and
completion token counts are drawn from log-normals whose means are the published statistics of
Anthropic Helpful in Llama 2's preference data table (Touvron et al. 2023, "Llama 2: Open
Foundation and Fine-Tuned Chat Models", arXiv:2307.09288, Table 6: 251.5 tokens per example,
88.4 per response; the prompt, with its dialogue history, is the remaining 163.1). The shape
(sigma 0.9: median ~ mean / 1.5, a tail past 4x the mean) is our assumption, not published.
Every row reports `padding_fraction`: the share of its layout's R x T slots that are padding,
computed by the provider's own collator (TRL pads each batch to its longest sequence).
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Case, Skip

NAME = "dpo_train"
MODES = ("train",)
CSD = {
    "csd-padded": {},
    "csd-packed": {"padding_free": True},
    "csd-prefix": {"prefix_sharing": True},
    "csd-cached": {"prefix_sharing": True, "precompute_ref_log_probs": True},
    "csd-all": {"prefix_sharing": True, "precompute_ref_log_probs": True, "fused": True},
}
PROVIDERS = ("trl", *CSD, "bare")
MODELS = {  # vocab-heavy on CPU so that the LM head matters, as it does at V=128k on GPUs
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256),
}  # fmt: skip
PRESETS = {  # B pairs per step; prompt / completion lengths log-normal with means P, C words
    "smoke": [{"model": "tiny", "B": 2, "P": 16, "C": 8, "providers": ("trl", "csd-all", "bare")}],
    # Anthropic Helpful's means (Llama 2, Table 6), capped by max_length: every provider
    "quick": [{"model": "tiny", "B": 4, "P": 163, "C": 88}],
    "gpu": [{"model": "1b", "B": 8, "P": 163, "C": 88},
            {"model": "8b", "B": 4, "P": 163, "C": 88, "providers": ("trl", "csd-all", "bare")}],
}  # fmt: skip
SIGMA = 0.9  # log-normal shape of the lengths (see the module docstring)
MAX_LENGTH = 1024  # the trainers' max_length; the tail beyond it is truncated as in training


def draw_length(rng, mean: float, sigma: float = SIGMA, cap: int = MAX_LENGTH) -> int:
    """One long-tailed length with the given mean (log-normal: mu = ln(mean) - sigma^2 / 2)."""
    import math

    return max(1, min(cap, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma))))


def _assets(shape: dict, n_pairs: int) -> tuple[Path, list[dict]]:
    """-> (model dir, rows): the model + tokenizer saved once per shape, and the preference rows."""
    import random

    m = MODELS[shape["model"]]
    vocab = m["vocab_size"]
    rng = random.Random(0)

    def words(mean: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(draw_length(rng, mean)))

    rows = [{"prompt": words(shape["P"]), "chosen": " " + words(shape["C"]),
             "rejected": " " + words(shape["C"])} for _ in range(n_pairs)]  # fmt: skip
    path = Path(tempfile.gettempdir()) / f"csd-bench-{shape['model']}"
    if not (path / "config.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        special = ["<pad>", "<s>", "</s>", "<unk>"]
        ids = {w: i for i, w in enumerate(special)} | {f"w{i}": i for i in range(4, vocab)}
        tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>", unk_token="<unk>")  # fmt: skip
        cfg = LlamaConfig(**m, max_position_embeddings=4096, tie_word_embeddings=False,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
        tmp = Path(tempfile.mkdtemp(dir=path.parent))  # written aside, renamed into place
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another case built it meanwhile
            pass
    return path, rows


def _config(cls, device: str, steps: int, batch: int, out: str, extra: dict):
    kw = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, seed=0,
              learning_rate=1e-6, logging_steps=10**6, save_strategy="no", report_to="none",
              gradient_checkpointing=False, bf16=device == "cuda", use_cpu=device == "cpu",
              max_length=MAX_LENGTH, disable_tqdm=True, dataloader_num_workers=0,
              **extra)  # fmt: skip
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
    else:
        known = set(inspect.signature(cls).parameters)
    missing = set(extra) - known
    if missing:
        raise Skip(f"{cls.__module__}.DPOConfig has no {sorted(missing)}")
    return cls(**{k: v for k, v in kw.items() if k in known})


LAYOUT = {"trl": "padded", "csd-padded": "padded", "csd-packed": "packed", "bare": "prefix",
          "csd-prefix": "prefix", "csd-cached": "prefix", "csd-all": "prefix"}  # fmt: skip


def _examples(tok, rows: list[dict]) -> list[dict]:
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    return [{"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]),
             "rejected_ids": ids(r["rejected"])} for r in rows]  # fmt: skip


def _collate(layout: str, examples: list[dict]):
    from csd_fast.batch import collate_padded
    from csd_fast.packing import collate_packed

    if layout == "padded":
        return collate_padded(examples, 0, max_length=MAX_LENGTH)
    return collate_packed(examples, 0, max_length=MAX_LENGTH, prefix_sharing=layout == "prefix")


def padding_fraction(layout: str, examples: list[dict], batch: int) -> float:
    """Share of the R x T slots of each step's batch that are padding, over all steps."""
    slots = real = 0
    for i in range(0, len(examples), batch):
        b = _collate(layout, examples[i : i + batch])
        slots, real = slots + b.capacity, real + b.num_real_tokens
    return 1.0 - real / max(slots, 1)


def _bare_case(shape: dict, device: str) -> Case:
    """The floor: forward + backward + AdamW over the prefix-shared tokens, no DPO machinery."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    case, state = Case(), {}

    def prepare(warmup: int, reps: int) -> None:
        state["warmup"], state["steps"] = max(warmup, 1), max(warmup, 1) + reps
        model_dir, rows = _assets(shape, state["steps"] * shape["B"])
        tok = AutoTokenizer.from_pretrained(model_dir)
        examples = _examples(tok, rows)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        model.set_attn_implementation("sdpa")
        batches = [_collate("prefix", examples[i : i + shape["B"]])
                   for i in range(0, len(examples), shape["B"])]  # fmt: skip
        state.update(model=model, batches=[b.to(device) for b in batches],
                     opt=torch.optim.AdamW(model.parameters(), lr=1e-6))  # fmt: skip
        case.items = {"pairs": shape["B"],
                      "tokens": sum(b.num_tokens for b in batches) / len(batches)}  # fmt: skip
        case.extra = {
            "padding_fraction": ("ratio", padding_fraction("prefix", examples, shape["B"]))
        }

    def timer() -> list[float]:
        model, opt, times = state["model"], state["opt"], []
        for b in state["batches"]:
            t0 = time.perf_counter()
            ids = b.model_kwargs["input_ids"]
            hidden = model.model(input_ids=ids, position_ids=b.model_kwargs["position_ids"],
                                 use_cache=False).last_hidden_state  # fmt: skip
            h = hidden.flatten(0, 1).index_select(0, b.token_index)  # completion positions
            F.cross_entropy(model.lm_head(h).float(), b.token_labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[state["warmup"] :]

    case.prepare, case.timer = prepare, timer
    return case


def setup(provider: str, mode: str, shape: dict, device: str) -> Case:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    if provider == "bare":
        return _bare_case(shape, device)
    if provider == "trl":
        try:
            from trl import DPOConfig, DPOTrainer
        except ImportError as e:
            raise Skip(f"trl not installed: {e}") from e
    else:
        try:
            from csd_fast import DPOConfig, DPOTrainer
        except ImportError as e:
            raise Skip(f"csd_fast trainer not importable yet: {e}") from e
    batch = shape["B"]
    case, state = Case(), {}
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":  # steps are queued asynchronously; stamp when one is done
                import torch

                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    def prepare(warmup: int, reps: int) -> None:
        state["warmup"] = warmup = max(warmup, 1)  # the first step always has one-off costs
        state["steps"] = steps = warmup + reps
        model_dir, rows = _assets(shape, steps * batch)
        tok = AutoTokenizer.from_pretrained(model_dir)
        n_tok = sum(2 * len(tok(r["prompt"]).input_ids) + len(tok(r["chosen"]).input_ids)
                    + len(tok(r["rejected"]).input_ids) for r in rows)  # fmt: skip
        case.items = {"pairs": batch, "tokens": n_tok / len(rows) * batch}
        pad = padding_fraction(LAYOUT[provider], _examples(tok, rows), batch)
        case.extra = {"padding_fraction": ("ratio", pad)}
        state["out"] = out = tempfile.mkdtemp(prefix="csd-bench-out-")
        args = _config(DPOConfig, device, steps, batch, out, CSD.get(provider, {}))
        state["trainer"] = DPOTrainer(model=str(model_dir), args=args, processing_class=tok,
                                      train_dataset=Dataset.from_list(rows))  # fmt: skip
        state["trainer"].add_callback(Stamp())

    def timer() -> list[float]:
        t0 = time.perf_counter()
        state["trainer"].train()
        case.extra = {**case.extra, "train_wall": ("s", time.perf_counter() - t0)}
        shutil.rmtree(state["out"], ignore_errors=True)
        warmup, steps = state["warmup"], state["steps"]
        if len(stamps) < steps:
            raise RuntimeError(f"saw {len(stamps)} on_step_end calls for {steps} steps")
        return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]

    case.prepare, case.timer = prepare, timer
    return case
