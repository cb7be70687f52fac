"""`drivekd bench capture`: selective attention capture against eager `output_attentions`.

Each variant runs in a fresh process, so its peak resident memory is its own: the figure is the
growth of peak RSS during the forward pass over the RSS before it (model and batch already loaded).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from drivekd.bench.isolated import IsolatedFailure, run_isolated
from drivekd.bench.memory import peak_rss_bytes
from drivekd.errors import DriveKDError

VARIANTS = ("eager-all", "capture-perception-planning", "capture-reasoning")


def _long_batch(backend: Any, data_dir: Path, tokens: int) -> Any:
    from drivekd.data.formats import load_split
    from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample

    base = load_split(data_dir, "train")[0]
    images, question = [], ""
    while True:  # repeat the cameras until the prompt is long enough
        for ref in base.images:
            images.append(ImageRef(ref.camera, ref.path))
            question += f"{ref.camera}: {IMAGE_PLACEHOLDER}\n"
        probe = Sample(
            "bench",
            base.capability,
            base.question_type,
            images,
            question + base.question.split("\n")[-1],
            base.answer,
            "bench",
        )
        if backend.token_lengths(probe) >= tokens:
            return backend.build_batch([probe, probe])


def worker(variant: str, data_dir: str, tokens: int, repeats: int) -> dict[str, float]:
    from drivekd.models.capture import capture, text_rows
    from drivekd.models.loading import load_backend

    torch.manual_seed(0)
    backend = load_backend("tiny-internvl-teacher")
    backend.model.eval()
    batch = _long_batch(backend, Path(data_dir), tokens)
    n = backend.num_layers

    def run() -> None:
        with torch.no_grad():
            if variant == "eager-all":
                backend.set_attention("eager")
                out = backend.model(**batch.inputs, output_attentions=True)
                maps = [a.mean(1) for a in out.attentions]
            elif variant == "capture-perception-planning":  # text->vision signals: the text rows only
                index, _ = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
                with capture(backend, [], row_layers=[0, n - 2], row_index=index) as sink:
                    backend.model(**batch.inputs)
                maps = list(sink.rows.values())
            else:
                with capture(backend, list(range(n - 1))) as sink:
                    backend.model(**batch.inputs)
                maps = list(sink.values())
            assert maps

    rss_before = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    return {
        "time_s": statistics.median(times),
        "extra_peak_mb": max(peak - rss_before, 0) / 2**20,
        "tokens": int(batch.inputs["input_ids"].shape[1]),
    }


def bench_capture(data_dir: Path | None = None, tokens: int = 512, repeats: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            from drivekd.data.drivesim.generate import GenerateConfig, generate

            data_dir = Path(tmp) / "data"
            generate(data_dir, GenerateConfig(scenes=1, seed=0))
        results = {}
        for variant in VARIANTS:
            try:
                results[variant] = run_isolated("drivekd.bench.capture:worker", variant, str(data_dir), tokens, repeats)
            except IsolatedFailure as e:
                raise DriveKDError(f"bench capture, {variant}: {e}") from e
    eager = results["eager-all"]
    pp = results["capture-perception-planning"]
    rs = results["capture-reasoning"]
    return {
        "tokens": eager["tokens"],
        "variants": results,
        "memory_ratio": pp["extra_peak_mb"] / max(eager["extra_peak_mb"], 1e-9),
        "time_ratio": pp["time_s"] / eager["time_s"],
        "reasoning_memory_ratio": rs["extra_peak_mb"] / max(eager["extra_peak_mb"], 1e-9),
        "reasoning_time_ratio": rs["time_s"] / eager["time_s"],
    }
