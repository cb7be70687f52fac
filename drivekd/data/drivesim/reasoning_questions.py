"""Reasoning question templates: what a tagged vehicle will do next, what the ego is doing, and which
vehicle matters most."""

from __future__ import annotations

import math

import numpy as np

from drivekd.data.drivesim.scene_context import (
    HORIZON_S,
    LANE_WIDTH,
    QA,
    Relation,
    SceneContext,
    balanced_pick,
    deferred_mc,
    describe,
)
from drivekd.data.drivesim.world import Car

FUTURE_TEXT = {
    "keep": "Keep its lane at a steady speed.",
    "left": "Change to the left lane.",
    "right": "Change to the right lane.",
    "slow": "Slow down.",
}


def future_of(ctx: SceneContext, car: Car) -> str:
    after = ctx.rollouts["IDLE"]
    x, y = after.positions_after[car.index]
    heading_right = np.array([-math.sin(car.heading), math.cos(car.heading)])
    moved = float(np.array([x - car.x, y - car.y]) @ heading_right)
    if moved < -LANE_WIDTH / 2:
        return "left"
    if moved > LANE_WIDTH / 2:
        return "right"
    return "slow" if after.speeds_after[car.index] < car.speed - 1.5 else "keep"


def object_prediction(ctx: SceneContext) -> list[QA]:
    tagged = ctx.tagged()
    if not tagged:
        return []
    cam, vis = balanced_pick(ctx, tagged, lambda cv: future_of(ctx, cv[1].car))
    car, tag = vis.car, vis.tag(cam, 1)
    future = future_of(ctx, car)
    if ctx.thin(future == "keep", 0.45):
        return []
    reason = {
        "keep": "no indicator and no brake lights; it follows its lane",
        "left": "it is signalling left or has room to overtake on the left",
        "right": "it is signalling right or returns to the right lane",
        "slow": "its brake lights are lit or it is closing on a slower vehicle",
    }[future]
    evidence = [f"Object: {describe(car)}, relative to ego: {ctx.relations[car.index].where()}", f"Reason: {reason}."]
    return [
        deferred_mc(
            ctx,
            "reasoning",
            "object_prediction",
            f"{ctx.speed_line()}What will object {tag} do in the next {HORIZON_S:.0f} seconds?",
            FUTURE_TEXT[future],
            list(FUTURE_TEXT.values()),
            4,
            evidence,
            {"future": future, "object": tag, "label": future},
        )
    ]


def ego_behavior(ctx: SceneContext) -> list[QA]:
    ego = ctx.ego
    lateral = {None: "going straight", "left": "changing to the left lane", "right": "changing to the right lane"}[
        ego.signal
    ]
    dv = ego.speed - ctx.snap.ego_speed_1s_ago
    longitudinal = "accelerating" if dv > 0.5 else ("braking" if dv < -0.5 else "keeping its speed")
    if ctx.thin(ego.signal is None and longitudinal == "keeping its speed", 0.4):
        return []
    phrase = "The ego vehicle is {} and {}."
    correct = phrase.format(lateral, longitudinal)
    every = [
        phrase.format(a, b)
        for a in ("going straight", "changing to the left lane", "changing to the right lane")
        for b in ("accelerating", "braking", "keeping its speed")
    ]
    evidence = [
        f"Support: speed changed by {dv:+.1f} m/s over the last second; the lane markings are "
        f"{'aligned with the ego heading' if ego.signal is None else 'slanted as the ego crosses lanes'}."
    ]
    label = f"{lateral}/{longitudinal}"
    return [
        deferred_mc(
            ctx,
            "reasoning",
            "ego_behavior",
            f"{ctx.speed_line()}Predict the behavior of the ego vehicle.",
            correct,
            every,
            4,
            evidence,
            {"lateral": lateral, "longitudinal": longitudinal, "label": label},
        )
    ]


def _risk(ctx: SceneContext, rel: Relation) -> tuple[float, float, float]:
    """(priority, time-to-collision, closing speed): same-lane vehicles first, then by TTC and gap."""
    ego = ctx.ego
    closing = (ego.speed - rel.car.speed) if rel.ahead > 0 else (rel.car.speed - ego.speed)
    ttc = rel.gap / closing if closing > 0.1 else math.inf
    priority = (0 if rel.lane == "same" else 1, min(ttc, 99.0), rel.gap)
    return priority, ttc, closing  # type: ignore[return-value]


def key_object(ctx: SceneContext) -> list[QA]:
    tagged = ctx.tagged()
    if len(tagged) < 2:
        return []
    picks = [tagged[i] for i in sorted(ctx.rng.permutation(len(tagged))[:4])]
    tags = {id(v): v.tag(cam, k + 1) for k, (cam, v) in enumerate(picks)}
    _best_cam, best = min(picks, key=lambda cv: _risk(ctx, ctx.relations[cv[1].car.index])[0])
    rel = ctx.relations[best.car.index]
    _, ttc, closing = _risk(ctx, rel)
    ttc_text = f"time-to-collision {ttc:.1f} s" if math.isfinite(ttc) else "not closing"
    reason = f"{rel.where()}, closing at {max(closing, 0.0):.1f} m/s ({ttc_text})."
    evidence = [f"Object: {describe(best.car)}, relative to ego: {rel.where()}", f"Reason: {reason}"]
    correct = tags[id(best)]
    choices = [tags[id(v)] for _, v in picks]
    qa = deferred_mc(
        ctx,
        "reasoning",
        "key_object",
        f"{ctx.speed_line()}Which object matters most to the ego vehicle right now?",
        correct,
        choices,
        len(choices),
        evidence,
        # the options are tags, unique per scene: only a letter can be a constant answer (label None)
        {"object": correct, "ttc_s": round(ttc, 2) if math.isfinite(ttc) else None, "label": None},
    )
    return [qa]
