"""DeepSpeed ZeRO configs read as csd-fast's FSDP2 options (csd_fast/distributed/deepspeed_config).

    python -m pytest tests/distributed/test_deepspeed_config.py -q

A ZeRO-3 file in the style transformers documents ("auto" everywhere DPOConfig decides) maps
onto full_shard with CPU offload; values that disagree with DPOConfig are all listed in one
error; what FSDP2 cannot do is refused by name. The 4-rank run of a ZeRO-2 config against one
process is in test_hsdp.py ("deepspeed").
"""

from __future__ import annotations

import json

import pytest

from csd_fast import DPOConfig

ZERO3 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto",
                  "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                  "total_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
        "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}  # fmt: skip


def test_zero3_file_runs_as_full_shard_with_offload(tmp_path):
    path = tmp_path / "ds_zero3.json"
    path.write_text(json.dumps(ZERO3))
    with pytest.warns(UserWarning, match="ZeRO stage 3 runs as csd-fast's FSDP2"):
        cfg = DPOConfig(output_dir="x", deepspeed=str(path))
    assert cfg.fsdp_config == {"reshard_after_forward": True, "cpu_offload": True}
    json.dumps(cfg.to_dict())


@pytest.mark.parametrize(
    "stage, want",
    [(0, {"dp_replicate_size": "all"}), (1, {"reshard_after_forward": False}),
     (2, {"reshard_after_forward": False}), (3, {"reshard_after_forward": True})],
)  # fmt: skip
def test_stages_map_onto_fsdp2_layouts(stage, want):
    with pytest.warns(UserWarning):
        cfg = DPOConfig(output_dir="x", deepspeed={"zero_optimization": {"stage": stage}})
    assert cfg.fsdp_config == want


def test_values_that_disagree_with_dpoconfig_are_all_named():
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 8, "gradient_clipping": 1.0, "fp16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}}}  # fmt: skip
    with pytest.raises(ValueError) as err:
        DPOConfig(output_dir="x", deepspeed=ds, per_device_train_batch_size=2)
    text = str(err.value)
    for name in ("train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=8",
                 "fp16.enabled=True", "optimizer.params.lr=0.0003",
                 "optimizer.params.betas[1]=0.95"):  # fmt: skip
        assert name in text, name
    assert "gradient_clipping" not in text  # 1.0 is DPOConfig's max_grad_norm
    agreeing = dict(ds, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                    fp16={"enabled": False}, optimizer={"type": "AdamW",
                    "params": {"lr": 1e-6, "betas": [0.9, 0.999]}})  # fmt: skip
    with pytest.warns(UserWarning):
        DPOConfig(output_dir="x", deepspeed=agreeing, per_device_train_batch_size=2)


@pytest.mark.parametrize(
    "ds, match",
    [({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "NVMe"),
     ({"optimizer": {"type": "Lamb"}}, "Lamb"),
     ({"scheduler": {"type": "OneCycle"}}, "OneCycle"),
     ({"activation_checkpointing": {"partition_activations": True}}, "partitioned")],
)  # fmt: skip
def test_what_fsdp2_cannot_do_is_refused_by_name(ds, match):
    with pytest.raises(NotImplementedError, match=match):
        DPOConfig(output_dir="x", deepspeed=ds)


def test_bad_files_and_keys_name_the_problem(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json is not valid JSON"):
        DPOConfig(output_dir="x", deepspeed=str(bad))
    with pytest.raises(ValueError, match="neither a dict nor a JSON file"):
        DPOConfig(output_dir="x", deepspeed=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown key 'zero_optimisation'"):
        DPOConfig(output_dir="x", deepspeed={"zero_optimisation": {"stage": 3}})
    with pytest.raises(ValueError, match="choose one"):
        DPOConfig(output_dir="x", deepspeed={"zero_optimization": {"stage": 3}},
                  fsdp="full_shard")  # fmt: skip
