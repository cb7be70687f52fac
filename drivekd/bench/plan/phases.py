"""Where each part counts (resident, or a phase of the step), the phases a plan sums them into, and
the plan itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Where a part counts. "saved" parts stay from the student's forward to its backward; on top of them
# the forward/backward phase takes the largest of three moments: the teacher's forward (its working
# set and the targets it makes), the losses (targets and what the losses save), and the backward (what
# the losses saved, the AGP buffer, and the largest transient: those never coexist).
RESIDENT, SAVED, TRANSIENT = "resident", "saved", "transient"
TEACHER, TARGETS, LOSSES, BACKWARD = "teacher forward", "targets", "losses", "backward"


@dataclass
class Plan:
    kind: str  # "sft" | "distill"
    student: dict[str, Any]
    teachers: list[dict[str, Any]]
    step: dict[str, Any]
    parts: dict[str, int]
    counted: dict[str, list[str]]  # part -> the phases it counts in (resident, saved, transient, ...)
    phases: dict[str, int]  # resident and each phase; peak = resident + the largest phase
    peak: int
    budget: int
    fits: bool
    fsdp: dict[str, Any] | None = None
    # a distillation's teacher cache at the planned length: bytes per sample per storage, the data's samples
    cache: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    advice: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def phases_of(parts: dict[str, int], counted: dict[str, list[str]]) -> dict[str, int]:
    """resident, forward/backward (saved parts and the largest moment), and the other phases."""

    def total(phase: str) -> int:
        return sum(v for k, v in parts.items() if phase in counted[k])

    largest = max([v for k, v in parts.items() if TRANSIENT in counted[k]], default=0)
    moments = (
        total(TEACHER) + total(TARGETS),
        total(TARGETS) + total(LOSSES),
        total(LOSSES) + total(BACKWARD) + largest,
    )
    out = {RESIDENT: total(RESIDENT), "forward/backward": total(SAVED) + max(moments)}
    for phase in ("backward end", "combination", "optimiser step", "vision forward"):
        if any(phase in c for c in counted.values()):
            out[phase] = total(phase)
    return out
