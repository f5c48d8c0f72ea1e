"""Parity harness: run TRL 1.16's DPOTrainer and csd-fast's on the same tiny model and data.

Used by tests/test_trl_parity.py; also runnable alone to look at TRL's log history:
    python tests/trl_helpers.py            # prints TRL's per-step logs on the tiny Llama

Everything is local and fp32 on CPU: a tiny Llama or Qwen2 built from a config and saved to a
temp dir (TRL reloads the reference model from `model.config._name_or_path`), the byte-level
tokenizer of tests/data_helpers.py, `HF_HUB_OFFLINE=1`, `report_to="none"`, `bf16=False`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from data_helpers import tiny_tokenizer  # noqa: E402

WEIGHT_ATOL = 2e-5  # final weights vs TRL: well under one Adam step at lr 1e-3
ARCHS = ("llama", "qwen2", "qwen3_moe", "gpt_oss", "glm4_moe")
TOPICS = ["sky", "sun", "sea", "capital", "world", "color", "France", "Germany"]
ANSWERS = ["blue", "green", "in the sky", "in the sea", "Paris", "Berlin", "fine", "red"]


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    """A 2-layer causal LM with random weights (fixed seed); fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).float()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).float()
    # Mixture-of-Experts: 4 experts, 2 per token, so the router's load-balancing loss is live
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **moe, num_experts=4)).float()
    if arch == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        config = GptOssConfig(**{**common, "intermediate_size": 32}, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=16)  # fmt: skip
        return GptOssForCausalLM(config).float()
    if arch == "glm4_moe":
        from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

        config = Glm4MoeConfig(**common, **moe, n_routed_experts=4, n_shared_experts=1,
                               first_k_dense_replace=1, n_group=1, topk_group=1)  # fmt: skip
        return Glm4MoeForCausalLM(config).float()
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def save_tiny(arch: str, root: str | Path) -> tuple[str, object]:
    """Save tokenizer + model to `root/arch` (once); return (path, tokenizer)."""
    path = Path(root) / arch
    tok = tiny_tokenizer()
    if not (path / "config.json").exists():
        tiny_model(arch, len(tok)).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path), tok


def rows(fmt: str, n: int = 12) -> list[dict]:
    """`n` short preference pairs in one of TRL's formats: standard, conversational, implicit."""
    out = []
    for i in range(n):
        topic, good, bad = TOPICS[i % 8], ANSWERS[i % 8], ANSWERS[(i * 3 + 1) % 8]
        if good == bad:
            bad = "not sure"
        prompt = f"Where is the {topic}?" if i % 2 else f"What about the {topic}? Say it"
        extra = " today" * (i % 3)  # unequal lengths, so padding and masks matter
        if fmt == "standard":
            out.append(
                {"prompt": prompt, "chosen": f" It is {good}{extra}.", "rejected": f" {bad}."}
            )
        elif fmt == "implicit":
            out.append({"chosen": f"{prompt} It is {good}{extra}.", "rejected": f"{prompt} {bad}."})
        elif fmt == "conversational":
            out.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": f"It is {good}{extra}."}],
                    "rejected": [{"role": "assistant", "content": f"{bad}."}],
                }
            )
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return out


def base_kwargs(output_dir: str | Path, **overrides) -> dict:
    """DPOConfig kwargs shared by both sides: fp32, every step logged, no saving, 3 steps."""
    kw = dict(
        output_dir=str(output_dir), bf16=False, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-3, max_length=32, gradient_checkpointing=False, disable_tqdm=True,
        seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    kw.update(overrides)
    return kw


def run(
    impl: str, arch: str, model_root: str | Path, out_dir: str | Path, data: list[dict], **kw
) -> tuple[list[dict], dict]:
    """Train with `impl` ('trl' or 'csd'); return (log_history, final state_dict on CPU).

    The model is loaded from the saved directory on both sides (same init bits); the tokenizer
    is the one saved next to it.
    """
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if impl == "trl":
        from trl import DPOConfig, DPOTrainer
    elif impl == "csd":
        from csd_fast import DPOConfig, DPOTrainer
    else:
        raise ValueError(impl)
    eval_rows = kw.pop("eval_rows", 0)
    eval_dataset = kw.pop("eval_dataset", None)  # any eval object (a dict of sets, ...)
    trainer_kwargs = kw.pop("trainer_kwargs", {})  # e.g. compute_metrics
    train_dataset = kw.pop("train_dataset", None)  # in place of `data` (e.g. a stream of it)
    resume = kw.pop("resume", None)  # train(resume_from_checkpoint=...)
    path, _ = save_tiny(arch, model_root)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tok = AutoTokenizer.from_pretrained(path)
    args = DPOConfig(**base_kwargs(out_dir, **kw))
    if eval_rows:
        eval_dataset = datasets.Dataset.from_list(data[:eval_rows])
    trainer = DPOTrainer(
        model=model, args=args,
        train_dataset=datasets.Dataset.from_list(data) if train_dataset is None else train_dataset,
        eval_dataset=eval_dataset, processing_class=tok, **trainer_kwargs,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    state = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return list(trainer.state.log_history), state


def both_runs(model_root, tmp_path, n: int = 8, **kw):
    """(TRL's (logs, weights), ours) on the same `n` standard rows, in tmp_path/trl and /csd."""
    data = rows("standard", n)
    ref = run("trl", "llama", model_root, Path(tmp_path) / "trl", data, **kw)
    ours = run("csd", "llama", model_root, Path(tmp_path) / "csd", data, **kw)
    return ref, ours


def max_weight_diff(ours: dict, ref: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert ours.keys() == ref.keys()
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def make_trainer(impl: str, model_root, out, subclass=None, **kw):
    """TRL's ('trl') or our ('csd') DPOTrainer on the tiny Llama and 8 standard rows, unstarted;
    `subclass(DPOTrainer)` builds a subclass of either."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if impl == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from csd_fast import DPOConfig, DPOTrainer
    cls = subclass(DPOTrainer) if subclass else DPOTrainer
    path, _ = save_tiny("llama", model_root)
    return cls(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=DPOConfig(**base_kwargs(out, **kw)),
        train_dataset=datasets.Dataset.from_list(rows("standard", 8)),
        processing_class=AutoTokenizer.from_pretrained(path),
    )  # fmt: skip


def csd_trainer(model_root, out, eval_rows=0, callbacks=None, **kw):
    """A csd-fast DPOTrainer on the tiny Llama and 8 standard rows (the first eval_rows: eval)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs, save_tiny

    from csd_fast import DPOConfig, DPOTrainer

    path, _ = save_tiny("llama", model_root)
    data = rows("standard", 8)
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        args=DPOConfig(**base_kwargs(out, **kw)),
        train_dataset=datasets.Dataset.from_list(data),
        eval_dataset=datasets.Dataset.from_list(data[:eval_rows]) if eval_rows else None,
        processing_class=AutoTokenizer.from_pretrained(path), callbacks=callbacks,
    )  # fmt: skip


def step_logs(history: list[dict]) -> list[dict]:
    """Per-step training logs (drop the end-of-training summary with train_runtime etc.)."""
    return [h for h in history if "loss" in h and "train_runtime" not in h]


def eval_logs(history: list[dict]) -> list[dict]:
    """Evaluation entries, without the wall-clock keys (runtime, per-second rates)."""
    timing = ("runtime", "per_second")
    return [
        {k: v for k, v in h.items() if not any(t in k for t in timing)}
        for h in history
        if "eval_loss" in h
    ]


def compare_logs(ours: list[dict], ref: list[dict], rtol=1e-4, atol=1e-6, skip=()) -> list[str]:
    """Every key `ref` logs at each step (and each evaluation) must be in `ours` and agree."""
    problems = []
    if len(eval_logs(ours)) != len(eval_logs(ref)):
        return [f"{len(eval_logs(ours))} evaluations vs TRL's {len(eval_logs(ref))}"]
    ours, ref = step_logs(ours) + eval_logs(ours), step_logs(ref) + eval_logs(ref)
    if len(ours) != len(ref):
        return [f"{len(ours)} logged steps vs TRL's {len(ref)}"]
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        for key, want in r.items():
            if key in skip:
                continue
            if key not in o:
                problems.append(f"step {i}: {key!r} missing (TRL: {want})")
                continue
            got = o[key]
            bad = (
                not math.isclose(got, want, rel_tol=rtol, abs_tol=atol)
                if isinstance(want, float | int)
                else got != want
            )
            if bad:
                problems.append(f"step {i}: {key} = {got!r}, TRL {want!r}")
    return problems


def swapped_trl_script(tmp_path: Path) -> Path:
    """The installed TRL's dpo.py (`trl dpo`) with its two imports of DPOTrainer / DPOConfig
    swapped for csd_fast's, written to `tmp_path/dpo.py`."""
    import trl

    source = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    swaps = {
        "from trl import DPOTrainer, get_dataset,": "from csd_fast import DPOTrainer\n"
        "    from trl import get_dataset,",
        "from trl import DatasetMixtureConfig, DPOConfig, ModelConfig,": "from csd_fast import "
        "DPOConfig\n    from trl import DatasetMixtureConfig, ModelConfig,",
    }
    for old, new in swaps.items():
        assert source.count(old) == 1, f"TRL's script changed: {old!r}"
        source = source.replace(old, new)
    path = tmp_path / "dpo.py"
    path.write_text(source)
    return path


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hist, _ = run("trl", "llama", tmp, Path(tmp) / "out", rows("standard"))
        for h in hist:
            print(h)
