"""The demo's tiny model, local tokenizer and training recipe; `build_demo` writes them to disk.

    python -m csd_fast.demo.assets /tmp/csd-demo   # writes /tmp/csd-demo/model (model, tokenizer)

Nothing is downloaded. The tokenizer is a word-level vocabulary read off the packaged preference
set (a few hundred tokens: a small vocabulary is what lets a random-init model learn in seconds),
the model a 2-layer Llama with random weights from a fixed seed. head_dim is 64 because vLLM's CPU
attention refuses smaller heads, and the sampling tests load this same directory.

Tokenization (Metaspace then punctuation split), so text round-trips exactly and a prompt's tokens
are a prefix of prompt + completion whenever the completion starts with a space:

    "The car is red. What colour is the car?" -> <s> ▁The ▁car ▁is ▁red . ▁What ... ▁car ?
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from csd_fast.demo.make_data import EVAL_FILE, TRAIN_FILE

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

DEMO_TRAIN_FILE: Path = TRAIN_FILE
DEMO_EVAL_FILE: Path = EVAL_FILE
DEMO_SEED = 0
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# One turn per role marker; the assistant turn ends with EOS so generation stops there. The
# generation prompt is the bare marker, so the rendered prompt is a token prefix of prompt + answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# What makes the random-init demo model learn the language preference (TRL / TrainingArguments
# names). Measured with the reference loop in tests/test_demo.py: held-out rewards/accuracies
# reach ~1.0 well before max_steps, in seconds on one CPU core.
DEMO_RECIPE: dict = {
    "loss_type": ["sigmoid"],
    "beta": 0.1,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 6,
    "weight_decay": 0.0,
    "max_steps": 60,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "max_length": 64,
    "eval_strategy": "steps",
    "eval_steps": 20,
    "logging_steps": 5,
    "save_strategy": "no",
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": False,  # TRL defaults it on; it only slows a 2-layer model
    "report_to": "none",
}


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    tokenizer_dir: Path
    train_file: Path
    eval_file: Path


def _corpus() -> list[str]:
    texts = []
    for path in (DEMO_TRAIN_FILE, DEMO_EVAL_FILE):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["prompt"], row["chosen"], row["rejected"]]
    return texts


def _backend(vocab: dict[str, int] | None = None):
    """The `tokenizers` pipeline; with vocab=None a placeholder vocabulary (for pre-tokenizing)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = vocab or {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # BOS on plain text, as Llama tokenizers do; chat templates write their own
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the demo corpus; the same ids on every run and machine.

    Ids: the special tokens first, then words by descending count, ties in code-point order.
    """
    from transformers import PreTrainedTokenizerFast

    pre = _backend().pre_tokenizer
    counts: Counter[str] = Counter()
    for text in _corpus():
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    words = sorted((w for w in counts if w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *words))}
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(vocab),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )


def demo_model_config(vocab_size: int) -> LlamaConfig:
    """2 layers, hidden 128 = 2 heads x 64 (vLLM's CPU attention needs head_dim >= 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        torch_dtype="float32",
    )


def build_demo(workdir: str | Path) -> DemoAssets:
    """Write the tiny model and its tokenizer to `workdir/model`; reuse them if already there.

    A manifest records the vocabulary size and config; a directory written by another version of
    the demo (or half-written) is rebuilt rather than trusted.
    """
    import torch
    from transformers import LlamaForCausalLM

    model_dir = Path(workdir) / "model"
    tokenizer = build_demo_tokenizer()
    config = demo_model_config(len(tokenizer))
    manifest = {"vocab_size": len(tokenizer), "config": config.to_diff_dict(), "seed": DEMO_SEED}
    manifest = json.loads(json.dumps(manifest, sort_keys=True))  # compare as it reads back
    manifest_file = model_dir / "csd_demo.json"
    if not (manifest_file.is_file() and json.loads(manifest_file.read_text()) == manifest):
        model_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        # written last: its presence means the rest is complete
        manifest_file.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return DemoAssets(model_dir, model_dir, DEMO_TRAIN_FILE, DEMO_EVAL_FILE)


if __name__ == "__main__":
    print(build_demo(sys.argv[1] if len(sys.argv) > 1 else "csd-demo"))
