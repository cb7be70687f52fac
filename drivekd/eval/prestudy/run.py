"""`run_prestudy`: check the inputs, load the model, run the analyses and the rules, write the files.

The one part with I/O (data, model, outputs); `summary_markdown` is its report for the CLI.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from drivekd.atomic import atomic_file
from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.errors import DataError, DriveKDError
from drivekd.eval.prestudy.collection import DEFINITIONS, analyse, collect
from drivekd.eval.prestudy.metrics import BINS
from drivekd.eval.prestudy.rules import (
    FLAT_THRESHOLD,
    PEAK_TOLERANCE,
    RULES,
    VERSION,
    recipe_of,
    recipe_yaml,
    recommend,
)
from drivekd.extras import PLOTTING, require


def select_samples(samples: Sequence[Sample], max_samples: int) -> list[Sample]:
    """Up to `max_samples`, taken round-robin over capabilities in file order (balanced, deterministic)."""
    queues = {c: [s for s in samples if s.capability == c] for c in CAPABILITIES}
    out: list[Sample] = []
    k = 0
    while len(out) < max_samples and any(k < len(q) for q in queues.values()):
        for c in CAPABILITIES:
            if k < len(queues[c]) and len(out) < max_samples:
                out.append(queues[c][k])
        k += 1
    return out


def _load(directory: Path, split: str, what: str) -> list[Sample]:
    from drivekd.data.formats import load_split
    from drivekd.data.validate import validate_samples

    if not directory.is_dir():
        raise DataError(f"{directory}: no such {what} folder")
    samples = load_split(directory, split)
    if not samples:
        raise DataError(f"{directory}: {split}.jsonl holds no samples")
    validate_samples(samples).raise_if_bad(str(directory / f"{split}.jsonl"))
    return samples


def general_split(general_dir: Path, split: str) -> str:
    """The general control set is read from its `test` split (all `drivekd data general` writes), else `split`."""
    return "test" if (general_dir / "test.jsonl").is_file() else split


def run_prestudy(
    model: str,
    data_dir: Path,
    out: Path,
    *,
    general_dir: Path | None = None,
    split: str = "val",
    max_samples: int = 96,
    batch_size: int = 8,
    tau: float = 1.0,
) -> dict:
    """Run the four analyses, apply the rules, write OUT/prestudy.json, prestudy.png and recipe.yaml.

    Arguments and data are checked before the model is loaded; every problem is a DriveKDError.
    """
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    if max_samples < 2:
        raise DriveKDError(f"--max-samples must be at least 2 (pairwise similarities), got {max_samples}")
    if batch_size < 1:
        raise DriveKDError(f"--batch must be at least 1, got {batch_size}")
    if not (tau > 0 and math.isfinite(tau)):
        raise DriveKDError(f"--tau must be a positive number, got {tau}")
    if out.exists() and not out.is_dir():
        raise DriveKDError(f"{out}: exists and is not a folder")
    require(PLOTTING, "the pre-study's figure (prestudy.png)")
    samples = select_samples(_load(data_dir, split, "dataset"), max_samples)
    counts = {c: sum(s.capability == c for s in samples) for c in CAPABILITIES}
    short = [c for c, n in counts.items() if n < 2]
    if short:
        raise DataError(
            f"{data_dir / (split + '.jsonl')}: capability {short[0]} has {counts[short[0]]} sample(s) among the "
            f"{len(samples)} used; intra-group similarity needs at least 2 of each"
        )
    general: list[Sample] | None = None
    g_split = None
    if general_dir is not None:
        general_dir = Path(general_dir)
        if not general_dir.is_dir():
            raise DataError(f"{general_dir}: no such general dataset folder")
        g_split = general_split(general_dir, split)
        general = list(_load(general_dir, g_split, "general dataset")[:max_samples])

    from drivekd.eval.prestudy.plot import save_figure
    from drivekd.models.loading import LoadOptions, load_backend

    cuda = torch.cuda.is_available()
    options = LoadOptions(dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    backend = load_backend(model, options)
    L = backend.num_layers
    if L < 3:
        raise DriveKDError(f"{model}: the pre-study needs at least 3 LM layers, this model has {L}")
    driving_stats = collect(backend, samples, batch_size, tau)
    general_stats = collect(backend, general, batch_size, tau, full=False) if general else None
    curves = analyse(driving_stats, general_stats)
    recommendation = recommend(curves, L)
    result: dict[str, Any] = {
        "version": VERSION,
        "model": str(model),
        "family": backend.family,
        "num_layers": L,
        "data": str(data_dir),
        "split": split,
        "general": str(general_dir) if general_dir is not None else None,
        "general_split": g_split,
        "samples": {"driving": len(samples), "by_capability": counts, "general": len(general) if general else None},
        "tau": tau,
        "bins": BINS,
        "batch_size": batch_size,
        "device": options.device,
        "dtype": options.dtype,
        "definitions": DEFINITIONS,
        "rules": RULES,
        "thresholds": {"flat": FLAT_THRESHOLD, "peak_tolerance": PEAK_TOLERANCE},
        "layers": curves,
        "recommendation": recommendation,
        "recipe": recipe_of(recommendation),
        "outputs": {
            "json": str(out / "prestudy.json"),
            "figure": str(out / "prestudy.png"),
            "recipe": str(out / "recipe.yaml"),
        },
    }
    result["seconds"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "recipe.yaml") as tmp:
        tmp.write_text(recipe_yaml(result), encoding="utf-8")
    with atomic_file(out / "prestudy.png") as tmp:
        save_figure(result, tmp)
    with atomic_file(out / "prestudy.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    """A short report: the recommended signal per capability, and the files written."""
    n = result["num_layers"]
    lines = [
        f"Pre-study of {result['model']} ({result['family']}, {n} LM layers) on {result['data']} "
        f"(split {result['split']}, {result['samples']['driving']} samples"
        + (f"; general {result['general']}, {result['samples']['general']} samples" if result["general"] else "")
        + f") in {result['seconds']:.1f} s",
        "",
        "| capability | signal | layer(s) | reason |",
        "|---|---|---|---|",
    ]
    for cap in CAPABILITIES:
        r = result["recommendation"][cap]
        where = r["teacher_layers"] if "teacher_layers" in r else r["teacher_layer"]
        resolved = r["resolved_layers"]
        shown = f"{where} (= {resolved[0]}" + (f"..{resolved[-1]})" if len(resolved) > 1 else ")")
        lines.append(f"| {cap} | {r['kind']} | {shown} | {r['reason']} |")
    lines += ["", "wrote " + ", ".join(result["outputs"].values())]
    return "\n".join(lines)
