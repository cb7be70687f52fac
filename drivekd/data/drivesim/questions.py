"""DriveBench-style questions whose answers come from the simulator.

Each template reads a `SceneContext` (snapshot, what each camera shows, counterfactual rollouts) and
returns zero or more `QA` items. Answers follow the reference data's structure: a `Final: {...}` line
plus short labelled lines, so both multiple-choice parsing and field checks work. `facts["label"]` is
the canonical class of the answer (used for the dataset card's majority baseline).

Cues a model can use: lane markings and box positions (perception), brake lights and amber
indicators (status, prediction), and an ego-speed line in reasoning/planning prompts (the ego's own
motion cannot be seen in a single frame; real driving VLM prompts carry the same CAN-bus reading).
"""

from __future__ import annotations

from collections.abc import Callable

from drivekd.data.drivesim.mc_options import multiple_choice, option_count, render_options
from drivekd.data.drivesim.perception_questions import (
    STATUS_TEXT,
    asks_status,
    colour_question,
    count_vehicles,
    ego_lane,
    nearest_ahead,
    object_colour,
    object_status,
    status_question,
)
from drivekd.data.drivesim.planning_questions import (
    ACTION_TEXT,
    collision_object,
    plan_action,
    recommended_action,
    safe_actions,
)
from drivekd.data.drivesim.reasoning_questions import (
    FUTURE_TEXT,
    ego_behavior,
    future_of,
    key_object,
    object_prediction,
)
from drivekd.data.drivesim.scene_context import (
    HORIZON_S,
    LANE_WIDTH,
    QA,
    Options,
    Relation,
    SceneContext,
    describe,
    status_of,
)

__all__ = [
    "ACTION_TEXT",
    "FUTURE_TEXT",
    "HORIZON_S",
    "LANE_WIDTH",
    "QA",
    "STATUS_TEXT",
    "TEMPLATES",
    "Options",
    "Relation",
    "SceneContext",
    "asks_status",
    "collision_object",
    "colour_question",
    "count_vehicles",
    "describe",
    "ego_behavior",
    "ego_lane",
    "future_of",
    "key_object",
    "multiple_choice",
    "nearest_ahead",
    "object_colour",
    "object_prediction",
    "object_status",
    "option_count",
    "plan_action",
    "recommended_action",
    "render_options",
    "safe_actions",
    "scene_questions",
    "status_of",
    "status_question",
]


TEMPLATES: dict[str, list[Callable[[SceneContext], list[QA]]]] = {
    "perception": [count_vehicles, ego_lane, nearest_ahead, object_status, object_colour],
    "reasoning": [object_prediction, ego_behavior, key_object],
    "planning": [safe_actions, plan_action, collision_object],
}


def scene_questions(ctx: SceneContext, per_capability: int) -> list[QA]:
    """Up to `per_capability` questions of each capability, drawn from distinct templates first."""
    out = []
    for templates in TEMPLATES.values():
        candidates = [qa for t in templates for qa in t(ctx)]
        order = ctx.rng.permutation(len(candidates))
        picked, used_types = [], set()
        for i in order:  # one of each question type before any repeats
            if candidates[i].question_type not in used_types and len(picked) < per_capability:
                picked.append(i)
                used_types.add(candidates[i].question_type)
        picked += [i for i in order if i not in picked][: per_capability - len(picked)]
        out += [candidates[i] for i in sorted(picked)]
    return out
