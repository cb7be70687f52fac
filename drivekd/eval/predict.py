"""Batched greedy generation over a split: the prediction file `drivekd score` reads."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivekd import progress
from drivekd.atomic import atomic_file
from drivekd.data.sample import Sample
from drivekd.eval.corruptions import InputSetting, shown_samples
from drivekd.models.backend import VLMBackend


def prediction_record(sample: Sample, prediction: str, setting: InputSetting | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": sample.id,
        "capability": sample.capability,
        "question_type": sample.question_type,
        "question": sample.question,
        "prediction": prediction,
        "reference": sample.answer,
    }
    if sample.choices:
        record["choices"] = sample.choices
        record["correct_choice"] = sample.correct_choice
    if sample.facts:
        record["facts"] = sample.facts
    if setting is not None:  # a corrupted or text-only answer must never pass for a clean one
        record["setting"] = setting.label
    return record


def generate_records(
    backend: VLMBackend,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    setting: InputSetting | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One prediction record per sample, in input order, and throughput figures. `setting`: a
    robustness setting (drivekd/eval/corruptions.py), applied batch by batch as images are loaded."""
    # Similar lengths together waste less padding; the records keep the input order.
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].question))
    predictions: dict[int, str] = {}
    start = time.perf_counter()
    with progress.bar(total=len(samples), desc="eval", unit="sample") as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            with tempfile.TemporaryDirectory(prefix="drivekd-corrupted-") as folder:
                shown = shown_samples([samples[j] for j in idx], setting, Path(folder))
                for j, text in zip(idx, backend.generate(shown, max_new_tokens), strict=True):
                    predictions[j] = text
            bar.update(len(idx))
    elapsed = time.perf_counter() - start
    records = [prediction_record(s, predictions[i], setting) for i, s in enumerate(samples)]
    return records, {"samples": len(samples), "seconds": elapsed, "samples_per_s": len(samples) / max(elapsed, 1e-9)}


def write_records(records: Sequence[dict[str, Any]], out: Path) -> None:
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def predict(
    backend: VLMBackend,
    samples: Sequence[Sample],
    out: Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    setting: InputSetting | None = None,
) -> dict[str, float]:
    """Generate an answer per sample and write JSONL (atomically). Returns throughput figures."""
    records, stats = generate_records(
        backend, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, setting=setting
    )
    write_records(records, out)
    return stats
