"""Grounded scene captions: the pretraining task that gives a from-scratch tiny VLM its eyes.

Real teachers (InternVL3, Qwen2.5-VL) reach driving SFT after pretraining on grounded captions and
referring expressions; a tiny preset built from a config has seen nothing. One caption names every
visible vehicle with its tag, so a single sample teaches the tag-coordinates -> object mapping for
all of them (a QA sample teaches it for one object). The facts are the ones the QA templates ask
about, so the cues are shared, but no question, option or answer format is.
"""

from __future__ import annotations

from drivekd.data.drivesim.questions import QA, SceneContext, describe, status_of

LIGHTS = {
    "ahead": "no lights",
    "braking": "brake lights lit",
    "left": "left indicator on",
    "right": "right indicator on",
}
CAPTION_PROMPT = (
    "Describe the scene: every visible vehicle with its tag, colour, type, position and lights, and the ego lane."
)


def scene_caption(ctx: SceneContext) -> QA:
    lines, k = [], 0
    for cam, seen in ctx.visible.items():
        lines.append(f"{cam}: {len(seen)} vehicle{'s' if len(seen) != 1 else ''}.")
        for vis in seen:
            k += 1
            car = vis.car
            lines.append(
                f"{vis.tag(cam, k)} {describe(car)}, {ctx.relations[car.index].where()}, {LIGHTS[status_of(car)]}."
            )
    lane_id, lanes = ctx.ego.lane[2], ctx.snap.lanes_here
    where = "leftmost" if lane_id == 0 else ("rightmost" if lane_id == lanes - 1 else "a middle")
    lines.append(f"Ego lane: {where} lane of {lanes}.")
    facts = {"vehicles": k, "lanes": lanes, "label": None}
    return QA("perception", "grounded_caption", CAPTION_PROMPT, "\n".join(lines), facts=facts)
