"""InternVL (`InternVLForConditionalGeneration`, the InternVL3 "-hf" checkpoints)."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration

from drivekd.models.backend import VLMBackend

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLBackend(VLMBackend):
    family = "internvl"
    model_class = InternVLForConditionalGeneration
    vision_prefixes = ("vision_tower",)
    projector_prefixes = ("multi_modal_projector",)

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        # One tile per image: the processor's default crop_to_patches=True would tile (docs/method.md §9).
        out = self.image_processor(images, crop_to_patches=False, return_tensors="pt")
        pixels = out["pixel_values"].to(self.model.dtype)
        return {"pixel_values": pixels}, [int(self.model.config.image_seq_length)] * len(images)

    def token_grids(self, pixel_inputs: dict[str, torch.Tensor], counts: list[int]) -> list[tuple[int, int, int]]:
        # A tiled image ends with its thumbnail, one whole-image tile of `image_seq_length` tokens.
        per_tile = int(self.model.config.image_seq_length)
        side = math.isqrt(per_tile)
        return [(count - per_tile, side, side) for count in counts]

    def image_tokens(self, count: int) -> str:
        return IMG_START + IMG_CONTEXT * count + IMG_END


def tiny_config(
    vocab_size: int,
    token_ids: dict[str, int],
    *,
    text: dict[str, Any],
    vision: dict[str, Any],
    image_size: int,
    patch: int,
) -> InternVLConfig:
    tokens = (image_size // patch) ** 2 // 4  # pixel shuffle with downsample ratio 0.5
    return InternVLConfig(
        vision_config={
            "image_size": [image_size, image_size],
            "patch_size": [patch, patch],
            "hidden_size": vision["hidden"],
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision["heads"],
            "intermediate_size": vision["hidden"] * 3,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": text["hidden"],
            "intermediate_size": text["hidden"] * 3,
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "bos_token_id": token_ids["<|im_start|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
        },
        image_token_id=token_ids[IMG_CONTEXT],
        image_seq_length=tokens,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )


def tiny_image_processor(image_size: int) -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False)


def real_config(shape: dict[str, Any], token_ids: dict[str, int]) -> InternVLConfig:
    """A published InternVL3 "-hf" architecture (drivekd/models/shapes.yaml), with our token ids."""
    text, vision = shape["text"], shape["vision"]
    tokens = (vision["image"] // vision["patch"]) ** 2 // 4  # pixel shuffle with downsample ratio 0.5
    return InternVLConfig(
        vision_config={
            "image_size": [vision["image"], vision["image"]],
            "patch_size": [vision["patch"], vision["patch"]],
            "hidden_size": vision["hidden"],
            "intermediate_size": vision["intermediate"],
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision["heads"],
            "attention_bias": True,
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "use_absolute_position_embeddings": True,
            "use_mean_pooling": True,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": text["vocab"],
            "hidden_size": text["hidden"],
            "intermediate_size": text["intermediate"],
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "num_key_value_heads": text["kv_heads"],
            "max_position_embeddings": text["max_positions"],
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "dynamic",
                "factor": text["rope_dynamic_factor"],
                "rope_theta": text["rope_theta"],
            },
            "tie_word_embeddings": text["tied"],
            "bos_token_id": token_ids["<|im_start|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
        },
        image_token_id=token_ids[IMG_CONTEXT],
        image_seq_length=tokens,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text["tied"],  # the class default (True) is not the checkpoints'
    )


def real_image_processor(shape: dict[str, Any]) -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = shape["vision"]["image"]
    return GotOcr2ImageProcessorPil(
        size={"height": side, "width": side},
        crop_to_patches=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
