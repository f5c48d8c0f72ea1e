"""The Trainer surface TRL users touch (csd_fast/trainer_api.py), checked against TRL 1.16.

Run: `python -m pytest tests/test_trainer_api.py -q` (about 30 s on 2 cores).

The headline check runs TRL's own training script (the installed `trl/scripts/dpo.py`, what
`trl dpo` runs) with only its two `DPOTrainer`/`DPOConfig` imports swapped for csd_fast's, to the
end: TrlParser over our DPOConfig, train, `accelerator.print`, `save_model`, `push_to_hub`,
`hub_model_id`, `end()`. The Hub is intercepted at huggingface_hub's API boundary
(`HfApi.create_repo` / `HfApi.upload_folder`): nothing goes over the network, and what would
have been uploaded is inspected.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import datasets
import pytest
import torch
from trl_helpers import base_kwargs, rows, save_tiny, swapped_trl_script

trl = pytest.importorskip("trl")


class FakeHub:
    """Records create_repo / upload_folder calls and snapshots the folder being uploaded."""

    def __init__(self, monkeypatch):
        import huggingface_hub

        self.repos, self.uploads = [], []

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kw):
            self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, **kw):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            readme = (Path(folder_path) / "README.md").read_text()
            self.uploads.append(dict(repo_id=repo_id, files=files, readme=readme,
                                     ignore=ignore_patterns, **kw))  # fmt: skip
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def test_trl_dpo_script_runs_to_the_end_with_only_the_imports_swapped(
    models, tmp_path, monkeypatch, capsys
):
    model_path, _ = save_tiny("llama", models)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        lines = [json.dumps(r) for r in rows("standard", n)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    hub = FakeHub(monkeypatch)
    out = tmp_path / "out"
    argv = [
        "dpo.py", "--model_name_or_path", model_path, "--dataset_name", str(data),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--bf16", "false", "--use_cpu", "--max_length", "64",
        "--eval_strategy", "steps", "--eval_steps", "1", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--push_to_hub", "--hub_model_id", "me/tiny-dpo",
        "--disable_tqdm", "true", "--gradient_checkpointing", "false",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    runpy.run_path(str(swapped_trl_script(tmp_path)), run_name="__main__")
    printed = capsys.readouterr().out
    assert "Training completed" in printed
    assert "Model pushed to the Hub in https://huggingface.co/me/tiny-dpo" in printed
    assert hub.repos == [{"repo_id": "me/tiny-dpo", "private": None, "exist_ok": True}]
    (up,) = hub.uploads
    assert up["repo_id"] == "me/tiny-dpo" and "checkpoint-*" in up["ignore"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(up["files"])
    assert "- trl\n" in up["readme"] and "- dpo\n" in up["readme"]
    assert str(data) in up["readme"] and "rafailov2023direct" in up["readme"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged if "loss" in h] == [1, 2]
    assert any("eval_loss" in h for h in logged)  # the script's eval set was used


def test_trl_parser_builds_over_every_field():
    """HfArgumentParser passes field metadata to argparse: only argparse's keywords may be there."""
    from trl import TrlParser

    from csd_fast import DPOConfig

    (args,) = TrlParser((DPOConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "o", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"]
    )
    assert isinstance(args, DPOConfig) and args.loss_weights == [1.0, 0.5]


def test_trl_parsers_leave_our_option_checks_alone():
    """HfArgumentParser rewrites dataclass field types in place (`int | None` -> `int`,
    `str | bool` -> `bool`); after TrlParser has parsed TRL's DPOConfig and ours, our checks
    still read the declared types: max_length=None and include_num_input_tokens_seen="no" pass."""
    from trl import DPOConfig as TrlDPOConfig
    from trl import TrlParser

    from csd_fast import DPOConfig
    from csd_fast.validation import check_training_args

    for cls in (TrlDPOConfig, DPOConfig):
        TrlParser((cls,)).parse_args_into_dataclasses(["--output_dir", "o", "--use_cpu"])
    args = DPOConfig(output_dir="o", use_cpu=True, max_length=None)
    assert args.include_num_input_tokens_seen == "no"
    check_training_args(args)
    with pytest.raises(ValueError, match="max_length"):  # the check still runs
        check_training_args(DPOConfig(output_dir="o", use_cpu=True, max_length="long"))


def _trainers(models, tmp_path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import csd_fast

    path, _ = save_tiny("llama", models)
    out = {}
    for name, mod in (("trl", trl), ("csd", csd_fast)):
        out[name] = mod.DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
            args=mod.DPOConfig(**base_kwargs(tmp_path / name, **kw)),
            train_dataset=datasets.Dataset.from_list(rows("standard", 10)),
            eval_dataset={"a": datasets.Dataset.from_list(rows("standard", 4))},
            processing_class=AutoTokenizer.from_pretrained(path),
        )
    return out["trl"], out["csd"]


def test_members_match_trl(models, tmp_path):
    ref, ours = _trainers(models, tmp_path, per_device_train_batch_size=3)
    assert set(ours.model.model_tags) >= set(ref.model.model_tags) >= {"trl", "dpo"}
    assert ours.aux_loss_enabled is ref.aux_loss_enabled is False
    assert len(ours.train_dataset) == len(ref.train_dataset) == 10
    assert ours.train_dataset[3]["chosen_ids"] == ref.train_dataset[3]["chosen_ids"]
    assert set(ours.eval_dataset) == set(ref.eval_dataset) == {"a"}
    assert len(ours.get_train_dataloader()) == len(ref.get_train_dataloader()) == 4
    assert len(ours.get_eval_dataloader("a")) == len(ref.get_eval_dataloader("a"))
    assert ours.is_world_process_zero() is ref.is_world_process_zero() is True
    assert ours.is_local_process_zero() is ref.is_local_process_zero() is True
    assert ours.accelerator.is_main_process and ours.accelerator.device.type == "cpu"
    assert ours.hub_model_id is None

    class Recorder:
        seen: list = []

        def on_log(self, args, state, control, **kw):
            self.seen.append(dict(kw["logs"]))

    ours.add_callback(Recorder)
    assert any(isinstance(cb, Recorder) for cb in ours.callback_handler.callbacks)
    ours.train()
    assert Recorder.seen and "loss" in Recorder.seen[0]
    ours.save_state()
    state = json.loads((tmp_path / "csd" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"] == ours.state.log_history


def test_predict_matches_trl(models, tmp_path):
    ref, ours = _trainers(models, tmp_path)
    test_set = datasets.Dataset.from_list(rows("conversational", 3))
    # TRL's predict takes a tokenized set (it does not prepare one); ours takes the raw rows
    tokenized = ref._prepare_dataset(test_set, ref.processing_class, ref.args, "test")
    want, got = ref.predict(tokenized), ours.predict(test_set)
    # (2P, T, V) logits of the [chosen..., rejected...] rows. TRL's gather keeps only as many rows
    # as the set has pairs (accelerate's remainder rule counts pairs), so it returns the first P
    # rows; ours returns all 2P, and the rows TRL returns are equal
    assert got.predictions.shape[0] == 2 * want.predictions.shape[0] == 6
    n = want.predictions.shape[0]
    torch.testing.assert_close(
        torch.as_tensor(got.predictions[:n]), torch.as_tensor(want.predictions)
    )
    assert (got.label_ids[:n] == want.label_ids).all()
    assert got.metrics["test_loss"] == pytest.approx(want.metrics["test_loss"], rel=1e-5)


def test_model_card_names_base_model_tags_and_citations(models, tmp_path):
    _, ours = _trainers(models, tmp_path)
    ours.model.config._name_or_path = "org/base-model"  # a hub id, as a model loaded by name
    ours.create_model_card(model_name="tiny-dpo", dataset_name="org/prefs", tags=["extra"])
    card = (tmp_path / "csd" / "README.md").read_text()
    head = card.split("---")[1]
    assert "base_model: org/base-model" in head and "datasets: org/prefs" in head
    for tag in ("trl", "dpo", "extra"):
        assert f"- {tag}\n" in head
    assert "rafailov2023direct" in card and "vonwerra2020trl" in card
    assert "https://huggingface.co/datasets/org/prefs" in card
