"""csd-fast's DPOTrainer against TRL 1.16's, side by side: same tiny model, data and seed.

Run: `python -m pytest tests/test_trl_parity.py -q` (about a minute on 2 cores).

Each case trains 3 optimizer steps on 8-12 short pairs in fp32 on CPU with both trainers
(`tests/trl_helpers.py`) and asserts that every key TRL logs at every step (loss, grad_norm,
learning_rate, epoch, rewards/*, logps/*, logits/*, entropy, mean_token_accuracy, num_tokens)
agrees within 1e-4 relative (1e-6 absolute floor for values near 0), and that the final
weights agree. The TRL runs are the truth: see .notes/trl_parity.md for how TRL's loop works.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import WEIGHT_ATOL, compare_logs, rows, run, step_logs

pytest.importorskip("trl")

LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
# Adam turns a gradient into ~lr-sized steps whatever its size, so weights are compared with an
# absolute tolerance well under one step (lr = 1e-3): a real bug moves them by ~1e-3.


def _check(models, tmp_path, arch="llama", fmt="standard", n=12, **kw):
    data = rows(fmt, n)
    ref_logs, ref_w = run("trl", arch, models, tmp_path / "trl", data, **kw)
    our_logs, our_w = run("csd", arch, models, tmp_path / "csd", data, **kw)
    assert len(step_logs(ref_logs)) == kw.get("max_steps", 3)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert our_w.keys() == ref_w.keys()
    worst = max((our_w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"
    return ref_logs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_type(models, tmp_path, loss_type):
    # exo_pair requires label_smoothing > 0; robust is checked with a non-zero flip rate too.
    smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    _check(models, tmp_path, loss_type=loss_type, label_smoothing=smoothing, n=8)


def test_sigmoid_plus_sft_weighted(models, tmp_path):
    _check(models, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], n=8)


def test_ld_alpha_with_sft(models, tmp_path):
    # LD-DPO weights the longer tail; the NLL term stays a plain token mean in TRL
    _check(models, tmp_path, loss_type=["sigmoid", "sft"], ld_alpha=0.5, n=8)


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence(models, tmp_path, f_div):
    _check(models, tmp_path, f_divergence_type=f_div, f_alpha_divergence_coef=0.3, n=8)


def test_eval_metrics_and_sparse_logging(models, tmp_path):
    # logging every 2 steps over 5, eval every 2 and at the end (as HF): same entries, same values
    kw = dict(max_steps=5, logging_steps=2, eval_strategy="steps", eval_steps=2, eval_rows=6)
    data = rows("standard", 12)
    ref_logs, _ = run("trl", "llama", models, tmp_path / "trl", data, **kw)
    our_logs, _ = run("csd", "llama", models, tmp_path / "csd", data, **kw)
    assert [h["step"] for h in step_logs(ref_logs)] == [2, 4]
    assert [h["step"] for h in ref_logs if "eval_loss" in h] == [2, 4, 5]
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("fmt", ["conversational", "implicit"])
def test_dataset_formats(models, tmp_path, fmt):
    _check(models, tmp_path, fmt=fmt, n=8)


def test_qwen2_standard(models, tmp_path):
    _check(models, tmp_path, arch="qwen2", n=8)


@pytest.mark.parametrize(
    ("n", "epochs"),
    [
        # 6 pairs, batch 4: one step per epoch of micro-batches 4 and 2. TRL averages the two
        # micro-batch means unweighted (loss / GA each) -- a pair-weighted mean would differ.
        (6, [1.0, 2.0, 3.0]),
        # 10 pairs: micro-batches 4, 4, 2; the epoch's last step has the single short batch,
        # scaled by 1 not 2, and epochs roll over mid-run.
        (10, [0.6667, 1.0, 1.6667]),
    ],
)
def test_gradient_accumulation(models, tmp_path, n, epochs):
    logs = _check(models, tmp_path, n=n, gradient_accumulation_steps=2, max_steps=3)
    assert [round(h["epoch"], 4) for h in step_logs(logs)] == epochs


def test_precompute_ref_log_probs(models, tmp_path):
    _check(models, tmp_path, n=8, precompute_ref_log_probs=True)


def test_warmup_cosine_clipping(models, tmp_path):
    # a schedule with warmup, weight decay and a clip that bites (grad_norm is logged pre-clip)
    _check(
        models, tmp_path, n=8, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1,
        max_grad_norm=0.5, seed=3,
    )  # fmt: skip


@pytest.mark.parametrize(
    "ext",
    [{"fused": True}, {"ref_cache_dir": "CACHE"}, {"padding_free": True}, {"prefix_sharing": True}],
    ids=["fused", "ref_cache_dir", "padding_free", "prefix_sharing"],
)
def test_extensions_keep_trl_numbers(models, tmp_path, ext):
    """Our extensions on, TRL with its defaults: the logged numbers must not move."""
    if "padding_free" in ext or "prefix_sharing" in ext:
        pytest.importorskip("csd_fast.attention")  # the packed layouts' attention masks
    ext = {k: str(tmp_path / "refcache") if v == "CACHE" else v for k, v in ext.items()}
    data = rows("standard", 8)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data)
    for attempt in range(2 if "ref_cache_dir" in ext else 1):  # 2nd run reads the cache
        our_logs, our_w = run("csd", "llama", models, tmp_path / f"csd{attempt}", data, **ext)
        problems = compare_logs(our_logs, ref_logs)
        assert not problems, "\n".join(problems)
        worst = max((our_w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
@pytest.mark.parametrize(
    "ext", [{}, {"fused": True}, {"padding_free": True}], ids=["padded", "fused", "padding_free"]
)
def test_keep_end_cutting_whole_prompts(models, tmp_path, loss_type, ext):
    """keep_end at 5 tokens keeps no prompt before most chosen answers: nothing predicts their
    first token, yet TRL's |c| for ipo / sigmoid_norm counts it (the fused kernels, which count
    scored tokens, must hand such batches to the torch loss). The rejected keep some prompt."""
    from data_helpers import tiny_tokenizer

    data, tok = rows("standard", 8), tiny_tokenizer()
    length = {k: [len(tok(r[k], add_special_tokens=False)["input_ids"]) for r in data]
              for k in ("chosen", "rejected")}  # fmt: skip
    assert sum(n >= 5 for n in length["chosen"]) >= 4 and max(length["rejected"]) < 5
    kw = dict(loss_type=loss_type, truncation_mode="keep_end", max_length=5)
    with pytest.warns(FutureWarning, match="keep_end"):
        ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data, **kw)
        our_logs, our_w = run("csd", "llama", models, tmp_path / "csd", data, **kw, **ext)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    worst = max((our_w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"


def test_harness_detects_a_difference(models, tmp_path):
    """The comparison is not vacuous: a different beta changes TRL's logged rewards."""
    data = rows("standard", 8)
    a, _ = run("trl", "llama", models, tmp_path / "a", data, beta=0.1)
    b, _ = run("trl", "llama", models, tmp_path / "b", data, beta=0.2)
    assert compare_logs(a, b)
    assert torch.isfinite(torch.tensor([h["loss"] for h in step_logs(a)])).all()


def test_trl_quickstart_example_runs(tmp_path):
    """examples/trl_quickstart.py: TRL's quickstart, csd_fast import, built-in demo model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "trl_quickstart.py"
    spec = importlib.util.spec_from_file_location("trl_quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(tmp_path, max_steps=2, logging_steps=1, save_strategy="no")
    losses = [h["loss"] for h in step_logs(trainer.state.log_history)]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
