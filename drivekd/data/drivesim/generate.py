"""DriveSim-QA: generate a driving QA dataset from highway-env, with splits and a dataset card.

Each scene is built from its own seed (`[seed, scene index]`), so the output is byte-identical for a
seed whatever the number of workers. Scenes are assigned to train/val/test whole (no leakage).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drivekd.atomic import atomic_dir
from drivekd.data.formats import SPLITS
from drivekd.data.sample import CAPABILITIES, IMAGE_PLACEHOLDER, ImageRef, Sample

GENERATOR_VERSION = "drivesim-qa/1"
MAX_SCENE_ATTEMPTS = 20


@dataclass(frozen=True)
class GenerateConfig:
    scenes: int
    seed: int = 0
    image_width: int = 224
    image_height: int = 128
    per_capability: int = 3
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


def scene_id(index: int) -> str:
    return f"scene-{index:05d}"


def build_scene(index: int, config: GenerateConfig, images_dir: Path) -> list[dict[str, Any]]:
    """Simulate, render and question one scene; returns its samples as native JSON objects."""
    from drivekd.data.drivesim.camera import Renderer, default_cameras
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
    rollouts = {a: world.rollout(a, HORIZON_S) for a in ACTIONS}
    sid = scene_id(index)
    images, visible = [], {}
    for cam in default_cameras(config.image_width, config.image_height):
        image, vis = Renderer(cam).render(snap)
        rel = f"images/{sid}_{cam.name}.png"
        image.save(images_dir.parent / rel, optimize=False)
        images.append(ImageRef(cam.name, rel))
        visible[cam.name] = vis
    header = "".join(f"{im.camera}: {IMAGE_PLACEHOLDER}\n" for im in images)
    ctx = SceneContext(snap, visible, rollouts, rng)
    out = []
    for k, qa in enumerate(scene_questions(ctx, config.per_capability)):
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
            facts={**qa.facts, "scenario": snap.params.scenario},
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


def _build_scene_star(args: tuple[int, GenerateConfig, Path]) -> list[dict[str, Any]]:
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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        jobs = [(i, config, images_dir) for i in range(config.scenes)]
        per_scene: list[list[dict[str, Any]]] = []
        if workers <= 1:
            for job in jobs:
                per_scene.append(_build_scene_star(job))
                if progress:
                    progress(1)
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap(_build_scene_star, jobs, chunksize=1):
                    per_scene.append(result)
                    if progress:
                        progress(1)
        splits = split_of_scenes(config)
        by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for idx, samples in enumerate(per_scene):
            by_split[splits[idx]].extend(samples)
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
        labels = Counter(str(x["facts"].get("label")) for x in items)
        majority_label, majority_n = labels.most_common(1)[0]
        mc = [x for x in items if x.get("choices")]
        entry: dict[str, Any] = {
            "capability": items[0]["capability"],
            "samples": len(items),
            "kind": "multiple_choice" if mc else "open_ended",
            "majority_class": majority_label,
            "majority_accuracy": round(majority_n / len(items), 4),
        }
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
        lines.append(
            f"| {qtype} | {t['capability']} | {t['kind']} | {t['samples']} | {t['majority_class'][:40]} | "
            f"{t['majority_accuracy']:.2f} | {chance} |"
        )
    return "\n".join(lines)
