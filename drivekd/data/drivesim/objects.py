"""Dense object questions: the grounding curriculum between whole-image and DriveBench-style questions.

A DriveSim-QA sample asks about one tagged vehicle once, inside a long answer whose text priors
already explain most tokens; a from-scratch tiny VLM learns the format long before it learns to read
the vehicle the tag points at. Here every nearby vehicle of a scene gets short questions whose
one-phrase answer can only come from its pixels (its colour, its lights), asked twice:

- on a close-up of the vehicle alone (the camera's view of it with every other vehicle removed, so
  no occluder takes its place), shown instead of the scene: the answer is a property of most of the
  image, the kind of reading a from-scratch model learns first;
- in the full scene by its tag: the same reading, after the tag -> visual token lookup.

The close-ups open the path from visual features to the answer; the tagged twins move it to the
lookup the QA questions need (docs/teacher-study.md, "Grounding stage").

`tagged_questions` asks the same two things in the QA's own words instead (its `object_colour` and
`object_status` multiple choice, every nearby vehicle): a tiny model's reading stays tied to the
wording it was learned in, so this is the dense version of exactly what QA scores.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from drivekd.data.drivesim.camera import Camera, Renderer, Visible
from drivekd.data.drivesim.captions import LIGHTS
from drivekd.data.drivesim.questions import (
    QA,
    SceneContext,
    asks_status,
    colour_question,
    status_of,
    status_question,
)
from drivekd.data.drivesim.world import Snapshot

# Beyond this bumper gap a vehicle covers a few pixels of a 96 x 96 model input: the grounding stage
# keeps to vehicles big enough to learn a first reading from.
MAX_GAP_M = 30.0
# close-up side / the vehicle's larger box side, drawn per vehicle: from the box alone (nearly one
# colour, what a from-scratch model reads first) to the vehicle with its surroundings
CLOSE_UP_CONTEXT = (1.0, 2.0)
CLOSE_UP_MIN_PX = 8
CLOSE_UP_CAMERA = "CLOSE_UP"


def close_up_box(vis: Visible, image_size: tuple[int, int], context: float) -> tuple[int, int, int, int]:
    """A square pixel box `context` times the vehicle's larger side, shifted to stay inside the image."""
    width, height = image_size
    side = max(vis.width * width, vis.height * height) * context
    side = int(min(max(round(side), CLOSE_UP_MIN_PX), width, height))
    left = min(max(round(vis.cx * width - side / 2), 0), width - side)
    top = min(max(round(vis.cy * height - side / 2), 0), height - side)
    return left, top, left + side, top + side


def close_up(snap: Snapshot, camera: Camera, vehicle: int, context: float) -> Image.Image:
    """The camera's view of one vehicle with the others and obstacles removed, cut around its box."""
    alone = dataclasses.replace(snap, cars=[c for c in snap.cars if c.index == vehicle], obstacles=[])
    image, seen = Renderer(camera).render(alone)
    if not seen:
        raise ValueError(f"vehicle {vehicle} is not visible in {camera.name}")
    return image.crop(close_up_box(seen[0], (camera.width, camera.height), context))


def object_questions(ctx: SceneContext, max_gap: float = MAX_GAP_M) -> list[QA]:
    out = []
    for cam, vis in ctx.tagged():
        if ctx.relations[vis.car.index].gap > max_gap:
            continue
        car, tag = vis.car, vis.tag(cam, 1)
        shown = (cam, car.index, round(float(ctx.rng.uniform(*CLOSE_UP_CONTEXT)), 3))
        status = status_of(car)
        colour = {"attribute": car.colour, "object": tag, "label": car.colour}
        lights = {"attribute": LIGHTS[status], "status": status, "object": tag, "label": status}
        colour_answer, lights_answer = f"{car.colour.capitalize()}.", f"{LIGHTS[status].capitalize()}."
        out += [
            QA("perception", "close_up_colour", "What colour is the vehicle in this close-up?", colour_answer,
               facts=colour, close_up=shown),
            QA("perception", "close_up_lights", "Which lights does the vehicle in this close-up show?", lights_answer,
               facts=lights, close_up=shown),
            QA("perception", "tag_colour", f"What colour is object {tag}?", colour_answer, facts=colour),
            QA("perception", "tag_lights", f"Which lights does object {tag} show?", lights_answer, facts=lights),
        ]  # fmt: skip
    return out


def tagged_questions(ctx: SceneContext, max_gap: float = MAX_GAP_M) -> list[QA]:
    """QA's `object_colour` and `object_status` items for every vehicle within `max_gap`."""
    out = []
    for cam, vis in ctx.tagged():
        if ctx.relations[vis.car.index].gap > max_gap:
            continue
        out.append(colour_question(ctx, cam, vis))
        if asks_status(ctx, vis.car):
            out.append(status_question(ctx, cam, vis))
    return out
