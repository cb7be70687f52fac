"""DriveSim-QA: generate a driving QA dataset from highway-env, with splits and a dataset card.

Each scene is built from its own seed (`[seed, scene index]`), so the output is byte-identical for a
seed whatever the number of workers. Scenes are assigned to train/val/test whole (no leakage).
Multiple-choice options are drawn in a second pass, once the training split's answer frequencies
are known (see `questions.Options`), and the correct letter is dealt out evenly within each split and
question type (`answer_positions`): with letters drawn at random, a 60-item test type can have one
letter right 40 % of the time, and a model that always writes that letter looks like it learned.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivekd.atomic import atomic_dir
from drivekd.data.formats import SPLITS
from drivekd.data.sample import CAPABILITIES, IMAGE_PLACEHOLDER, ImageRef, Sample
from drivekd.extras import SIMULATOR, require

# 2: distractors drawn by answer frequency; 3: warm-up lane check fixed; 4: answer letters balanced per split
GENERATOR_VERSION = "drivesim-qa/4"
MAX_SCENE_ATTEMPTS = 20
TASKS = ("qa", "captions", "objects", "tagged")


@dataclass(frozen=True)
class GenerateConfig:
    scenes: int
    seed: int = 0
    image_width: int = 224
    image_height: int = 128
    per_capability: int = 3
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # "qa": DriveBench-style questions; "captions": grounded captions for pretraining; "objects": one
    # short question per nearby vehicle (colour, lights), the dense grounding stage before QA;
    # "tagged": QA's own colour and status multiple choice for every nearby vehicle
    task: str = "qa"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")


def scene_id(index: int) -> str:
    return f"scene-{index:05d}"


@dataclass
class SceneDraft:
    """A simulated, rendered and questioned scene whose multiple-choice options are not drawn yet."""

    index: int
    images: list[ImageRef]
    scenario: str
    questions: list[Any]  # questions.QA
    own_images: dict[int, ImageRef] = field(default_factory=dict)  # question index -> its close-up


def build_scene(index: int, config: GenerateConfig, images_dir: Path) -> SceneDraft:
    """Simulate, render and question one scene (images are written now, options drawn later)."""
    from drivekd.data.drivesim.camera import Renderer, default_cameras
    from drivekd.data.drivesim.captions import scene_caption
    from drivekd.data.drivesim.objects import CLOSE_UP_CAMERA, close_up, object_questions, tagged_questions
    from drivekd.data.drivesim.questions import HORIZON_S, SceneContext, scene_questions
    from drivekd.data.drivesim.world import ACTIONS, SceneParams, World

    rng = np.random.default_rng([config.seed, index])
    for _ in range(MAX_SCENE_ATTEMPTS):  # the warm-up can end in a crash: draw another moment
        world = World(SceneParams.sample(rng), rng)
        if not world.crashed:
            break
    else:
        raise RuntimeError(f"{scene_id(index)}: every warm-up crashed")
    snap = world.snapshot()
    # counterfactual rollouts are what answers planning questions; captions describe the frame only
    rollouts = {a: world.rollout(a, HORIZON_S) for a in ACTIONS} if config.task == "qa" else {}
    cameras = {cam.name: cam for cam in default_cameras(config.image_width, config.image_height)}
    images, visible = [], {}
    for cam in cameras.values():
        image, visible[cam.name] = Renderer(cam).render(snap)
        rel = f"images/{scene_id(index)}_{cam.name}.png"
        image.save(images_dir.parent / rel, optimize=False)
        images.append(ImageRef(cam.name, rel))
    ctx = SceneContext(snap, visible, rollouts, rng)
    if config.task == "qa":
        questions = scene_questions(ctx, config.per_capability)
    elif config.task == "objects":
        questions = object_questions(ctx)
    elif config.task == "tagged":
        questions = tagged_questions(ctx)
    else:
        questions = [scene_caption(ctx)]
    own_images = {}
    for k, qa in enumerate(questions):
        if qa.close_up is not None:
            cam_name, vehicle, context = qa.close_up
            rel = f"images/{scene_id(index)}_{cam_name}_v{vehicle}.png"
            if not (images_dir.parent / rel).exists():
                close_up(snap, cameras[cam_name], vehicle, context).save(images_dir.parent / rel, optimize=False)
            own_images[k] = ImageRef(CLOSE_UP_CAMERA, rel)
    return SceneDraft(index, images, snap.params.scenario, questions, own_images)


def answer_counts(drafts: list[SceneDraft]) -> dict[str, dict[str, int]]:
    """How often each option text is the correct answer, per question type."""
    counts: dict[str, Counter[str]] = {}
    for draft in drafts:
        for qa in draft.questions:
            if qa.options is not None:
                counts.setdefault(qa.question_type, Counter())[qa.options.correct] += 1
    return {k: dict(v) for k, v in counts.items()}


def answer_positions(drafts: list[SceneDraft], rng: np.random.Generator) -> dict[tuple[int, int], int]:
    """Where each multiple-choice item's correct option goes, keyed by (scene index, question index).

    Per question type and option count, positions are a shuffled deck holding every position
    equally often (±1), so within the drafts given (one split) no letter is right more than chance.
    """
    from drivekd.data.drivesim.questions import option_count

    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for draft in drafts:
        for k, qa in enumerate(draft.questions):
            if qa.options is not None:
                groups.setdefault((qa.question_type, option_count(qa.options)), []).append((draft.index, k))
    positions = {}
    for (_, n), items in sorted(groups.items()):
        deck = rng.permutation(np.resize(rng.permutation(n), len(items)))
        positions.update(zip(items, deck.tolist(), strict=True))
    return positions


def finish_scene(
    draft: SceneDraft,
    config: GenerateConfig,
    counts: dict[str, dict[str, int]],
    positions: dict[tuple[int, int], int],
) -> list[dict[str, Any]]:
    """Draw the scene's options (own seeded stream) and return its samples as native JSON objects."""
    from drivekd.data.drivesim.questions import render_options

    rng = np.random.default_rng([config.seed, draft.index, 1])
    sid = scene_id(draft.index)
    out = []
    for k, qa in enumerate(draft.questions):
        qa = render_options(qa, rng, counts.get(qa.question_type), positions.get((draft.index, k)))
        images = [draft.own_images[k]] if k in draft.own_images else draft.images
        header = "".join(f"{im.camera}: {IMAGE_PLACEHOLDER}\n" for im in images)
        sample = Sample(
            id=f"{sid}-q{k:02d}",
            capability=qa.capability,
            question_type=qa.question_type,
            images=images,
            question=header + qa.question,
            answer=qa.answer,
            scene_id=sid,
            choices=qa.choices,
            correct_choice=qa.correct_choice,
            facts={**qa.facts, "scenario": draft.scenario},
        )
        out.append(sample.to_json())
    return out


def split_of_scenes(config: GenerateConfig) -> list[str]:
    """Split name of every scene index: a seeded shuffle cut by the split fractions."""
    n = config.scenes
    order = np.random.default_rng([config.seed, 7919]).permutation(n)
    n_val = max(1, round(n * config.split_fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * config.split_fractions[2])) if n >= 3 else 0
    names = ["train"] * n
    for rank, idx in enumerate(order):
        if rank < n_test:
            names[idx] = "test"
        elif rank < n_test + n_val:
            names[idx] = "val"
    return names


def _build_scene_star(args: tuple[int, GenerateConfig, Path]) -> SceneDraft:
    return build_scene(*args)


def generate(
    out: Path,
    config: GenerateConfig,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write train/val/test JSONL, images/ and card.json into `out` (atomically); return the card."""
    require(SIMULATOR, "DriveSim-QA generation")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        jobs = [(i, config, images_dir) for i in range(config.scenes)]
        drafts: list[SceneDraft] = []
        if workers <= 1:
            for job in jobs:
                drafts.append(_build_scene_star(job))
                if progress:
                    progress(1)
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap(_build_scene_star, jobs, chunksize=1):
                    drafts.append(result)
                    if progress:
                        progress(1)
        splits = split_of_scenes(config)
        counts = answer_counts([d for d in drafts if splits[d.index] == "train"])
        positions = {}
        for i, split in enumerate(SPLITS):
            split_drafts = [d for d in drafts if splits[d.index] == split]
            positions.update(answer_positions(split_drafts, np.random.default_rng([config.seed, 104729, i])))
        by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for draft in drafts:
            by_split[splits[draft.index]].extend(finish_scene(draft, config, counts, positions))
        for split, samples in by_split.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n")
        card = dataset_card(by_split, config)
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return card


def dataset_card(by_split: dict[str, list[dict[str, Any]]], config: GenerateConfig) -> dict[str, Any]:
    counts = {s: {c: sum(1 for x in xs if x["capability"] == c) for c in CAPABILITIES} for s, xs in by_split.items()}
    everything = [x for xs in by_split.values() for x in xs]
    types: dict[str, dict[str, Any]] = {}
    for qtype in sorted({x["question_type"] for x in everything}):
        items = [x for x in everything if x["question_type"] == qtype]
        labels = Counter(str(x["facts"]["label"]) for x in items if x["facts"].get("label") is not None)
        mc = [x for x in items if x.get("choices")]
        entry: dict[str, Any] = {
            "capability": items[0]["capability"],
            "samples": len(items),
            "kind": "multiple_choice" if mc else "open_ended",
        }
        if labels:  # free text such as captions has no class to be a majority of
            majority_label, majority_n = labels.most_common(1)[0]
            entry.update(majority_class=majority_label, majority_accuracy=round(majority_n / len(items), 4))
        if mc:
            entry["chance_accuracy"] = round(float(np.mean([1 / len(x["choices"]) for x in mc])), 4)
            letters = Counter(x["correct_choice"] for x in mc)
            entry["letter_share"] = {k: round(v / len(mc), 4) for k, v in sorted(letters.items())}
        types[qtype] = entry
    total = len(everything)
    return {
        "name": "DriveSim-QA",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "samples": total,
        "scenes": config.scenes,
        "counts": counts,
        "capability_share": {c: round(sum(counts[s][c] for s in SPLITS) / max(total, 1), 4) for c in CAPABILITIES},
        "question_types": types,
    }


def card_markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# {card['name']} ({card['generator_version']})",
        "",
        f"{card['samples']} samples from {card['scenes']} scenes; seed {card['config']['seed']}; "
        f"images {card['config']['image_width']}x{card['config']['image_height']} (CAM_FRONT, CAM_BACK).",
        "",
        "| split | " + " | ".join(CAPABILITIES) + " | total |",
        "|---|" + "---|" * (len(CAPABILITIES) + 1),
    ]
    for split in SPLITS:
        row = card["counts"][split]
        lines.append(f"| {split} | " + " | ".join(str(row[c]) for c in CAPABILITIES) + f" | {sum(row.values())} |")
    lines += [
        "",
        "| question type | capability | kind | samples | majority class | majority acc | chance acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for qtype, t in card["question_types"].items():
        chance = f"{t['chance_accuracy']:.2f}" if "chance_accuracy" in t else "-"
        majority = f"{t['majority_accuracy']:.2f}" if "majority_accuracy" in t else "-"
        lines.append(
            f"| {qtype} | {t['capability']} | {t['kind']} | {t['samples']} | {t.get('majority_class', '-')[:40]} | "
            f"{majority} | {chance} |"
        )
    return "\n".join(lines)
