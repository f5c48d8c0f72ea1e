"""TRL 1.16 DPOTrainer features beyond the losses, against TRL's own trainer side by side.

Run: `python -m pytest tests/test_trl_compat.py -q` (about a minute on 2 cores).

MoE router aux loss (Qwen3-MoE, GPT-OSS; GLM-4-MoE has none), named eval sets, precomputed
references then evaluate(new set), TRL's construction-time errors, tool-call conversations, fully
truncated rows, WPO, TR-DPO and compute_metrics: each trained or evaluated by both trainers with
tests/trl_helpers.py and compared key by key (1e-4 relative), as tests/test_trl_parity.py does.
"""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
import torch
from trl_helpers import WEIGHT_ATOL, compare_logs, eval_logs, rows, run, save_tiny, step_logs

pytest.importorskip("trl")


def _both(models, tmp_path, arch="llama", data=None, **kw):
    data = data if data is not None else rows("standard", 8)
    ref = run("trl", arch, models, tmp_path / "trl", data, **kw)
    ours = run("csd", arch, models, tmp_path / "csd", data, **kw)
    return ref, ours


def _assert_same(ref, ours):
    (ref_logs, ref_w), (our_logs, our_w) = ref, ours
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    worst = max((our_w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_moe_router_aux_loss_matches_trl(models, tmp_path, arch):
    ref, ours = _both(models, tmp_path, arch, router_aux_loss_coef=0.5, max_steps=2)
    assert all(h["aux_loss"] > 0 for h in step_logs(ref[0]))  # TRL adds and logs it
    _assert_same(ref, ours)
    # the aux loss reaches the gradient: without it the router weights end elsewhere
    plain, _ = run("csd", arch, models, tmp_path / "plain", rows("standard", 8),
                   router_aux_loss_coef=0.0, max_steps=2)  # fmt: skip
    assert "aux_loss" not in step_logs(plain)[0]


def test_glm4_moe_trains_like_trl_without_an_aux_loss(models, tmp_path):
    # GLM-4-MoE declares no router_aux_loss_coef: TRL adds no aux loss, neither do we
    ref, ours = _both(models, tmp_path, "glm4_moe", max_steps=2)
    assert "aux_loss" not in step_logs(ref[0])[0]
    _assert_same(ref, ours)


def _by_set(history: list[dict], names) -> list[tuple[str, dict]]:
    """(set name, entry) of each evaluation; TRL names only loss/runtime keys, not its metrics."""
    out = []
    for h in history:
        found = [n for n in names if f"eval_{n}_loss" in h]
        if found:
            timing = ("runtime", "per_second")
            out.append((found[0], {k: v for k, v in h.items() if not any(t in k for t in timing)}))
    return out


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_named_eval_sets_match_trl(models, tmp_path, precompute):
    def sets():
        a, b = rows("standard", 6), rows("conversational", 4)
        return {"std": datasets.Dataset.from_list(a), "chat": datasets.Dataset.from_list(b)}

    kw = dict(eval_strategy="steps", eval_steps=2, precompute_ref_log_probs=precompute)
    ref_logs = run("trl", "llama", models, tmp_path / "trl", rows("standard", 8),
                   eval_dataset=sets(), **kw)[0]  # fmt: skip
    our_logs = run("csd", "llama", models, tmp_path / "csd", rows("standard", 8),
                   eval_dataset=datasets.DatasetDict(sets()), **kw)[0]  # fmt: skip
    ref, ours = _by_set(ref_logs, ("std", "chat")), _by_set(our_logs, ("std", "chat"))
    assert [n for n, _ in ref] == [n for n, _ in ours] == ["std", "chat"] * 2  # steps 2 and 3
    for (name, r), (_, o) in zip(ref, ours, strict=True):
        for key, want in r.items():
            if key in ("step", "epoch") or key.startswith(f"eval_{name}_"):
                got = o[key]
            else:  # TRL logs the set's reward metrics unnamed (eval_rewards/...); we name them
                got = o[f"eval_{name}_{key[len('eval_') :]}"]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (name, key)


def _trainer(impl, models, out, data=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import base_kwargs

    if impl == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from csd_fast import DPOConfig, DPOTrainer
    path, _ = save_tiny("llama", models)
    trainer_kw = kw.pop("trainer_kwargs", {})
    args = DPOConfig(**base_kwargs(out, **kw))
    train = data if data is not None else datasets.Dataset.from_list(rows("standard", 8))
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"), args=args,
        train_dataset=train, processing_class=AutoTokenizer.from_pretrained(path), **trainer_kw,
    )  # fmt: skip


def test_precomputed_reference_then_evaluate_a_new_set(models, tmp_path):
    """Before training the policy is the reference; after it, with none left: TRL's error."""
    new = datasets.Dataset.from_list(rows("implicit", 6))
    got = {}
    for impl in ("trl", "csd"):
        trainer = _trainer(impl, models, tmp_path / impl, precompute_ref_log_probs=True)
        got[impl] = trainer.evaluate(new)
        trainer.train()
        with pytest.raises(ValueError, match="after training has started"):
            trainer.evaluate(new)
    for key, want in got["trl"].items():
        if not any(t in key for t in ("runtime", "per_second", "preparation_time", "epoch")):
            assert got["csd"][key] == pytest.approx(want, rel=1e-4, abs=1e-6), key


def _err(impl, models, tmp_path, case):
    from transformers import AutoModelForCausalLM

    path, _ = save_tiny("llama", models)
    kw, data = {}, None
    if case == "no_train_dataset":
        data = "NONE"
    elif case == "dataset_dict":
        data = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("standard", 4))})
    elif case == "ref_is_model":
        kw["trainer_kwargs"] = {}
    elif case == "wpo_aot":
        kw.update(use_weighting=True, loss_type=["aot"])
    elif case == "sync_precompute":
        kw.update(sync_ref_model=True, precompute_ref_log_probs=True)
    elif case == "aux_coef_dense":
        kw.update(router_aux_loss_coef=0.1)
    try:
        if case == "ref_is_model":
            from transformers import AutoTokenizer
            from trl_helpers import base_kwargs

            mod = __import__("trl" if impl == "trl" else "csd_fast")
            m = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
            mod.DPOTrainer(
                model=m, ref_model=m, args=mod.DPOConfig(**base_kwargs(tmp_path / impl)),
                train_dataset=datasets.Dataset.from_list(rows("standard", 4)),
                processing_class=AutoTokenizer.from_pretrained(path),
            )  # fmt: skip
        else:
            _trainer(impl, models, tmp_path / impl, None if data == "NONE" else data, **kw)
            if data == "NONE":
                raise AssertionError("unreachable")
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    return None


@pytest.mark.parametrize(
    "case",
    ["dataset_dict", "ref_is_model", "wpo_aot", "sync_precompute", "aux_coef_dense"],
)
def test_construction_errors_match_trl(models, tmp_path, case):
    want = _err("trl", models, tmp_path, case)
    assert want is not None and want is not AssertionError
    assert _err("csd", models, tmp_path, case) is want


def test_missing_train_dataset_is_refused_at_construction(models, tmp_path):
    from trl_helpers import base_kwargs

    from csd_fast import DPOConfig, DPOTrainer

    path, tok = save_tiny("llama", models)
    for mod_trainer, mod_config in ((DPOTrainer, DPOConfig), _trl_classes()):
        with pytest.raises(ValueError, match="train_dataset"):
            mod_trainer(model=path, args=mod_config(**base_kwargs(tmp_path)), processing_class=tok)


def _trl_classes():
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer, DPOConfig


TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|tools|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tool_rows(n: int) -> list[dict]:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    out = []
    for i, r in enumerate(rows("conversational", n)):
        call = {"type": "function", "function": {"name": "weather", "arguments": {"day": i}}}
        chosen = [  # an assistant turn with tool calls and no content, the tool's answer, a reply
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "name": "weather", "content": "sunny"},
            r["chosen"][0],
        ]
        out.append({**r, "chosen": chosen, "tools": json.dumps(tools)})
    return out


def test_tool_call_conversations_match_trl(tmp_path_factory, tmp_path):
    """Assistant tool calls without content and a `tools` column rendered by the template."""
    import trl_helpers

    root = tmp_path_factory.mktemp("tool_models")
    orig = trl_helpers.tiny_tokenizer
    trl_helpers.tiny_tokenizer = lambda: orig(chat_template=TOOL_TEMPLATE)
    try:
        save_tiny("llama", root)
    finally:
        trl_helpers.tiny_tokenizer = orig
    data = _tool_rows(8)
    ref, ours = _both(root, tmp_path, data=data, max_length=128)
    _assert_same(ref, ours)


def test_fully_truncated_rows_dropped_as_trl_with_a_warning(models, tmp_path):
    data = rows("standard", 8)
    data[2]["prompt"] = data[5]["prompt"] = "What about the sky and the sea? " * 6
    ref = run("trl", "llama", models, tmp_path / "trl", data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run("csd", "llama", models, tmp_path / "csd", data)
    (msg,) = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert "dropped 2 example(s)" in msg and "rejected_rows_train.jsonl" in msg
    rejects = (tmp_path / "csd" / "rejected_rows_train.jsonl").read_text().splitlines()
    assert [json.loads(r)["row"] for r in rejects] == [2, 5]
    _assert_same(ref, ours)


def test_fully_truncated_rows_stop_when_asked(models, tmp_path):
    from csd_fast.data import PreferenceDataError

    data = rows("standard", 4)
    data[1]["prompt"] = "What about the sky and the sea? " * 6
    with pytest.raises(PreferenceDataError, match="row 1"):
        _trainer("csd", models, tmp_path, datasets.Dataset.from_list(data),
                 on_fully_truncated="error")  # fmt: skip


def test_wpo_weighting_matches_trl(models, tmp_path):
    _assert_same(*_both(models, tmp_path, use_weighting=True))


def test_tr_dpo_reference_sync_matches_trl(models, tmp_path):
    # the reference moves every step (alpha 0.5): a wrong mix shows in the rewards at step 2
    ref, ours = _both(models, tmp_path, sync_ref_model=True, ref_model_sync_steps=1,
                      ref_model_mixup_alpha=0.5)  # fmt: skip
    _assert_same(ref, ours)


def test_tr_dpo_refuses_a_cached_reference(models, tmp_path):
    with pytest.raises(ValueError, match="ref_cache_dir"):
        _trainer("csd", models, tmp_path, sync_ref_model=True, ref_cache_dir=str(tmp_path / "c"))


def _top1(pred) -> dict:
    """A metric of both arrays: next-token argmax hits over the non-padding label positions."""
    hits = pred.predictions.argmax(-1)[:, :-1] == pred.label_ids[:, 1:]
    real = pred.label_ids[:, 1:] >= 0
    return {"top1": float(hits[real].mean()), "rows": float(pred.predictions.shape[0])}


def test_compute_metrics_on_eval_predictions_matches_trl(models, tmp_path):
    # 4 eval pairs in batches of 2: with an odd count TRL's gather (accelerate's remainder rule,
    # which counts pairs, not rows) would drop the last rejected row; we pass every row
    kw = dict(eval_strategy="steps", eval_steps=3, eval_rows=4, per_device_eval_batch_size=2,
              trainer_kwargs={"compute_metrics": _top1})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, ours = _both(models, tmp_path, **kw)
    assert eval_logs(ref[0])[-1]["eval_rows"] == 8.0  # 4 pairs -> 8 rows of logits
    _assert_same(ref, ours)


def test_torch_compile_keeps_trl_numbers(models, tmp_path):
    data = rows("standard", 8)
    ref = run("trl", "llama", models, tmp_path / "trl", data)
    ours = run("csd", "llama", models, tmp_path / "csd", data, torch_compile=True,
               torch_compile_backend="eager")  # fmt: skip
    _assert_same(ref, ours)


def test_liger_on_cpu_warns_and_keeps_trl_numbers(models, tmp_path):
    data = rows("standard", 8)
    ref = run("trl", "llama", models, tmp_path / "trl", data)
    with pytest.warns(UserWarning, match="cannot run here"):
        ours = run("csd", "llama", models, tmp_path / "csd", data, use_liger_kernel=True)
    _assert_same(ref, ours)
    assert torch.isfinite(torch.tensor([h["loss"] for h in step_logs(ours[0])])).all()


def test_training_summary_carries_the_unlogged_window_like_trl(models, tmp_path):
    # 3 steps logged every 2: TRL's final summary holds step 3's metrics (its log() adds them)
    (ref, _), (ours, _) = _both(models, tmp_path, logging_steps=2)
    want, got = ref[-1], ours[-1]
    assert "train_runtime" in want and "rewards/margins" in want
    for key in ("rewards/margins", "logps/chosen", "entropy", "num_tokens", "train_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
