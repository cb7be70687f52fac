"""Perception question templates: vehicle counts, the ego's lane, the nearest vehicle ahead, a tagged
vehicle's moving status and colour."""

from __future__ import annotations

from drivekd.data.drivesim.camera import Visible
from drivekd.data.drivesim.scene_context import (
    QA,
    SceneContext,
    balanced_pick,
    deferred_mc,
    describe,
    status_of,
)
from drivekd.data.drivesim.world import COLOURS, Car

STATUS_TEXT = {
    "ahead": "Going ahead.",
    "left": "Changing to the left lane.",
    "right": "Changing to the right lane.",
    "braking": "Braking.",
}


def count_vehicles(ctx: SceneContext) -> list[QA]:
    out = []
    for cam, vs in ctx.visible.items():
        n = len(vs)
        q = f"How many vehicles are visible in {cam}?"
        a = f"Count: {n} vehicle{'s' if n != 1 else ''} visible in {cam}.\nFinal: {{{n}}}"
        out.append(QA("perception", "count_vehicles", q, a, facts={"count": n, "camera": cam, "label": str(n)}))
    return out


def ego_lane(ctx: SceneContext) -> list[QA]:
    lane_id, lanes = ctx.ego.lane[2], ctx.snap.lanes_here
    where = "leftmost" if lane_id == 0 else ("rightmost" if lane_id == lanes - 1 else "middle")
    if ctx.thin(where == "rightmost", 0.6):
        return []
    text = {"leftmost": "The leftmost lane.", "middle": "A middle lane.", "rightmost": "The rightmost lane."}
    evidence = [
        f"Lanes: {lanes} lanes in the ego's direction",
        "Evidence: solid edge lines mark the road borders; dashed lines separate lanes.",
    ]
    return [
        deferred_mc(
            ctx,
            "perception",
            "ego_lane",
            "Which lane is the ego vehicle driving in?",
            text[where],
            list(text.values()),
            3,
            evidence,
            {"lane": where, "lanes": lanes, "label": where},
        )
    ]


def _distance_bucket(gap: float) -> str:
    return "under 20 m" if gap < 20 else ("20-50 m" if gap < 50 else "over 50 m")


def nearest_ahead(ctx: SceneContext) -> list[QA]:
    cam = "CAM_FRONT"
    rels = [(ctx.relations[v.car.index], v) for v in ctx.visible.get(cam, [])]
    rels = [(r, v) for r, v in rels if r.ahead > 0 and r.lane in ("same", "left", "right")]
    options = [
        f"In the {lane} lane, {b} ahead."
        for lane in ("same", "left", "right")
        for b in ("under 20 m", "20-50 m", "over 50 m")
    ]
    options.append("No vehicle ahead in the ego's or adjacent lanes.")
    if rels:
        rel, vis = min(rels, key=lambda rv: rv[0].gap)
        correct = f"In the {rel.lane} lane, {_distance_bucket(rel.gap)} ahead."
        evidence = [f"Object: {vis.tag(cam, 1)}, {describe(rel.car)}", f"Distance: {rel.gap:.1f} m"]
        facts = {"lane": rel.lane, "distance": _distance_bucket(rel.gap), "object": vis.tag(cam, 1)}
    else:
        correct, evidence, facts = options[-1], ["Object: none"], {"lane": "none", "distance": "none"}
    return [
        deferred_mc(
            ctx,
            "perception",
            "nearest_ahead",
            f"Where is the nearest vehicle ahead of the ego vehicle in {cam}?",
            correct,
            options,
            4,
            evidence,
            {**facts, "label": correct},
        )
    ]


def object_status(ctx: SceneContext) -> list[QA]:
    tagged = ctx.tagged()
    if not tagged:
        return []
    cam, vis = balanced_pick(ctx, tagged, lambda cv: status_of(cv[1].car))
    return [status_question(ctx, cam, vis)] if asks_status(ctx, vis.car) else []


def asks_status(ctx: SceneContext, car: Car) -> bool:
    """Most vehicles show no lights: keep 30 % of those status questions (class balance)."""
    return not ctx.thin(status_of(car) == "ahead", 0.3)


def status_question(ctx: SceneContext, cam: str, vis: Visible) -> QA:
    """The `object_status` item about one tagged vehicle."""
    car, rel, tag = vis.car, ctx.relations[vis.car.index], vis.tag(cam, 1)
    status = status_of(car)
    cue = {
        "ahead": "no brake lights or indicators; the vehicle is aligned with its lane",
        "left": "its left amber indicator is on and it is drifting toward the left lane",
        "right": "its right amber indicator is on and it is drifting toward the right lane",
        "braking": "its brake lights are lit",
    }[status]
    evidence = [f"Object: {describe(car)}", f"Position & orientation: {rel.where()}", f"Contextual evidence: {cue}."]
    return deferred_mc(
        ctx,
        "perception",
        "object_status",
        f"What is the moving status of object {tag}?",
        STATUS_TEXT[status],
        list(STATUS_TEXT.values()),
        4,
        evidence,
        {"status": status, "object": tag, "label": status},
    )


def object_colour(ctx: SceneContext) -> list[QA]:
    tagged = ctx.tagged()
    if not tagged:
        return []
    cam, vis = tagged[int(ctx.rng.integers(len(tagged)))]
    return [colour_question(ctx, cam, vis)]


def colour_question(ctx: SceneContext, cam: str, vis: Visible) -> QA:
    """The `object_colour` item about one tagged vehicle."""
    colour, tag = vis.car.colour, vis.tag(cam, 1)
    evidence = [f"Object: {describe(vis.car)}", f"Position & orientation: {ctx.relations[vis.car.index].where()}"]
    return deferred_mc(
        ctx,
        "perception",
        "object_colour",
        f"What colour is object {tag}?",
        f"{colour.capitalize()}.",
        [f"{c.capitalize()}." for c in COLOURS],
        4,
        evidence,
        {"colour": colour, "object": tag, "label": colour},
    )
