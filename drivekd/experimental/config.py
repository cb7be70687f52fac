"""The experimental objectives' configs: a product config plus the objective's own section.

Kept apart from the objectives (which import torch) so the command line reads them cheaply.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field, model_validator

from drivekd.domains import Fraction, LayerIndex, NonNegativeFloat, PositiveFloat
from drivekd.train.config import DistillConfig, SFTConfig, _Strict


class ReweightConfig(_Strict):
    """Online loss reweighting (docs/method.md §4)."""

    lr: PositiveFloat = Field(3e-4, description="learning rate of the loss weights")
    alpha: NonNegativeFloat = Field(0.0, description="restoring-force exponent of the reweighting")
    ce_floor: Fraction = Field(0.6, description="the cross-entropy weight's lower bound")


class ReweightDistillConfig(DistillConfig):
    """A distillation run whose loss weights move during training (`drivekd experimental distill-reweight`)."""

    moved: ClassVar[dict[str, str]] = {
        **{k: v for k, v in DistillConfig.moved.items() if k != "reweight"},
        "reweight.enabled": "is gone: this command always reweights (for fixed weights run `drivekd distill`)",
    }

    reweight: ReweightConfig = Field(
        ReweightConfig(), description="online loss reweighting from gradient norms (true: its defaults)"
    )

    @staticmethod
    def expand_shorthands(raw: Any) -> Any:
        """The distillation config's shorthands, and `reweight: true` for the section's defaults."""
        raw = DistillConfig.expand_shorthands(raw)
        if isinstance(raw, dict) and raw.get("reweight") is True:
            raw["reweight"] = {}
        return raw

    @model_validator(mode="before")
    @classmethod
    def _reweighting(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("reweight") is False:
            raise ValueError("reweight: false: this command reweights; for fixed weights run `drivekd distill`")
        return raw

    @model_validator(mode="after")
    def _needs_gradient_norms(self) -> ReweightDistillConfig:
        if self.combine.strategy == "sum":
            raise ValueError("reweight needs per-loss gradient norms: use a projection strategy (e.g. agp), not sum")
        return self


class TagAttentionConfig(_Strict):
    """The tag-attention loss (docs/configuration.md, "Tag attention")."""

    weight: PositiveFloat = Field(
        1.0,
        description="weight of a loss pulling one head's attention from the answer onto the visual token under "
        "the object the sample is about (teaches a model from scratch where to look)",
    )
    layer: LayerIndex | None = Field(
        None, description="the LM layer it supervises (negative from the end); None: the middle one"
    )


class TagAttentionSFTConfig(SFTConfig):
    """An SFT run with the tag-attention loss beside the CE (`drivekd experimental sft-tag-attention`)."""

    moved: ClassVar[dict[str, str]] = {
        "train.tag_attention_weight": "is `tag_attention.weight` in this command",
        "train.tag_attention_layer": "is `tag_attention.layer` in this command",
    }

    tag_attention: TagAttentionConfig = Field(TagAttentionConfig(), description="the tag-attention loss")


# `drivekd experimental <command>`: its config
CONFIGS: dict[str, type[BaseModel]] = {
    "distill-reweight": ReweightDistillConfig,
    "sft-tag-attention": TagAttentionSFTConfig,
}
