"""Vision-language DPO against TRL 1.16's DPOTrainer, on a tiny LLaVA and Qwen2-VL built locally.

    python -m pytest tests/test_vision_dpo.py -q

Both trainers get the same saved model and processor and the same conversational rows with one
or two images each; they must log the same metrics at every step and end with the same weights
(fp32 on CPU). Also: eval sets, LoRA, the fused head, TRL's refusals (keep_end, a precomputed
reference, a vision set with a plain tokenizer), and the batch itself (every image's visual
tokens present, rejected rows seeing the same images).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl_helpers import WEIGHT_ATOL, base_kwargs, compare_logs, eval_logs, max_weight_diff
from vision_helpers import save_tiny_vlm, vision_rows

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def vlm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    save_tiny_vlm("llava", root)
    return root


def run(impl: str, root: Path, out: Path, data: list[dict], eval_data=None, **kw):
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if impl == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from csd_fast import DPOConfig, DPOTrainer
    path = str(root / "llava")
    peft_config = kw.pop("peft_config", None)
    args = DPOConfig(**base_kwargs(out, **{"max_length": None, **kw}))
    trainer = DPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(path, dtype="float32"), args=args,
        train_dataset=datasets.Dataset.from_list(data),
        eval_dataset=datasets.Dataset.from_list(eval_data) if eval_data else None,
        processing_class=AutoProcessor.from_pretrained(path), peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    state = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
    return trainer.state.log_history, state


def both(root, tmp_path, data, **kw):
    """TRL's run, and ours with csd-fast's own options (`fused`) on top."""
    ours_only = {k: kw.pop(k) for k in ("fused",) if k in kw}
    ref = run("trl", root, tmp_path / "trl", data, **kw)
    ours = run("csd", root, tmp_path / "csd", data, **kw, **ours_only)
    return ref, ours


@pytest.mark.parametrize(
    "kw",
    [{}, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
     {"fused": True, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
     {"max_length": 30}],
    ids=["plain", "accumulation", "fused_sft", "truncated"],
)  # fmt: skip
def test_training_matches_trl(vlm_root, tmp_path, kw):
    (ref_logs, ref_w), (our_logs, our_w) = both(vlm_root, tmp_path, vision_rows(8), **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) < WEIGHT_ATOL


def test_eval_and_lora_match_trl(vlm_root, tmp_path):
    from peft import LoraConfig

    data = vision_rows(8, seed=1)
    lora = lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kw = dict(eval_strategy="steps", eval_steps=2, learning_rate=1e-2, peft_config=lora())
    ref = run("trl", vlm_root, tmp_path / "trl", data, eval_data=data[:3], **kw)
    kw["peft_config"] = lora()
    ours = run("csd", vlm_root, tmp_path / "csd", data, eval_data=data[:3], **kw)
    problems = compare_logs(ours[0], ref[0])
    assert not problems, "\n".join(problems)
    assert eval_logs(ours[0]) and len(eval_logs(ours[0])) == len(eval_logs(ref[0]))
    assert max_weight_diff(ours[1], ref[1]) < WEIGHT_ATOL


@pytest.mark.parametrize("kw", [{}, {"fused": True}], ids=["plain", "fused"])
def test_qwen2_vl_training_matches_trl(tmp_path, kw):
    """Qwen2-VL: variable-size images in 2x2-merged patches and multimodal rotary positions the
    model derives from image_grid_thw; same logs and weights as TRL."""
    from transformers import Qwen2VLForConditionalGeneration
    from vision_helpers import image_only_qwen2_vl_processor, tiny_vlm

    model, (tok, images) = tiny_vlm("qwen2_vl")
    model.save_pretrained(tmp_path / "qwen2_vl")  # TRL reloads its reference from the path
    data, logs, weights = vision_rows(8), [], []
    for impl in ("trl", "csd"):
        if impl == "trl":
            from trl import DPOConfig, DPOTrainer
        else:
            from csd_fast import DPOConfig, DPOTrainer
        import datasets

        args = DPOConfig(**base_kwargs(tmp_path / impl, max_length=None,
                                       **(kw if impl == "csd" else {})))  # fmt: skip
        trainer = DPOTrainer(
            model=Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "qwen2_vl",
                                                                  dtype="float32"),
            args=args, train_dataset=datasets.Dataset.from_list(data),
            processing_class=image_only_qwen2_vl_processor(tok, images),
        )  # fmt: skip
        trainer.train()
        logs.append(trainer.state.log_history)
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    problems = compare_logs(logs[1], logs[0])
    assert not problems, "\n".join(problems)
    assert max_weight_diff(weights[1], weights[0]) < WEIGHT_ATOL


def test_every_image_reaches_the_model_in_both_rows(vlm_root):
    from transformers import AutoProcessor

    from csd_fast.data.vision import VisionCollator, vision_pairs

    processor = AutoProcessor.from_pretrained(vlm_root / "llava")
    pairs = vision_pairs(vision_rows(3))  # 1, 1 and 2 images
    batch = VisionCollator(processor, max_length=None)([pairs[i] for i in range(3)])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_row = (batch.input_ids == image_id).sum(dim=1)
    # 4 patches per image (the CLS feature dropped: "default" strategy), chosen then rejected
    assert per_row.tolist() == [4, 4, 8] * 2
    assert batch.model_kwargs["pixel_values"].shape[0] == 2 * 4  # the 4 images, twice
    assert "position_ids" not in batch.model_kwargs  # the model derives them
    assert all("images" not in t for t in pairs.texts)  # images are read per batch, not kept
    assert int(batch.seq_offsets[-1]) == batch.token_labels.numel()


@pytest.mark.parametrize(
    "kw, match",
    [({"truncation_mode": "keep_end", "max_length": 64}, "keep_end"),
     ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs")],
)  # fmt: skip
def test_trl_refusals_are_kept(vlm_root, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run("csd", vlm_root, tmp_path, vision_rows(2), **kw)


def test_vision_rows_need_a_processor(vlm_root, tmp_path):
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csd_fast import DPOConfig, DPOTrainer

    path = vlm_root / "llava"
    with pytest.raises(ValueError, match="vision-related"):
        DPOTrainer(
            AutoModelForImageTextToText.from_pretrained(path),
            args=DPOConfig(**base_kwargs(tmp_path)),
            train_dataset=datasets.Dataset.from_list(vision_rows(2)),
            processing_class=AutoProcessor.from_pretrained(path).tokenizer,
        )  # fmt: skip


def test_rows_without_images_are_counted_without_decoding():
    import datasets

    from csd_fast.data.vision import rows_without_images

    rows = vision_rows(4)
    rows[1]["images"] = []
    assert rows_without_images(datasets.Dataset.from_list(rows)) == 1
    assert rows_without_images(rows) == 1


def test_padding_free_falls_back_to_padded_rows_as_trl(vlm_root, tmp_path):
    with pytest.warns(UserWarning, match="padding_free is off"):
        logs, _ = run("csd", vlm_root, tmp_path, vision_rows(4), padding_free=True, max_steps=1)
    assert logs[0]["padding_efficiency"] < 1.0  # padded rows


def test_model_and_processor_load_from_the_path(vlm_root, tmp_path):
    import datasets

    from csd_fast import DPOConfig, DPOTrainer

    args = DPOConfig(**base_kwargs(tmp_path, max_steps=1))
    trainer = DPOTrainer(str(vlm_root / "llava"), args=args,
                         train_dataset=datasets.Dataset.from_list(vision_rows(4)))  # fmt: skip
    trainer.train()
    assert type(trainer.processing_class).__name__ == "LlavaProcessor"
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_multimodal_rotary_positions_match_the_models_own_forward():
    """Qwen2-VL places image tokens on a 3-D rotary grid it derives from image_grid_thw: with
    no position ids given, the engine's completion log-probs equal a log-softmax over the
    model's own full-vocabulary logits (its processor needs torchvision, absent here, so the
    rows are assembled from its tokenizer and image processor as the processor would)."""
    from vision_helpers import tiny_vlm

    from csd_fast.forward import sequence_forward
    from csd_fast.trl_collate import batch_from_collated

    model, (tok, images) = tiny_vlm("qwen2_vl")
    rows = vision_rows(2, images_per_row=(1,))
    pix = images(images=[r["images"][0] for r in rows] * 2, return_tensors="pt")
    per_image = [int(g.prod()) // 4 for g in pix["image_grid_thw"]]  # 2 x 2 patches merged
    seqs, masks = [], []
    for k, side in enumerate(("chosen", "chosen", "rejected", "rejected")):
        row = rows[k % 2]
        prompt = tok.encode(f"<|user|>{row['prompt'][0]['content']}<|vision_start|>"
                            + "<|image_pad|>" * per_image[k] + "<|vision_end|><|assistant|>",
                            add_special_tokens=False)  # fmt: skip
        completion = tok.encode(row[side][0]["content"] + "</s>", add_special_tokens=False)
        seqs.append(prompt + completion)
        masks.append([0] * len(prompt) + [1] * len(completion))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    examples = [{"row": 0}, {"row": 1}]
    # what the processor returns with the rows: 1 marks an image token (M-RoPE reads it)
    mm_types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    extra = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"],
             "mm_token_type_ids": mm_types}  # fmt: skip
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    batch = batch_from_collated(examples, out, model_inputs=extra)
    with torch.no_grad():
        ours = sequence_forward(model.eval(), batch, with_stats=False)
        logits = model(input_ids=ids, attention_mask=attention, **extra).logits.double()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = (logps * completion[:, 1:]).sum(dim=1)
    got = torch.cat([ours.chosen_logps, ours.rejected_logps]).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # given 1-D positions instead, the image tokens would sit on a line: a different result
    with torch.no_grad():
        flat = model(input_ids=ids, attention_mask=attention,
                     position_ids=torch.arange(width).expand(4, width), **extra).logits  # fmt: skip
    assert not torch.allclose(flat.double(), logits, atol=1e-4)
