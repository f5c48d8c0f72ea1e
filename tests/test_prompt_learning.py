"""PEFT prompt learning (prompt tuning, P-tuning, prefix tuning) against TRL 1.16's DPOTrainer.

    python -m pytest tests/test_prompt_learning.py -q

csd-fast adds the adapter's virtual tokens in its own forward (csd_fast/prompt_learning.py);
TRL runs PeftModel.forward. Same tiny Llama, same rows: the same logged metrics at every step
and the same trained prompt weights; the reference (adapter disabled) sees no virtual tokens on
either side. Packed layouts are refused, as is a prompt-learning method csd-fast does not add.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import WEIGHT_ATOL, compare_logs, max_weight_diff, rows, run, save_tiny

pytest.importorskip("peft")


def adapter(kind: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    return {"prompt": lambda: PromptTuningConfig(**common),
            "p_tuning": lambda: PromptEncoderConfig(**common, encoder_hidden_size=16),
            "prefix": lambda: PrefixTuningConfig(**common)}[kind]()  # fmt: skip


@pytest.mark.parametrize("kind", ["prompt", "p_tuning", "prefix"])
def test_prompt_learning_matches_trl(models, tmp_path, kind):
    data = rows("standard", 8)
    kw = dict(learning_rate=1e-2, eval_rows=3, eval_strategy="steps", eval_steps=2)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data,
                          trainer_kwargs={"peft_config": adapter(kind)}, **kw)  # fmt: skip
    our_logs, our_w = run("csd", "llama", models, tmp_path / "csd", data,
                          trainer_kwargs={"peft_config": adapter(kind)}, **kw)  # fmt: skip
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) < WEIGHT_ATOL
    prompt = [k for k in our_w if "prompt_encoder" in k]
    assert prompt, sorted(our_w)[:5]
    init = run_init_weights(models, kind)
    assert any(not torch.allclose(our_w[k], init[k]) for k in prompt)  # the prompts trained


def run_init_weights(models, kind: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path, _ = save_tiny("llama", models)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), adapter(kind))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_packed_layouts_and_other_prompt_methods_are_refused(models, tmp_path):
    from peft import MultitaskPromptTuningConfig

    with pytest.raises(ValueError, match="packed layout"):
        run("csd", "llama", models, tmp_path, rows("standard", 4), padding_free=True,
            trainer_kwargs={"peft_config": adapter("prompt")})  # fmt: skip
    other = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="MULTITASK_PROMPT_TUNING"):
        run("csd", "llama", models, tmp_path / "mpt", rows("standard", 4),
            trainer_kwargs={"peft_config": other})  # fmt: skip
