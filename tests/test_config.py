"""`csd_fast.DPOConfig` against `trl.DPOConfig` 1.16: defaults, errors, YAML round trip.

Run: `python -m pytest tests/test_config.py -q`
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings

import pytest
import torch

from csd_fast.config import REMOVED_FIELDS, DPOConfig

trl = pytest.importorskip("trl")

# Fields whose normalised value intentionally differs from TRL's after __post_init__.
INTENDED = {
    # TRL asks torch for the device ("auto" -> 128 on Neuron only); we never pad to a multiple.
    "pad_to_multiple_of",
    # transformers turns None into an AcceleratorConfig object; we do not use accelerate.
    "accelerator_config",
    # transformers: True iff the logger level is above WARN at config time; ours False (bar shown).
    "disable_tqdm",
    # transformers warns and mirrors gradient_checkpointing into activation_checkpointing;
    # we mirror too, compared separately below.
    "activation_checkpointing",
}
OURS_ONLY = {
    "warmup_ratio", "logging_dir", "overwrite_output_dir",  # transformers < 5 names, accepted
    "fused", "prefix_sharing", "ref_cache_dir", "max_tokens_per_batch", "trainable_params",
    "on_bad_row", "min_lr", "clo_lambda", "dataset_cache_dir", "on_fully_truncated",
    "stream_buffer_size", "ref_cache_strict", "ref_cache_shard_size", "plan_cache_dir",
    "resume_with_changes",
}  # fmt: skip


def _plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _trl_config(**kwargs):
    """trl.DPOConfig; whether it warns (gradient_checkpointing's FutureWarning) depends on the
    transformers version (5.23 does, 5.19 does not), so its warnings are not part of the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOConfig(**kwargs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    ref = _trl_config(output_dir=out, bf16=False)
    return DPOConfig(output_dir=out, bf16=False), ref


def test_every_trl_field_is_accepted(pair):
    ours, ref = pair
    names = {f.name for f in dataclasses.fields(ref) if f.init}
    missing = names - {f.name for f in dataclasses.fields(ours)}
    assert not missing, f"TRL fields csd_fast.DPOConfig does not accept: {sorted(missing)}"
    extra = {f.name for f in dataclasses.fields(ours)} - names
    # transformers < 5.2x has no activation_checkpointing fields; ours accepts them on every version
    extra -= {"activation_checkpointing", "activation_checkpointing_kwargs"} - names
    assert extra == OURS_ONLY


def test_defaults_equal_trl_field_by_field(pair):
    ours, ref = pair
    diffs = []
    for f in dataclasses.fields(ref):
        if not f.init or f.name in INTENDED:
            continue
        a, b = _plain(getattr(ours, f.name)), _plain(getattr(ref, f.name))
        if a != b:
            diffs.append(f"{f.name}: ours {a!r}, trl {b!r}")
    assert not diffs, "\n".join(diffs)


def test_documented_trl_defaults(pair):
    ours, _ = pair
    assert ours.learning_rate == 1e-6 and ours.logging_steps == 10
    assert ours.gradient_checkpointing is True and ours.activation_checkpointing is True
    assert ours.loss_type == ["sigmoid"] and ours.beta == 0.1 and ours.max_length == 1024
    assert ours.report_to == [] and ours.eval_strategy == "no" and ours.save_steps == 500
    assert ours.num_train_epochs == 3.0 and ours.max_steps == -1 and ours.warmup_steps == 0
    assert ours.optim == "adamw_torch_fused" and ours.lr_scheduler_type == "linear"
    # extensions off, so the defaults reproduce TRL
    assert not (ours.fused or ours.padding_free or ours.prefix_sharing)
    assert ours.ref_cache_dir is None and ours.trainable_params is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"fp16": False},
        {"bf16": True},
        {"loss_type": "ipo"},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"pad_to_multiple_of": "8"},
        {"pad_to_multiple_of": "none"},
        {"eval_strategy": "steps", "logging_steps": 5},
        {
            "eval_strategy": "steps",
            "eval_steps": 4,
            "save_steps": 8,
            "load_best_model_at_end": True,
        },
        {"metric_for_best_model": "rewards/accuracies"},
        {"report_to": "tensorboard"},
        {"logging_steps": 20.0, "save_steps": 0.5},
        {"warmup_steps": 0.1, "lr_scheduler_type": "cosine"},
        {"include_num_input_tokens_seen": True},
        {"model_init_kwargs": '{"dtype": "float32"}'},
        {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    ],
)
def test_normalisation_matches_trl(tmp_path, kwargs):
    # use_cpu: TRL's bf16 default raises on a machine without a bf16 GPU unless use_cpu is set
    # (ours does not: the trainer falls back to fp32 on CPU).
    kwargs = {"use_cpu": True, **kwargs}
    ours = DPOConfig(output_dir=str(tmp_path), **kwargs)
    ref = _trl_config(output_dir=str(tmp_path), **kwargs)
    for name in ("bf16", "loss_type", "loss_weights", "eval_steps", "do_eval", "logging_steps",
                 "save_steps", "metric_for_best_model", "greater_is_better", "report_to",
                 "warmup_steps", "include_num_input_tokens_seen", "model_init_kwargs",
                 "gradient_checkpointing_kwargs", "lr_scheduler_type"):  # fmt: skip
        assert _plain(getattr(ours, name)) == _plain(getattr(ref, name)), name
    if "pad_to_multiple_of" in kwargs:
        assert ours.pad_to_multiple_of == ref.pad_to_multiple_of


@pytest.mark.parametrize("name", REMOVED_FIELDS)
def test_removed_fields_give_trls_type_error(tmp_path, name):
    with pytest.raises(TypeError) as theirs:
        trl.DPOConfig(output_dir=str(tmp_path), **{name: 1})
    with pytest.raises(TypeError) as ours:
        DPOConfig(output_dir=str(tmp_path), **{name: 1})
    assert str(ours.value) == str(theirs.value)
    assert f"unexpected keyword argument '{name}'" in str(ours.value)


def test_loss_weights_length_checked_like_trl(tmp_path):
    kw = dict(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError) as theirs:
        trl.DPOConfig(**kw)
    with pytest.raises(ValueError) as ours:
        DPOConfig(**kw)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deepspeed": {"optimizer": {"type": "Lamb"}}},
        {"parallelism_config": {"cp_size": 2}},
        {"parallelism_config": {"sp_size": 2}},
        {"fsdp_config": {"min_num_params": 10**6}},
        {"fsdp_config": {"fsdp_xla": True}},
        {"accelerator_config": {"gradient_accumulation_kwargs": {"sync_with_dataloader": False}}},
        {"train_sampling_strategy": "group_by_length"},
    ],
)
def test_unsupported_non_defaults_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(NotImplementedError, match=name):
        DPOConfig(output_dir="x", **kwargs)


def test_transformers_fsdp_words_map_onto_fsdp_config():
    from csd_fast.distributed.env import DistEnv
    from csd_fast.distributed.fsdp import FsdpOptions

    cfg = DPOConfig(output_dir="x", fsdp="shard_grad_op auto_wrap offload")
    assert cfg.fsdp_config == {"reshard_after_forward": False, "cpu_offload": True}
    opts = FsdpOptions.from_args(cfg, DistEnv())
    assert (opts.reshard_after_forward, opts.cpu_offload) == (False, True)
    # an explicit fsdp_config key wins over the word
    cfg = DPOConfig(output_dir="x", fsdp=["full_shard", "offload"], fsdp_config={"cpu_offload": 0})
    assert cfg.fsdp_config == {"reshard_after_forward": True, "cpu_offload": 0}


def test_sharding_layouts_give_the_mesh():
    """transformers' words and accelerate's sizes choose the FSDP2 mesh (replicas, shard)."""
    from accelerate import ParallelismConfig

    from csd_fast.distributed.hf_options import mesh_shape

    layouts = {
        "full_shard": (1, 8), "shard_grad_op": (1, 8), "hybrid_shard": (2, 4),
        "hybrid_shard_zero2": (2, 4), "no_shard": (8, 1),
    }  # fmt: skip
    for words, want in layouts.items():
        cfg = DPOConfig(output_dir="x", fsdp=f"{words} auto_wrap")
        assert mesh_shape(cfg.fsdp_config, world=8, local_world=4) == want, words
    assert DPOConfig(output_dir="x", fsdp="hybrid_shard_zero2").fsdp_config[
        "reshard_after_forward"] is False  # fmt: skip
    pc = ParallelismConfig(dp_replicate_size=4, dp_shard_size=2)
    cfg = DPOConfig(output_dir="x", parallelism_config=pc)
    assert mesh_shape(cfg.fsdp_config, world=8, local_world=8) == (4, 2)
    assert cfg.parallelism_config == {"dp_replicate_size": 4, "dp_shard_size": 2, "tp_size": 1,
                                      "cp_size": 1, "sp_size": 1}  # fmt: skip
    json.dumps(cfg.to_dict())  # the object is kept as plain sizes: the config stays JSON-safe
    with pytest.raises(ValueError, match="does not divide"):
        mesh_shape({"dp_replicate_size": 3}, world=8, local_world=8)
    with pytest.raises(ValueError, match="whole nodes"):
        mesh_shape({"dp_replicate_size": "node"}, world=6, local_world=4)
    with pytest.raises(ValueError, match="2 x 2 != 8"):
        mesh_shape({"dp_replicate_size": 2, "dp_shard_size": 2}, world=8, local_world=8)
    with pytest.raises(ValueError, match="one sharding strategy"):
        DPOConfig(output_dir="x", fsdp="full_shard no_shard")


def test_transformers_fsdp_config_keys_map_onto_ours():
    from csd_fast.models import loads_on_meta

    cfg = DPOConfig(
        output_dir="x", gradient_checkpointing=False,
        fsdp_config={"fsdp_offload_params": True, "transformer_layer_cls_to_wrap": "A, B",
                     "activation_checkpointing": True, "version": 2, "forward_prefetch": True,
                     "state_dict_type": "SHARDED_STATE_DICT", "fsdp_use_orig_params": False,
                     "reduce_dtype": "fp32"},
    )  # fmt: skip
    assert cfg.fsdp_config == {"cpu_offload": True, "layer_classes": ["A", "B"],
                               "reduce_dtype": "fp32"}  # fmt: skip
    assert cfg.gradient_checkpointing  # FSDP's activation checkpointing: the same recompute
    lazy = DPOConfig(output_dir="x", fsdp_config={"fsdp_cpu_ram_efficient_loading": False})
    assert not loads_on_meta(lazy) and loads_on_meta(DPOConfig(output_dir="x"))
    with pytest.raises(ValueError, match="unknown key 'fsdp_bogus'"):
        DPOConfig(output_dir="x", fsdp_config={"fsdp_bogus": 1})
    with pytest.warns(UserWarning, match="FSDP2"):
        DPOConfig(output_dir="x", fsdp_config={"fsdp_version": 1})


def test_transformers_spellings_and_defaults_are_read_as_transformers_reads_them(tmp_path):
    from accelerate import ParallelismConfig
    from transformers import TrainingArguments

    from csd_fast.distributed.hf_options import mesh_shape

    texts = DPOConfig(output_dir="x", fsdp_config={"fsdp_offload_params": "false",
                      "reshard_after_forward": "False", "sync_module_states": "true",
                      "layer_classes": "A,B"})  # fmt: skip
    want = {"cpu_offload": False, "reshard_after_forward": False, "sync_module_states": True,
            "layer_classes": ["A", "B"]}  # fmt: skip
    assert texts.fsdp_config == want
    hybrid = DPOConfig(output_dir="x", fsdp_config={"reshard_after_forward": "HYBRID_SHARD"})
    assert mesh_shape(hybrid.fsdp_config, world=8, local_world=4) == (2, 4)
    assert DPOConfig(output_dir="x", fsdp=True).fsdp_config == {"reshard_after_forward": True}
    # the fsdp_config transformers itself fills in: its defaults are not requests
    theirs = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard").fsdp_config
    DPOConfig(output_dir="x", fsdp_config=dict(theirs))
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_offload_params": True}))
    assert DPOConfig(output_dir="x", fsdp_config=str(path)).fsdp_config == {"cpu_offload": True}
    assert DPOConfig(output_dir="x", parallelism_config=ParallelismConfig()).fsdp_config is None
    as_text = DPOConfig(output_dir="x", parallelism_config='{"dp_replicate_size": 2}')
    assert as_text.fsdp_config == {"dp_replicate_size": 2}
    with pytest.raises(ValueError, match="not a boolean"):
        DPOConfig(output_dir="x", fsdp_config={"cpu_offload": "sometimes"})


def test_accelerator_config_from_a_file_and_its_accumulation_steps(tmp_path):
    path = tmp_path / "accelerate.json"
    path.write_text(json.dumps({"split_batches": True, "even_batches": False,
                                "gradient_accumulation_kwargs": {"num_steps": 4}}))  # fmt: skip
    cfg = DPOConfig(output_dir="x", accelerator_config=str(path))
    assert cfg.accelerator_config["split_batches"] and cfg.gradient_accumulation_steps == 4
    again = DPOConfig(**cfg.to_dict())  # moved into gradient_accumulation_steps: reads back
    assert again.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match="both set"):
        DPOConfig(output_dir="x", accelerator_config=str(path), gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="unknown key"):
        DPOConfig(output_dir="x", accelerator_config={"split_batch": True})
    from transformers.trainer_pt_utils import AcceleratorConfig

    cfg = DPOConfig(output_dir="x", accelerator_config=AcceleratorConfig(split_batches=True))
    assert cfg.accelerator_config["split_batches"] is True


def test_fsdp_compute_dtype_follows_bf16_and_fp16_on_accelerators():
    from csd_fast.distributed.env import DistEnv
    from csd_fast.distributed.fsdp import FsdpOptions

    gpu = DistEnv(rank=0, world_size=2, device=torch.device("cuda", 0))
    cpu = DistEnv(rank=0, world_size=2)
    half = {"fp16": (True, False), "bf16": (False, True)}
    for want, (fp16, bf16) in zip((torch.float16, torch.bfloat16), half.values(), strict=True):
        args = DPOConfig(output_dir="x", fp16=fp16, bf16=bf16)
        assert FsdpOptions.from_args(args, gpu).param_dtype == want
        assert FsdpOptions.from_args(args, cpu).param_dtype is None  # the CPU keeps fp32


def test_hf_argument_parser_leaves_optional_fields_optional():
    """HfArgumentParser (TRL's TrlParser) rewrites `int | None` field types to `int` in place,
    for the rest of the process: a later DPOConfig(max_length=None) must still be valid."""
    from transformers import HfArgumentParser

    HfArgumentParser(DPOConfig)
    assert dataclasses.fields(DPOConfig)[0].type is not None
    max_length = next(f for f in dataclasses.fields(DPOConfig) if f.name == "max_length")
    assert "None" not in str(max_length.type)  # the parser's rewrite, which we must survive
    from csd_fast.validation import check_training_args

    check_training_args(DPOConfig(output_dir="x", max_length=None))


def test_harmless_fields_accepted():
    cfg = DPOConfig(
        output_dir="x", log_level="info", ddp_timeout=60, dataloader_num_workers=2,
        hub_model_id="me/model", do_train=True, remove_unused_columns=False,
    )  # fmt: skip
    assert cfg.ddp_timeout == 60 and cfg.dataloader_num_workers == 2


def test_bad_values_raise():
    with pytest.raises(ValueError, match="on_bad_row"):
        DPOConfig(on_bad_row="ignore")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="dpo")
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        DPOConfig(load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")


def test_padding_free_stays_on_without_warning(recwarn):
    # TRL 1.16 warns and falls back to padding; ours packs for real.
    assert DPOConfig(padding_free=True).padding_free is True
    assert not [w for w in recwarn if "padding" in str(w.message).lower()]


def test_deprecations_warn_like_trl():
    with pytest.warns(FutureWarning, match="pad_token"):
        DPOConfig(pad_token="<pad>")
    with pytest.warns(FutureWarning, match="keep_end"):
        DPOConfig(truncation_mode="keep_end")


def test_output_dir_default():
    assert DPOConfig().output_dir == "trainer_output"


def test_warmup_ratio_compat():
    assert DPOConfig(warmup_ratio=0.1).warmup_steps == 0.1
    assert DPOConfig(warmup_ratio=0.1, warmup_steps=5).warmup_steps == 5


def test_yaml_round_trip(tmp_path):
    cfg = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1, 2],
                    trainable_params=[r"\.self_attn\."], eval_strategy="steps", eval_steps=3,
                    model_init_kwargs={"dtype": "float32"}, report_to="tensorboard")  # fmt: skip
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    again = DPOConfig.from_yaml(path)
    assert again == cfg
    over = DPOConfig.from_yaml(path, beta=0.3, max_steps=7)
    assert (over.beta, over.max_steps, over.loss_weights) == (0.3, 7, [1.0, 2.0])


def test_from_yaml_accepts_dashes_and_rejects_unknown(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max-steps: 4\nlearning_rate: 1.0e-4\n")
    assert DPOConfig.from_yaml(path).max_steps == 4
    path.write_text("rpo_alpha: 1.0\n")
    with pytest.raises(TypeError, match="rpo_alpha"):
        DPOConfig.from_yaml(path)


def test_fields_for_cli_and_loss_params():
    rows = {name: (tp, default, help_) for name, tp, default, help_ in DPOConfig.fields_for_cli()}
    assert rows["beta"][1] == 0.1 and rows["loss_type"][1] == ["sigmoid"]
    assert all(h for _, _, h in rows.values()), "every field needs a help text"
    params = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5], beta=0.2).loss_params()
    assert params.loss_type == ("sigmoid", "sft") and params.loss_weights == (1.0, 0.5)
    assert params.beta == 0.2 and params.clo_lambda == 0.5
