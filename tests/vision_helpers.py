"""Tiny vision-language models and vision preference rows, built locally (no Hub).

    path = save_tiny_vlm("llava", root)     # model + processor saved under root/llava
    data = vision_rows(8)                    # conversational rows with one or two PIL images

LLaVA: a 1-layer CLIP vision tower (16x16 images, 8x8 patches: 4 visual tokens + CLS) and a
2-layer Llama; Qwen2-VL: a 1-layer vision tower with 2x2 patch merging and multimodal rotary
positions. Both use the byte-level tokenizer of tests/data_helpers.py with the model's image
tokens added and a chat template that renders structured content.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from data_helpers import tiny_tokenizer  # noqa: E402

VLMS = ("llava", "qwen2_vl")
# one template for both: `image` blocks become the model's image marker
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_marker }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MARKERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def _tokenizer(arch: str):
    marker = MARKERS[arch]
    tok = tiny_tokenizer(TEMPLATE.replace("{{ image_marker }}", marker))
    extra = ["<image>"] if arch == "llava" else [
        "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def tiny_vlm(arch: str, seed: int = 0):
    """(model, processor) of a tiny VLM with random weights, fp32."""
    import torch
    from transformers import LlamaConfig

    tok = _tokenizer(arch)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                tie_word_embeddings=False)  # fmt: skip
    if arch == "llava":
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
        config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default",
                             vision_feature_layer=-1)  # fmt: skip
        images = CLIPImageProcessor(size={"shortest_edge": 16},
                                    crop_size={"height": 16, "width": 16})  # fmt: skip
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default",
                                   chat_template=tok.chat_template,
                                   num_additional_image_tokens=1)  # fmt: skip
        return LlavaForConditionalGeneration(config).float(), processor
    if arch == "qwen2_vl":
        # Qwen2VLProcessor needs torchvision (its video processor), which this machine lacks
        # (ENV.md): the model comes with its tokenizer and image processor instead
        from transformers import (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen2VLImageProcessorPil,
        )

        ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
        text = {**text, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                            "rope_theta": 10000.0}}  # fmt: skip
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3)  # fmt: skip
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=24 * 24, patch_size=4,
                                          merge_size=2, temporal_patch_size=2)  # fmt: skip
        return Qwen2VLForConditionalGeneration(config).float(), (tok, images)
    raise ValueError(f"unknown VLM {arch!r}; expected one of {VLMS}")


def image_only_qwen2_vl_processor(tok, images):
    """Qwen2VLProcessor without its video processor (which needs torchvision, absent here):
    the same image placeholder expansion and chat template, built from the pieces we have."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # Qwen2VLProcessor.__init__ minus the video processor it would type-check
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor(images, tok, chat_template=tok.chat_template)


def save_tiny_vlm(arch: str, root: str | Path) -> str:
    """Model and processor under root/arch (LLaVA: Qwen2-VL has no processor here)."""
    path = Path(root) / arch
    if not (path / "config.json").exists():
        model, processor = tiny_vlm(arch)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return str(path)


def vision_rows(n: int = 8, seed: int = 0, images_per_row=(1, 1, 2)) -> list[dict]:
    """Conversational vision preference rows with random RGB images of a few sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    answers = ["a red ball", "the sky", "two cats on the mat", "blue", "green", "a dog"]
    out = []
    for i in range(n):
        count = images_per_row[i % len(images_per_row)]
        sizes = [(16 + 4 * ((i + k) % 3), 16 + 4 * (k % 2)) for k in range(count)]
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                  for h, w in sizes]  # fmt: skip
        out.append({
            "images": images,
            "prompt": [{"role": "user", "content": "What is in the picture?" + " Say" * (i % 2)}],
            "chosen": [{"role": "assistant", "content": answers[i % 6] + "."}],
            "rejected": [{"role": "assistant", "content": answers[(i + 2) % 6] + " maybe"}],
        })  # fmt: skip
    return out
