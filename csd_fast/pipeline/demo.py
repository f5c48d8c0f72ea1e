"""The CPU walk-through: `base_model: demo`, `reward_model: demo` and `prompts: demo` of a loop.

    python -m csd_fast.pipeline.demo runs/demo/demo_assets    # writes model/, reward_model/, ...

The policy is the built-in demo model (`csd_fast.demo`: a tiny random-init Llama and a word-level
tokenizer). The reward model is the same architecture as a sequence classifier (num_labels 1),
trained here for a few seconds with the Bradley-Terry loss -log σ(r(x, y_c) - r(x, y_r)) on the
demo's preference pairs, which prefer the answer in the prompt's language: a small, real reward
model with a known taste, so the loop's eval shows whether the policy moves towards it. Prompts
are the demo's English/Danish questions (train items for sampling, held-out items for eval).
Everything is deterministic (fixed seeds) and rebuilt only when missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RM_STEPS = 80
RM_SEED = 0


def _pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_demo_prompts(
    out_dir: Path, limit_train: int = 32, limit_eval: int = 16
) -> tuple[Path, Path]:
    """prompts.jsonl / eval_prompts.jsonl (prompt_id, prompt, lang, group) from the demo set."""
    from csd_fast.demo import DEMO_EVAL_FILE, DEMO_TRAIN_FILE

    paths = []
    for src, name, limit in ((DEMO_TRAIN_FILE, "prompts.jsonl", limit_train),
                             (DEMO_EVAL_FILE, "eval_prompts.jsonl", limit_eval)):  # fmt: skip
        rows = _pairs(src)[:limit]
        text = "".join(
            json.dumps({"prompt_id": f"{r['id']}-{r['lang']}", "prompt": r["prompt"],
                        "lang": r["lang"], "group": str(r["id"])}, ensure_ascii=False) + "\n"
            for r in rows
        )  # fmt: skip
        dst = out_dir / name
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dst)
        paths.append(dst)
    return paths[0], paths[1]


def _train_reward_model(out: Path, tokenizer, vocab_size: int) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from csd_fast.demo import DEMO_TRAIN_FILE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RM_SEED)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_labels=1,
            pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512,
        )  # fmt: skip
        model = LlamaForSequenceClassification(config)
        rows = _pairs(DEMO_TRAIN_FILE)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(RM_SEED)
        for _ in range(RM_STEPS):
            idx = torch.randperm(len(rows), generator=gen)[:32].tolist()
            texts = [rows[i]["prompt"] + rows[i][k] for k in ("chosen", "rejected") for i in idx]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            reward = model(**enc).logits[:, 0]
            loss = -F.logsigmoid(reward[: len(idx)] - reward[len(idx) :]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_demo_models(workdir: str | Path) -> tuple[Path, Path]:
    """(policy dir, reward-model dir), built under workdir once."""
    from csd_fast.demo import build_demo

    workdir = Path(workdir)
    assets = build_demo(workdir)
    rm_dir = workdir / "reward_model"
    if not (rm_dir / "csd_demo_rm.json").exists():
        from csd_fast.demo import build_demo_tokenizer

        tok = build_demo_tokenizer()
        tok.chat_template = None  # score prompt + response as plain text
        _train_reward_model(rm_dir, tok, len(tok))
        (rm_dir / "csd_demo_rm.json").write_text(json.dumps({"steps": RM_STEPS, "seed": RM_SEED}))
    return assets.model_dir, rm_dir


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "csd-demo")
    print(build_demo_models(target), write_demo_prompts(target))
