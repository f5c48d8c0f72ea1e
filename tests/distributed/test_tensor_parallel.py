"""Tensor parallelism on CPU with gloo under torchrun: tp=2 on 2 ranks == 1 process, same batch.

    python -m pytest tests/distributed/test_tensor_parallel.py -q    (a 2- and a 4-rank launch)

One torchrun launch (this file as the worker, mode `tp2`) trains a tiny Qwen2 (q/k/v biases,
grouped-query attention: 4 heads, 2 key-value heads) with `ParallelismConfig(tp_size=2)`: the
layers by the model's own tp_plan, the head sharded over the vocabulary, FSDP2 over a dp mesh
of 1. Each scenario's whole logged history (loss, rewards/*, logps/*, logits/*, grad_norm, eval
metrics) and final weights are compared with one process given the same global batch (tensor
ranks see the same pairs). Tolerance: sharded matmuls and the all-reduced row sums (o_proj,
down_proj, dH) add the same terms in another order, so fp32 results differ in the last bits:
the history to rtol 1e-5; AdamW divides by sqrt(v) + eps, so in an element whose gradient is
within round-off of zero those bits become a fraction of the learning rate (1e-3) per step:
weights to atol 2e-5 (2% of one step; seen: 5e-6). A lost or doubled shard gives errors of
order 1 in the losses. Also: the step-3 checkpoint (DCP of 2-D DTensors) resumes on the same
2 ranks and on one process exactly; `save_model` and `csd export` of it give the full model.
A 4-rank launch (`dp2tp2`, slow) runs the packed scenario on dp_shard_size=2 x tp_size=2.
Refusals (config fields, model shapes, plans) are checked in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import pytest  # noqa: E402
import scenarios  # noqa: E402
import torch  # noqa: E402

TP = dict(parallelism_config={"tp_size": 2})
TP_SCENARIOS = {
    # packed rows (padding_free: the packed attention path on each rank's local heads), eval,
    # checkpoints at 3 and 6
    "tp_packed": dict(padding_free=True, max_steps=6, eval_strategy="steps", eval_steps=3,
                      save_strategy="steps", save_steps=3),
    # padded rows, fused=True (the sharded head's path for every impl), grad accumulation,
    # WPO's weights (use_weighting: log sum p^2 over the sharded vocabulary)
    "tp_padded_fused": dict(fused=True, max_steps=3, gradient_accumulation_steps=2,
                            use_weighting=True),
    # a head tied to the embeddings: the lookup is vocab-parallel too; a reference model of
    # its own (sharded alike), its log-probs precomputed (with the policy's own initial weights
    # step 0's margins would be round-off, and rewards/accuracies a coin toss on it)
    "tp_tied_precompute": dict(padding_free=True, max_steps=3, precompute_ref_log_probs=True),
    # the policy given by path (read by every rank: no meta init under TP)
    "tp_by_path": dict(max_steps=3),
    # the reference store (ref_cache_dir): tensor rank 0 writes the shards both score
    "tp_ref_store": dict(padding_free=True, max_steps=3, ref_cache_shard_size=4),
    # LoRA on colwise (q, v) and rowwise (o, down) projections; the reference is adapters-off
    "tp_lora": dict(padding_free=True, max_steps=3, learning_rate=1e-2, save_strategy="steps",
                    save_steps=3),  # checkpoint-3: what csd export merges
}  # fmt: skip


def tiny_qwen2(tok, tied: bool = False, seed: int = 0):
    return scenarios.tiny_model(tok, tied, seed, arch="qwen2")


def build(name: str, out, tensor_parallel: bool, callbacks=None, dp: int = 1, **overrides):
    """The scenario's trainer: tensor_parallel with tp_size 2 (and `dp` data ranks, each
    given 1/dp of the global batch), else one process."""
    from csd_fast import DPOConfig, DPOTrainer

    tok = scenarios.tiny_tokenizer()
    batch = scenarios.GLOBAL_BATCH // dp
    kw = dict(
        output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
        learning_rate=1e-3, logging_steps=1,
        save_strategy="no", bf16=False, report_to="none", disable_tqdm=True, seed=0,
        gradient_checkpointing=False, use_cpu=True,
    )  # fmt: skip
    kw.update(TP_SCENARIOS[name], **overrides)
    if tensor_parallel:  # accelerate's own object, as a TRL script passes it
        from accelerate import ParallelismConfig

        kw["parallelism_config"] = ParallelismConfig(dp_shard_size=dp, tp_size=2)
    evalset = scenarios.EVAL_ROWS if kw.get("eval_strategy") == "steps" else None
    tied = "tied" in name
    if name == "tp_ref_store":
        kw["ref_cache_dir"] = str(Path(out) / "refstore")
    precomputed = kw.get("precompute_ref_log_probs") or kw.get("ref_cache_dir")
    ref = tiny_qwen2(tok, tied, seed=1) if precomputed else None
    model = model_path(Path(out).parent) if name == "tp_by_path" else tiny_qwen2(tok, tied)
    peft_config = None
    if name == "tp_lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
        )
    return DPOTrainer(
        model, ref_model=ref, peft_config=peft_config, args=DPOConfig(**kw),
        train_dataset=scenarios.ROWS, eval_dataset=evalset, processing_class=tok,
        callbacks=callbacks,
    )  # fmt: skip


def first_q_proj(trainer):
    """Layer 0's q_proj weight (under a LoRA layer: its base layer's)."""
    module = next(m for n, m in trainer.model.named_modules() if n.endswith("0.self_attn.q_proj"))
    return getattr(module, "base_layer", module).weight


def model_path(root: Path) -> str:
    """The tiny Qwen2 saved once under root (by the test, before torchrun starts)."""
    path = root / "models" / "qwen2"
    if not path.exists():
        tok = scenarios.tiny_tokenizer()
        tiny_qwen2(tok).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def save(out: Path, name: str, trainer) -> None:
    result = {"history": scenarios.history(trainer), "weights": scenarios.weights(trainer)}
    if trainer.dist.is_main:
        torch.save(result, out / f"{name}.pt")


def worker(out: Path, mode: str) -> None:
    if mode == "dp2tp2":  # 4 ranks: FSDP2 over 2 data ranks x 2 tensor ranks
        trainer = build("tp_packed", out / "dp2tp2", True, dp=2)
        weight = first_q_proj(trainer)
        trainer.train()
        save(out, "dp2tp2", trainer)
        if trainer.dist.is_main:  # FSDP2 splits each tensor rank's 32 rows again: 16
            layout = (tuple(weight.device_mesh.shape), tuple(weight.to_local().shape))
            torch.save(layout, out / "dp2tp2_layout.pt")
        return
    for name in TP_SCENARIOS:
        trainer = build(name, out / name, True)
        weight = first_q_proj(trainer)
        trainer.train()
        save(out, name, trainer)
        if trainer.dist.is_main:  # what a rank holds: half the q_proj rows, on a (1, 2) mesh
            layout = (tuple(weight.device_mesh.shape), tuple(weight.to_local().shape))
            torch.save(layout, out / f"{name}_layout.pt")
        if name == "tp_packed":
            trainer.save_model(str(out / "export"))
    first = build("tp_packed", out / "resume", True, [scenarios.StopAt(3)])
    first.train()
    resumed = build("tp_packed", out / "resume", True)
    resumed.train(resume_from_checkpoint=True)
    save(out, "resume", resumed)


def torchrun(out: Path, mode: str, ranks: int) -> None:
    env = {**os.environ, "CSD_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(ranks), __file__, str(out), mode]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    model_path(out)
    torchrun(out, "tp2", 2)
    return out


def assert_same(got: dict, want_history, want_weights, skip=frozenset()) -> None:
    from test_fsdp import assert_same_run

    assert_same_run({"history": got["history"], "weights": {}}, want_history, {}, skip)
    assert got["weights"].keys() == want_weights.keys()
    for k, w in want_weights.items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=2e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")  # fmt: skip


def single(name: str, out: Path):
    trainer = build(name, out / name, False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", sorted(TP_SCENARIOS))
def test_two_tensor_ranks_match_one_process(two_ranks, tmp_path, name):
    trainer = single(name, tmp_path)
    got = torch.load(two_ranks / f"{name}.pt", weights_only=False)
    assert torch.load(two_ranks / f"{name}_layout.pt") == ((1, 2), (32, 64))  # sharded: 64 / 2
    assert len(got["history"]) >= 4
    assert_same(got, scenarios.history(trainer), scenarios.weights(trainer))
    if name == "tp_packed":
        assert any("eval_loss" in h for h in got["history"])
    if name == "tp_ref_store":  # one writer per data rank: a complete store, as 1 process's
        from csd_fast.refstore import list_tables, verify_table

        tables = [t for t, _ in list_tables(two_ranks / name / "refstore")]
        assert tables and all(verify_table(t) == {} for t in tables)
        mine = {t.name for t, _ in list_tables(tmp_path / name / "refstore")}
        assert {t.name for t in tables} == mine
        assert all(len(list(t.glob("shard-*.safetensors"))) == 5 for t in tables)


@pytest.mark.slow
def test_two_data_ranks_of_two_tensor_ranks_match_one_process(tmp_path):
    """dp_shard_size=2 x tp_size=2 on 4 ranks (a 2-D mesh: FSDP2 over dp, TP inside)."""
    torchrun(tmp_path, "dp2tp2", 4)
    got = torch.load(tmp_path / "dp2tp2.pt", weights_only=False)
    assert torch.load(tmp_path / "dp2tp2_layout.pt") == ((2, 2), (16, 64))
    trainer = single("tp_packed", tmp_path / "one")
    assert_same(got, scenarios.history(trainer), scenarios.weights(trainer))


def test_tensor_parallel_checkpoint_resumes_on_two_ranks_and_on_one(two_ranks, tmp_path):
    from test_fsdp import RESUMED_SKIP

    want = torch.load(two_ranks / "tp_packed.pt", weights_only=False)
    got = torch.load(two_ranks / "resume.pt", weights_only=False)
    assert_same(got, want["history"], want["weights"], RESUMED_SKIP)
    one = build("tp_packed", tmp_path, False)
    one.train(resume_from_checkpoint=str(two_ranks / "tp_packed" / "checkpoint-3"))
    got = {"history": scenarios.history(one), "weights": scenarios.weights(one)}
    assert_same(got, want["history"], want["weights"], RESUMED_SKIP)


def test_export_of_a_tensor_parallel_checkpoint_is_the_full_model(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from csd_fast.__main__ import main

    want = torch.load(two_ranks / "tp_packed.pt", weights_only=False)["weights"]
    assert main(["export", str(two_ranks / "tp_packed" / "checkpoint-6"), str(tmp_path)]) == 0
    for source in (tmp_path, two_ranks / "export"):  # csd export, and save_model under TP
        got = load_file(source / "model.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (source, k)
        assert got["lm_head.weight"].shape == (len(scenarios.tiny_tokenizer()), 64)


def test_export_of_a_tensor_parallel_lora_checkpoint_merges_the_adapters(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from csd_fast.__main__ import main

    trainer = single("tp_lora", tmp_path)  # the same run on one process, merged below
    want = {k: v.detach() for k, v in trainer.model.merge_and_unload().state_dict().items()}
    assert main(["export", str(two_ranks / "tp_lora" / "checkpoint-3"), str(tmp_path / "m")]) == 0
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert got.keys() == want.keys()  # merged: no lora_A / lora_B left
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-5, msg=k)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(fsdp_config={"cpu_offload": True}), "cpu_offload"),
        (dict(fsdp="hybrid_shard"), "dp_replicate_size"),
        (dict(parallelism_config={"tp_size": 2, "cp_size": 2}), "cp_size"),
    ],
)  # fmt: skip
def test_what_does_not_combine_with_tensor_parallelism_is_refused(kwargs, field):
    from csd_fast import DPOConfig

    kwargs.setdefault("parallelism_config", TP["parallelism_config"])
    with pytest.raises(NotImplementedError, match=field):
        DPOConfig(output_dir="x", **kwargs)


def test_models_tensor_parallelism_cannot_split_are_refused_by_name():
    from peft import LoraConfig, get_peft_model

    from csd_fast.distributed.tensor_parallel import apply_tensor_parallel, check_divisible

    tok = scenarios.tiny_tokenizer()
    model = tiny_qwen2(tok)
    check_divisible(model, 2)  # 4 heads, 2 kv heads, 128 MLP columns, 394 tokens
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_divisible(model, 4)
    odd = tiny_qwen2(tok)
    odd.resize_token_embeddings(395)
    with pytest.raises(ValueError, match="vocab_size=395"):
        check_divisible(odd, 2)
    model.config.base_model_tp_plan = None
    with pytest.raises(NotImplementedError, match="base_model_tp_plan"):
        apply_tensor_parallel(model, _FakeMesh())
    model.config.base_model_tp_plan = {"layers.*.mlp.gate_proj": "packed_colwise"}
    with pytest.raises(NotImplementedError, match="packed_colwise"):
        apply_tensor_parallel(model, _FakeMesh())
    lora = get_peft_model(tiny_qwen2(tok), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(NotImplementedError, match="lm_head"):
        apply_tensor_parallel(lora, _FakeMesh())


class _FakeMesh:
    """A 2-rank mesh's size, for the checks that run before any sharding."""

    def size(self) -> int:
        return 2


def test_one_process_with_tp_size_2_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"tp_size=2 needs a multiple of 2 processes \(torchrun --nproc_per_node\), got 1",
    ):
        build("tp_padded_fused", tmp_path, True)


def test_memory_plan_counts_the_state_over_data_and_tensor_ranks(tmp_path, capsys):
    from test_memory import LLAMA3_8B
    from transformers import LlamaConfig

    from csd_fast.cli import main

    LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 2}).save_pretrained(tmp_path / "m")
    argv = [
        "--plan",
        "--model_name_or_path",
        str(tmp_path / "m"),
        "--dataset_name",
        "x.jsonl",
        "--output_dir",
        str(tmp_path / "o"),
        "--nproc",
        "4",
        "--device_memory_gb",
        "80",
    ]
    assert main([*argv, "--fsdp_config", '{"tp_size": 2}']) in (0, 1)  # fmt: skip
    assert "sharded over 4 device(s)" in capsys.readouterr().out  # 2 data x 2 tensor ranks
    with pytest.raises(ValueError, match=r"1 x 3 != 2 ranks \(of 4 / tp_size 2\)"):
        main([*argv, "--fsdp_config", '{"tp_size": 2, "dp_shard_size": 3}'])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    worker(target, sys.argv[2])
    from csd_fast.distributed.env import shutdown

    shutdown()
