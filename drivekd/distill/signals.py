"""Distillation signals: what a teacher's internals tell the student, and how far apart they are.

A signal is data (kind, layers, distance, weight), read from a recipe YAML. Every loss here is
per sample, shape `(B,)`, so multi-teacher mixing can weight samples by their capability. Maps are
head-averaged attention probabilities `(B, T, T)` of student and teacher over the same token
sequence (same tokenizer and visual layout); padding is excluded from every mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from drivekd.distill.capture import resolve_layer

Kind = Literal["attn_tv", "attn_full", "attn_group", "hidden", "logit_kl"]


@dataclass(frozen=True)
class Signal:
    kind: Kind
    layer: int | None = None  # attn_tv, attn_full, hidden: one layer index (negative counts from the end)
    layers: tuple[int, int] | None = None  # attn_group / hidden: inclusive range, group-matched to the teacher's
    distance: Literal["mse", "cosine"] = "mse"
    temperature: float = 1.0  # logit_kl
    weight: float = 1.0

    def student_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            lo, hi = (resolve_layer(i, num_layers) for i in self.layers or (0, -2))
            return list(range(lo, hi + 1))
        if self.kind == "logit_kl":
            return []
        return [resolve_layer(self.layer if self.layer is not None else 0, num_layers)]

    def teacher_layers(self, student_layers: int, teacher_layers: int) -> list[int]:
        if self.layers is not None:
            lo, hi = (resolve_layer(i, teacher_layers) for i in self.layers or (0, -2))
            return list(range(lo, hi + 1))
        return self.student_layers(teacher_layers)

    @property
    def needs_attention(self) -> bool:
        return self.kind.startswith("attn")


def group_windows(student: list[int], teacher: list[int]) -> list[tuple[int, list[int]]]:
    """The sliding-window rule (method doc §3): student layer i <- mean of teacher t_i .. t_{i+g-1}.

    g = max(1, m - k + 1) for k student and m teacher layers; the window start is clipped to m - g.
    24-layer student, 28-layer teacher, range 0..-2: k = 23, m = 27, g = 5.
    """
    k, m = len(student), len(teacher)
    g = max(1, m - k + 1)
    out = []
    for i, s in enumerate(student):
        start = min(i, m - g)
        out.append((s, teacher[start : start + g]))
    return out


@dataclass
class Positions:
    """What the losses need to know about each position of a batch."""

    valid: torch.Tensor  # (B, T) bool: real tokens (not padding)
    visual: torch.Tensor  # (B, T) bool: visual-token positions
    answer: torch.Tensor  # (B, T) bool: positions whose next token is an answer token (for logits)

    def pair_mask(self, block: str) -> torch.Tensor:
        rows = self.valid
        cols = self.valid
        if block == "tv":
            rows = rows & ~self.visual
            cols = cols & self.visual
        return rows[:, :, None] & cols[:, None, :]


def map_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-sample distance between two `(B, T, T)` maps over the `mask` entries."""
    m = mask.to(student.dtype)
    if distance == "mse":
        return ((student - teacher.to(student.dtype)) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    s = (student * m).flatten(1)
    t = (teacher.to(student.dtype) * m).flatten(1)
    return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)


def attention_loss(
    signal: Signal,
    student_maps: dict[int, torch.Tensor],
    student_layers: list[int],
    targets: list[torch.Tensor],
    positions: Positions,
) -> torch.Tensor:
    """Mean over matched layers of the per-sample map distance; `targets[k]` is the teacher map
    (a group window's mean for `attn_group`) matched to `student_layers[k]`."""
    mask = positions.pair_mask("tv" if signal.kind == "attn_tv" else "full")
    losses = [
        map_distance(student_maps[s], t, mask, signal.distance) for s, t in zip(student_layers, targets, strict=True)
    ]
    return torch.stack(losses).mean(0)


def hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    positions: Positions,
    projection: torch.nn.Module | None,
    distance: str,
) -> torch.Tensor:
    """Per-sample distance of hidden states `(B, T, D)` over valid positions (projected if widths differ)."""
    s = projection(student) if projection is not None else student
    t = teacher.to(s.dtype)
    m = positions.valid.to(s.dtype)
    if distance == "mse":
        return (((s - t) ** 2).mean(-1) * m).sum(1) / m.sum(1).clamp_min(1.0)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
    return ((1.0 - cos) * m).sum(1) / m.sum(1).clamp_min(1.0)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, positions: Positions, temperature: float) -> torch.Tensor:
    """Per-sample KL(teacher || student) at temperature τ, times τ², on answer-predicting positions."""
    tau = temperature
    log_s = torch.log_softmax(student.float() / tau, dim=-1)
    log_t = torch.log_softmax(teacher.float() / tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * tau * tau
    m = positions.answer.to(kl.dtype)
    return (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
