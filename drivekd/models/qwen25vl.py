"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from drivekd.models.backend import VLMBackend

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


class Qwen25VLBackend(VLMBackend):
    family = "qwen25vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_prefixes = ("visual",)
    projector_prefixes = ("visual.merger",)

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(images, return_tensors="pt")
        merge = int(self.model.config.vision_config.spatial_merge_size)
        grid = out["image_grid_thw"]
        counts = [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]
        return {"pixel_values": out["pixel_values"].to(self.model.dtype), "image_grid_thw": grid}, counts

    def token_grids(self, pixel_inputs: dict[str, torch.Tensor], counts: list[int]) -> list[tuple[int, int, int]]:
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return [(0, h // merge, w // merge) for _, h, w in pixel_inputs["image_grid_thw"].tolist()]

    def image_tokens(self, count: int) -> str:
        return VISION_START + IMAGE_PAD * count + VISION_END

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # transformers 5 needs the text/image type of every position for the 3-D rotary index.
        return {"mm_token_type_ids": (input_ids == self.visual_token_id).int()}

    sequence_inputs = ("input_ids", "attention_mask", "mm_token_type_ids")

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        # M-RoPE: an image's tokens take 3-D (time, row, column) positions and the text after it
        # continues from the largest, so a token's position is not its index
        model = self.model.model
        positions, _ = model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        return positions


def tiny_config(
    vocab_size: int, token_ids: dict[str, int], *, text: dict[str, Any], vision: dict[str, Any], patch: int
) -> Qwen2_5_VLConfig:
    head_dim = text["hidden"] // text["heads"]
    unit = head_dim // 16  # temporal/height/width rotary sections sum to head_dim / 2, as in Qwen2.5-VL
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": vision["layers"],
            "hidden_size": vision["hidden"],
            "num_heads": vision["heads"],
            "intermediate_size": vision["hidden"] * 3,
            "patch_size": patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": patch * 4,
            "out_hidden_size": text["hidden"],
            "fullatt_block_indexes": list(range(1, vision["layers"], 2)),
        },
        text_config={
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
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * unit, 3 * unit, 3 * unit],
            },
        },
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=vocab_size - 1,  # a spare id: no videos here
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def tiny_image_processor(pixels: int, patch: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )


def real_config(shape: dict[str, Any], token_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """A published Qwen2.5-VL architecture (drivekd/models/shapes.yaml), with our token ids."""
    text, vision = shape["text"], shape["vision"]
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": vision["layers"],
            "hidden_size": vision["hidden"],
            "intermediate_size": vision["intermediate"],
            "num_heads": vision["heads"],
            "patch_size": vision["patch"],
            "spatial_merge_size": vision["merge"],
            "temporal_patch_size": vision["temporal_patch"],
            "window_size": vision["window"],
            "fullatt_block_indexes": vision["full_attention_blocks"],
            "out_hidden_size": text["hidden"],
            "hidden_act": "silu",
        },
        text_config={
            "vocab_size": text["vocab"],
            "hidden_size": text["hidden"],
            "intermediate_size": text["intermediate"],
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "num_key_value_heads": text["kv_heads"],
            "max_position_embeddings": text["max_positions"],
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": text["tied"],
            "bos_token_id": token_ids["<|im_start|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": text["rope_theta"],
                "mrope_section": text["mrope_section"],
            },
        },
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=text["vocab"] - 1,  # a spare id: no videos here
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=text["tied"],
    )


def real_image_processor(shape: dict[str, Any]) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = shape["vision"]
    return Qwen2VLImageProcessorPil(
        patch_size=vision["patch"],
        merge_size=vision["merge"],
        temporal_patch_size=vision["temporal_patch"],
        min_pixels=vision["min_pixels"],
        max_pixels=vision["max_pixels"],
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
