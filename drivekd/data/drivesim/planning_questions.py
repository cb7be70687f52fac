"""Planning question templates: safe meta-actions, the expert's next action (`recommended_action`), and
the actions that collide with a tagged vehicle."""

from __future__ import annotations

import math

from drivekd.data.drivesim.scene_context import HORIZON_S, QA, SceneContext, deferred_mc, describe
from drivekd.data.drivesim.world import ACTIONS

ACTION_TEXT = {
    "LANE_LEFT": "Change to the left lane (LANE_LEFT).",
    "IDLE": "Keep lane and speed (IDLE).",
    "LANE_RIGHT": "Change to the right lane (LANE_RIGHT).",
    "FASTER": "Accelerate (FASTER).",
    "SLOWER": "Slow down (SLOWER).",
}


def recommended_action(ctx: SceneContext) -> str:
    """The documented expert rule, always consistent with the rollouts.

    1. No safe action: the one whose collision comes latest (SLOWER on ties).
    2. Lead vehicle within 1.0 s headway: a safe lane change into a lane with >= 2 s of free
       headway (the freer lane first), else SLOWER, else IDLE.
    3. Lead within 2.0 s: IDLE, else SLOWER.
    4. Free road: FASTER while below 29 m/s, else IDLE.
    Whatever the preferred action, it is taken only if safe; otherwise the first safe action in the
    order IDLE, SLOWER, FASTER, LANE_LEFT, LANE_RIGHT.
    """
    safe = ctx.safe_actions()
    if not safe:
        late = [(ctx.rollouts[a].collision_time or 0.0, a == "SLOWER", a) for a in ACTIONS if ctx.rollouts[a].available]
        return max(late)[2]
    speed = max(ctx.ego.speed, 1.0)

    def headway(lane: str) -> float:
        gaps = [r.gap for r in ctx.relations.values() if r.ahead > 0 and r.lane == lane]
        return min(gaps) / speed if gaps else math.inf

    own = headway("same")
    prefs: list[str]
    if own < 1.0:
        changes = sorted(
            (a for a, lane in (("LANE_LEFT", "left"), ("LANE_RIGHT", "right")) if headway(lane) >= 2.0),
            key=lambda a: -headway("left" if a == "LANE_LEFT" else "right"),
        )
        prefs = [*changes, "SLOWER", "IDLE"]
    elif own < 2.0:
        prefs = ["IDLE", "SLOWER"]
    else:
        prefs = ["FASTER", "IDLE"] if ctx.ego.speed < 29.0 else ["IDLE"]
    for a in [*prefs, "IDLE", "SLOWER", "FASTER", "LANE_LEFT", "LANE_RIGHT"]:
        if a in safe:
            return a
    raise AssertionError("unreachable: safe is non-empty")


def safe_actions(ctx: SceneContext) -> list[QA]:
    safe, crash, na = ctx.safe_actions(), ctx.collision_actions(), ctx.unavailable_actions()
    q = (
        f"{ctx.speed_line()}Which meta-actions ({', '.join(ACTIONS)}) are safe for the ego vehicle over the "
        f"next {HORIZON_S:.0f} seconds, and which lead to a collision?"
    )
    lines = [f"Safe: {', '.join(safe) or 'none'}", f"Collision: {', '.join(crash) or 'none'}"]
    if na:
        lines.append(f"Unavailable: {', '.join(na)} (no lane there)")
    lines.append(f"Final: {{{', '.join(safe) or 'none'}}}")
    facts = {
        "safe_actions": safe,
        "collision_actions": crash,
        "unavailable_actions": na,
        "label": ",".join(safe) or "none",
    }
    return [QA("planning", "safe_actions", q, "\n".join(lines), facts=facts)]


def plan_action(ctx: SceneContext) -> list[QA]:
    action = recommended_action(ctx)
    safe = ctx.safe_actions()
    lead = [r for r in ctx.relations.values() if r.ahead > 0 and r.lane == "same"]
    if lead:
        r = min(lead, key=lambda r: r.gap)
        situation = (
            f"the vehicle ahead in the same lane is {r.gap:.0f} m away ({r.gap / max(ctx.ego.speed, 1):.1f} s headway)"
        )
    else:
        situation = "the lane ahead is free"
    evidence = [f"Action: {action}", f"Reason: {situation}; safe actions: {', '.join(safe) or 'none'}."]
    return [
        deferred_mc(
            ctx,
            "planning",
            "plan_action",
            f"{ctx.speed_line()}What should the ego vehicle do next?",
            ACTION_TEXT[action],
            list(ACTION_TEXT.values()),
            5,
            evidence,
            {"action": action, "safe_actions": safe, "label": action},
        )
    ]


def collision_object(ctx: SceneContext) -> list[QA]:
    by_car: dict[int, list[str]] = {}
    for a in ctx.collision_actions():
        other = ctx.rollouts[a].collided_with
        if other is not None:
            by_car.setdefault(other, []).append(a)
    seen = [(cam, v) for cam, v in ctx.tagged() if v.car.index in by_car]
    if not seen:
        return []
    cam, vis = seen[0]
    tag, actions = vis.tag(cam, 1), by_car[vis.car.index]
    rel = ctx.relations[vis.car.index]
    q = f"{ctx.speed_line()}What actions taken by the ego vehicle can lead to a collision with {tag}?"
    a = "\n".join(
        [
            f"Collision with {tag}:",
            f"- Self-vehicle action: {', '.join(actions)}",
            f"Reason: the {describe(vis.car)} is {rel.where()}; these actions close the gap to zero within {HORIZON_S:.0f} s.",
            f"Final: {{{', '.join(actions)}}}",
        ]
    )
    return [
        QA(
            "planning",
            "collision_object",
            q,
            a,
            facts={"collision_actions": actions, "object": tag, "label": ",".join(actions)},
        )
    ]
