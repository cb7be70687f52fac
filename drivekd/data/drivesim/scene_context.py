"""What every question template builds on: the `SceneContext` it reads, the `QA` items it returns.

A `SceneContext` holds one snapshot, what each camera shows and the counterfactual rollouts, with
each car's `Relation` to the ego. A `QA` is one question and its answer; a multiple-choice one
carries its `Options` until the whole dataset's answers are known (`mc_options.render_options`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivekd.data.drivesim.camera import Visible
from drivekd.data.drivesim.world import ACTIONS, Car, RolloutResult, Snapshot

HORIZON_S = 3.0
LANE_WIDTH = 4.0


@dataclass
class QA:
    capability: str
    question_type: str
    question: str
    answer: str
    choices: dict[str, str] | None = None
    correct_choice: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    options: Options | None = None  # multiple choice before its options are drawn (`render_options`)
    # (camera, vehicle index, context): shown a close-up of that vehicle alone instead of the
    # scene's cameras (`objects.close_up`)
    close_up: tuple[str, int, float] | None = None


@dataclass
class Options:
    """A multiple-choice item whose distractors are drawn once the whole dataset's answers are known.

    Drawing distractors uniformly from every other class leaks the answer: rare classes then show up
    as distractors far more often than as answers, so "pick the most common offered class" beats the
    image. Drawn in proportion to how often each class is the answer, every offered option is about
    equally likely to be right a priori.
    """

    stem: str
    correct: str
    pool: list[str]
    n: int
    evidence: list[str]


@dataclass
class Relation:
    """Where a car is relative to the ego, in the ego's road frame."""

    car: Car
    ahead: float  # longitudinal centre offset, + ahead
    lateral: float  # + to the right
    gap: float  # bumper-to-bumper distance along the road (0 when overlapping)

    @property
    def lane(self) -> str:
        if abs(self.lateral) < LANE_WIDTH / 2:
            return "same"
        if abs(self.lateral) < 1.5 * LANE_WIDTH:
            return "left" if self.lateral < 0 else "right"
        return "far left" if self.lateral < 0 else "far right"

    def where(self) -> str:
        side = {"same": "in the same lane", "left": "in the left lane", "right": "in the right lane"}
        side.update({"far left": "two lanes to the left", "far right": "two lanes to the right"})
        return f"{self.gap:.0f} m {'ahead' if self.ahead > 0 else 'behind'}, {side[self.lane]}"


@dataclass
class SceneContext:
    snap: Snapshot
    visible: dict[str, list[Visible]]
    rollouts: dict[str, RolloutResult]
    rng: np.random.Generator
    relations: dict[int, Relation] = field(init=False)

    def __post_init__(self) -> None:
        ego = self.snap.ego
        fwd = np.array([math.cos(ego.heading), math.sin(ego.heading)])
        right = np.array([-fwd[1], fwd[0]])
        self.relations = {}
        for car in self.snap.cars:
            d = np.array([car.x - ego.x, car.y - ego.y])
            ahead, lateral = float(d @ fwd), float(d @ right)
            gap = max(0.0, abs(ahead) - (car.length + ego.length) / 2)
            self.relations[car.index] = Relation(car, ahead, lateral, gap)

    @property
    def ego(self) -> Car:
        return self.snap.ego

    def thin(self, common: bool, keep: float) -> bool:
        """True when a question about a very common class should be dropped (keeps majority baselines low)."""
        return common and self.rng.random() >= keep

    def speed_line(self) -> str:
        return f"Ego speed: {self.ego.speed:.1f} m/s (1 s ago: {self.snap.ego_speed_1s_ago:.1f} m/s).\n"

    def tagged(self) -> list[tuple[str, Visible]]:
        """Every visible vehicle with its camera, nearest first within each camera."""
        return [(cam, v) for cam, vs in self.visible.items() for v in vs]

    def safe_actions(self) -> list[str]:
        return [a for a in ACTIONS if self.rollouts[a].available and not self.rollouts[a].collided]

    def collision_actions(self) -> list[str]:
        return [a for a in ACTIONS if self.rollouts[a].available and self.rollouts[a].collided]

    def unavailable_actions(self) -> list[str]:
        return [a for a in ACTIONS if not self.rollouts[a].available]


def deferred_mc(
    ctx: SceneContext,
    capability: str,
    qtype: str,
    question: str,
    correct: str,
    distractors: list[str],
    n: int,
    evidence: list[str],
    facts: dict[str, Any],
) -> QA:
    """A multiple-choice item whose options are drawn once the whole dataset is known (`render_options`)."""
    options = Options(question, correct, distractors, n, evidence)
    return QA(capability, qtype, question, "", facts={**facts, "label": facts.get("label", correct)}, options=options)


def describe(car: Car) -> str:
    return f"{car.colour} {car.body}"


def status_of(car: Car) -> str:
    if car.signal is not None:
        return car.signal
    return "braking" if car.braking else "ahead"


def balanced_pick(ctx: SceneContext, items: list[Any], label: Callable[[Any], str]) -> Any:
    """Pick an item whose class is drawn uniformly among the classes present (fights class skew)."""
    classes = sorted({label(i) for i in items})
    chosen = classes[int(ctx.rng.integers(len(classes)))]
    matching = [i for i in items if label(i) == chosen]
    return matching[int(ctx.rng.integers(len(matching)))]
