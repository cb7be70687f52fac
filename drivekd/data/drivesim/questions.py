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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivekd.data.choices import mc_question
from drivekd.data.drivesim.camera import Visible
from drivekd.data.drivesim.world import ACTIONS, COLOURS, Car, RolloutResult, Snapshot

HORIZON_S = 3.0
LANE_WIDTH = 4.0
ACTION_TEXT = {
    "LANE_LEFT": "Change to the left lane (LANE_LEFT).",
    "IDLE": "Keep lane and speed (IDLE).",
    "LANE_RIGHT": "Change to the right lane (LANE_RIGHT).",
    "FASTER": "Accelerate (FASTER).",
    "SLOWER": "Slow down (SLOWER).",
}
STATUS_TEXT = {
    "ahead": "Going ahead.",
    "left": "Changing to the left lane.",
    "right": "Changing to the right lane.",
    "braking": "Braking.",
}
FUTURE_TEXT = {
    "keep": "Keep its lane at a steady speed.",
    "left": "Change to the left lane.",
    "right": "Change to the right lane.",
    "slow": "Slow down.",
}


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


def _distinct_distractors(correct: str, distractors: list[str]) -> list[str]:
    return [d for d in dict.fromkeys(distractors) if d != correct]


def multiple_choice(
    rng: np.random.Generator,
    correct: str,
    distractors: list[str],
    n: int,
    answer_counts: dict[str, int] | None = None,
    position: int | None = None,
) -> tuple[dict[str, str], str]:
    """Shuffle the correct option among up to n-1 distractors; letters A, B, ... in shuffled order.

    With `answer_counts`, distractors are drawn in proportion to how often each is a correct answer
    (options that are never right are used only to fill up); otherwise uniformly. `position` puts
    the correct option at that index (the distractors stay shuffled) instead of a random one.
    """
    pool = _distinct_distractors(correct, distractors)
    k = min(n - 1, len(pool))
    weights = np.array([(answer_counts or {}).get(d, 0) for d in pool], dtype=float)
    if answer_counts is None or k == len(pool) or np.count_nonzero(weights) < k:
        ranked = rng.permutation(len(pool)).tolist()
        if answer_counts is not None:  # answers first, in random order, then fillers
            ranked.sort(key=lambda i: weights[i] == 0)
        picked = [pool[i] for i in ranked[:k]]
    else:
        picked = [pool[i] for i in rng.choice(len(pool), size=k, replace=False, p=weights / weights.sum())]
    options = [correct, *picked]
    options = [options[i] for i in rng.permutation(len(options))]
    if position is not None:
        options.remove(correct)
        options.insert(min(position, len(options)), correct)
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return dict(zip(letters, options, strict=True)), letters[options.index(correct)]


def option_count(o: Options) -> int:
    """How many options `multiple_choice` will offer for this item."""
    return 1 + min(o.n - 1, len(_distinct_distractors(o.correct, o.pool)))


def render_options(
    qa: QA, rng: np.random.Generator, answer_counts: dict[str, int] | None, position: int | None = None
) -> QA:
    """Draw the options of a deferred multiple-choice item and write its question and answer."""
    o = qa.options
    if o is None:
        return qa
    choices, letter = multiple_choice(rng, o.correct, o.pool, o.n, answer_counts, position)
    qa.question = mc_question(o.stem, choices)
    qa.answer = "\n".join([f"Final: {{{letter}. {o.correct}}}", *o.evidence])
    qa.choices, qa.correct_choice, qa.options = choices, letter, None
    if qa.facts["label"] is None:  # options unique to the item (object tags): the letter is the class
        qa.facts["label"] = letter
    return qa


def _mc(
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
    options = Options(question, correct, distractors, n, evidence)
    return QA(capability, qtype, question, "", facts={**facts, "label": facts.get("label", correct)}, options=options)


def describe(car: Car) -> str:
    return f"{car.colour} {car.body}"


def status_of(car: Car) -> str:
    if car.signal is not None:
        return car.signal
    return "braking" if car.braking else "ahead"


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


def _balanced_pick(ctx: SceneContext, items: list[Any], label: Callable[[Any], str]) -> Any:
    """Pick an item whose class is drawn uniformly among the classes present (fights class skew)."""
    classes = sorted({label(i) for i in items})
    chosen = classes[int(ctx.rng.integers(len(classes)))]
    matching = [i for i in items if label(i) == chosen]
    return matching[int(ctx.rng.integers(len(matching)))]


# ---------------------------------------------------------------- perception


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
        _mc(
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
        _mc(
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
    cam, vis = _balanced_pick(ctx, tagged, lambda cv: status_of(cv[1].car))
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
    return _mc(
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
    return _mc(
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


# ---------------------------------------------------------------- reasoning


def object_prediction(ctx: SceneContext) -> list[QA]:
    tagged = ctx.tagged()
    if not tagged:
        return []
    cam, vis = _balanced_pick(ctx, tagged, lambda cv: future_of(ctx, cv[1].car))
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
        _mc(
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
        _mc(
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
    qa = _mc(
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


# ---------------------------------------------------------------- planning


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
        _mc(
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
