"""Tiny local models for the sampling and pairs tests: a policy Llama and a Llama reward model.

Both use the demo's word-level tokenizer (csd_fast.demo.assets) and its 2-layer config (H=128,
head_dim 64: vLLM's CPU attention needs head_dim >= 64). The policy's output rows of the special
tokens other than EOS are zeroed so that greedy decoding emits words (a random head otherwise
often prefers a special token, which decodes to an empty string and would make text checks
vacuous). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def build_policy(path: Path, seed: int = 0, can_stop: bool = True) -> Path:
    """The policy; with can_stop=False EOS is zeroed too, so greedy decoding always writes
    max_tokens words (a translator whose output is never empty)."""
    import torch
    from transformers import LlamaForCausalLM

    from csd_fast.demo.assets import SPECIAL_TOKENS, build_demo_tokenizer, demo_model_config

    tok = build_demo_tokenizer()
    config = demo_model_config(len(tok))
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)  # peaked distributions: EOS ends some samples
            for t in SPECIAL_TOKENS:
                if t != tok.eos_token or not can_stop:
                    model.lm_head.weight[tok.convert_tokens_to_ids(t)] = 0.0
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_reward_model(path: Path, seed: int = 1) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    from csd_fast.demo.assets import build_demo_tokenizer, demo_model_config

    tok = build_demo_tokenizer()
    config = demo_model_config(len(tok))
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
        with torch.no_grad():
            model.score.weight.normal_(0, 1.0)  # rewards spread over a few units
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_prompts(path: Path, n: int, langs=("en", "de")) -> Path:
    import json

    words = ["car", "sky", "house", "boat", "door", "dog", "cat", "tree"]
    with open(path, "w") as f:
        for i in range(n):
            lang = langs[i % len(langs)]
            row = {"prompt": f"What colour is the {words[i % len(words)]} {i}?", "lang": lang,
                   "group": f"g{i // len(langs)}"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path
