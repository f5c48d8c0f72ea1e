"""`csd train --plan`: the memory planner against numbers worked out by hand for Llama-3-8B.

Llama-3-8B (H=4096, I=14336, L=32, V=128256, 32 heads, 8 KV heads, untied head):
  embeddings V*H = 525,336,576; per layer q,o 2*H*H = 33,554,432, k,v 2*H*1024 = 8,388,608,
  MLP 3*H*I = 176,160,768, two norms 8,192 -> 218,112,000; 32 layers 6,979,584,000;
  final norm 4,096; head 525,336,576 -> P = 8,030,261,248 (the published count).
On 8 ranks, bf16, full training, live reference, 16,384 tokens per micro-batch, checkpointed:
  params 4P/8 = 4,015,130,624        grads 4P/8 = 4,015,130,624
  optimizer 8P/8 = 8,030,261,248     reference 2P/8 = 2,007,565,312
  gathered 2 * head (the largest unit) * 2 bytes = 2,101,346,304
  activations T*H*2*L + T*(6H + 3I)*2 = 4,294,967,296 + 2,214,592,512 = 6,509,559,808
Run: python -m pytest tests/distributed/test_memory.py -q
"""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from csd_fast.distributed.memory import GIB, optimizer_state_bytes, plan_memory

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 tie_word_embeddings=False)  # fmt: skip


def test_llama3_8b_on_eight_ranks_matches_the_hand_count():
    plan = plan_memory(LlamaConfig(**LLAMA3_8B), world_size=8, tokens_per_micro_batch=16384)
    assert plan.params == 8_030_261_248
    assert plan.bytes_per_component == {
        "params": 4_015_130_624,
        "gathered": 2_101_346_304,
        "grads": 4_015_130_624,
        "optimizer": 8_030_261_248,
        "reference": 2_007_565_312,
        "activations": 6_509_559_808,
    }
    # offload moves params, grads and optimizer state to the host
    assert plan.device_total(True) == 2_101_346_304 + 2_007_565_312 + 6_509_559_808
    assert plan.warnings(80 * GIB, offload=False) == []


def test_a_run_that_cannot_fit_is_warned_about_and_offload_changes_the_verdict():
    one = plan_memory(LlamaConfig(**LLAMA3_8B), world_size=1, tokens_per_micro_batch=16384)
    # 4 + 4 + 8 + 2 bytes per parameter: ~135 GiB before activations on one 80 GiB device
    assert one.device_total(False) > 120 * GIB
    (warning,) = one.warnings(80 * GIB, offload=False)
    assert "will not fit" in warning and "cpu_offload" in warning
    assert one.device_total(True) < 80 * GIB and one.warnings(80 * GIB, offload=True) == []


def test_attention_only_training_and_a_cached_reference_shrink_the_plan():
    cfg = LlamaConfig(**LLAMA3_8B)
    full = plan_memory(cfg, world_size=8, tokens_per_micro_batch=4096)
    attn = plan_memory(cfg, world_size=8, tokens_per_micro_batch=4096,
                       trainable_patterns=[r"\.self_attn\."], live_reference=False)  # fmt: skip
    # q,k,v,o of 32 layers: 32 * (33,554,432 + 8,388,608) = 1,342,177,280 trainable
    assert attn.trainable == 1_342_177_280
    assert attn.bytes_per_component["optimizer"] == 1_342_177_280
    assert attn.bytes_per_component["reference"] == 0
    assert attn.device_total(False) < full.device_total(False)


@pytest.mark.parametrize(
    ("optim", "optim_args"),
    [("adamw_torch_fused", None), ("sgd", None), ("sgd", "momentum=0.9"), ("adagrad", None),
     ("rmsprop", "momentum=0.9, centered=True")],
)  # fmt: skip
def test_optimizer_state_follows_optim(tmp_path, optim, optim_args):
    """The planner's state bytes per parameter are what the optimizer csd-fast builds keeps
    after one step (its per-parameter tensors; the scalar step counter aside)."""
    import torch

    from csd_fast import DPOConfig
    from csd_fast.optim import build_optimizer

    model = torch.nn.Linear(64, 32, bias=False)
    args = DPOConfig(output_dir=str(tmp_path), optim=optim, optim_args=optim_args)
    optimizer = build_optimizer(model, args)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    kept = sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.numel() > 1)  # fmt: skip
    per_param = optimizer_state_bytes(optim, optim_args)
    assert per_param == kept // model.weight.numel()
    plan = plan_memory(LlamaConfig(**LLAMA3_8B), world_size=8, tokens_per_micro_batch=16384,
                       optimizer_bytes=per_param)  # fmt: skip
    assert plan.bytes_per_component["optimizer"] == 8_030_261_248 * per_param // 8


def test_plan_flag_prints_the_table_and_fails_when_it_cannot_fit(tmp_path, capsys, monkeypatch):
    from csd_fast.cli import main

    LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 2}).save_pretrained(tmp_path / "m")
    argv = ["--plan", "--model_name_or_path", str(tmp_path / "m"), "--dataset_name", "x.jsonl",
            "--output_dir", str(tmp_path / "o"), "--nproc", "2"]  # fmt: skip
    assert main([*argv, "--device_memory_gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "sharded over 2 device(s)" in out and "optimizer" in out and "cpu offload" in out
    assert main([*argv, "--device_memory_gb", "1"]) == 1
    assert "WARNING" in capsys.readouterr().out
    # no_shard keeps whole copies: the plan of one device; HSDP shards over a node's ranks
    assert main([*argv, "--device_memory_gb", "80", "--fsdp", "no_shard"]) in (0, 1)
    assert "sharded over 1 device(s)" in capsys.readouterr().out
    four = [*argv[:-1], "4", "--device_memory_gb", "80", "--fsdp", "hybrid_shard"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(four) in (0, 1)
    assert "sharded over 2 device(s)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-2"])
def test_nproc_must_be_positive(value):
    from csd_fast.distributed.launch import launch_if_asked

    with pytest.raises(SystemExit):
        launch_if_asked(["--nproc", value])


def test_qlora_plan_counts_the_quantized_base_whole_on_every_rank(tmp_path, capsys):
    """Llama-3-8B, LoRA r=16, 8 ranks. The blocks' linear weights Q = 32 * 218,103,808 =
    6,979,321,856 are quantized: NF4 whole Q/2 + 4Q/64 = 3,925,868,544 bytes, sharded
    Q/16 + 4Q/64 = 872,415,232, double-quantized and sharded Q/16 + Q/64 + 4Q/16384 =
    546,963,456; int8 (always whole) Q + 4 * 32 * 43,008 rows = 6,984,826,880. The rest,
    P - Q = 1,050,939,392, is sharded in fp32: 525,469,696 per rank."""
    from csd_fast.cli import main

    cfg = LlamaConfig(**LLAMA3_8B)
    want = {(4, False, False): 3_925_868_544, (4, False, True): 872_415_232,
            (4, True, True): 546_963_456, (8, False, False): 6_984_826_880}  # fmt: skip
    for (bits, double, sharded), quantized in want.items():
        plan = plan_memory(cfg, world_size=8, tokens_per_micro_batch=16384, lora_rank=16,
                           quantized_bits=bits, double_quant=double,
                           quantized_sharded=sharded)  # fmt: skip
        assert plan.bytes_per_component["quantized"] == quantized, (bits, double)
        assert plan.bytes_per_component["params"] == 525_469_696
        assert plan.bytes_per_component["gathered"] == 2_101_346_304  # the head, unquantized
        assert plan.bytes_per_component["reference"] == 0  # adapters off
    LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 2}).save_pretrained(tmp_path / "m")
    argv = ["--plan", "--model_name_or_path", str(tmp_path / "m"), "--dataset_name", "x.jsonl",
            "--output_dir", str(tmp_path / "o"), "--nproc", "2", "--device_memory_gb", "80",
            "--peft_config", '{"r": 16}',
            "--model_init_kwargs", '{"quantization_config": {"load_in_4bit": true}}']  # fmt: skip
    assert main(argv) == 0  # uint8 storage (the default) under bf16: whole on each device
    q = 2 * 218_103_808  # 2 layers
    assert quantized_row(capsys) == f"{(q // 2 + 4 * q // 64) / GIB:.2f}"
    bf16_storage = {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}
    argv[-1] = json.dumps({"quantization_config": bf16_storage})
    assert main(argv) == 0  # sharded over the 2 ranks, the absmax blocks whole
    assert quantized_row(capsys) == f"{(q // 2 // 2 + 4 * q // 64) / GIB:.2f}"


def quantized_row(capsys) -> str:
    """The `quantized` row's bytes per device without offload, as --plan prints them."""
    row = next(line for line in capsys.readouterr().out.splitlines() if "quantized" in line)
    return row.split()[1]
