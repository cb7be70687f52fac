"""One worker: load one model in this process, measure it, print one JSON line.

Apart from the driver, which never loads a model: each model gets a fresh process, so one model's
memory, threads and quantised engine cannot skew the next one's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from drivekd.bench.infer.int8 import is_int8, quantize_int8, weights_mb
from drivekd.bench.infer.timing import greedy_timed
from drivekd.bench.memory import peak_mb, reset_peak, rss_mb
from drivekd.errors import DriveKDError


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one model in this process (run through `python -m drivekd.bench.infer --worker`)."""
    from drivekd.data.formats import load_split
    from drivekd.models.loading import LoadOptions, count_parameters, load_backend

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    samples = load_split(spec["data_dir"], spec["split"])
    prompt = samples[: spec["batch"]]
    rss_base = rss_mb()
    backend = load_backend(spec["model"], LoadOptions(device=spec["device"], dtype=spec.get("dtype", "float32")))
    backend.model.eval()
    params = count_parameters(backend)
    engine = None
    if spec.get("int8"):
        quantize_int8(backend)
        engine = backend.int8_engine
    load_peak, source = peak_mb(device)
    reset = reset_peak(device)
    rss_ready = rss_mb()

    pre_times, first_times, decode_times = [], [], []
    tokens = None
    for i in range(spec["repeats"] + 1):  # the first run is the warm-up
        start = time.perf_counter()
        batch = backend.build_batch(prompt, with_answers=False, padding_side="left").to(device)
        pre = time.perf_counter() - start
        tokens, first, decode = greedy_timed(backend, batch, spec["new_tokens"])
        if i:
            pre_times.append(pre)
            first_times.append(first)
            decode_times.append(decode)
    peak, source = peak_mb(device)
    assert tokens is not None
    generated = tokens.shape[0] * (tokens.shape[1] - 1)
    speeds = [generated / max(d, 1e-9) for d in decode_times]
    result: dict[str, Any] = {
        "params": params,
        "peak_mem_mb": peak,
        "tok_per_s": statistics.median(speeds),
        "first_token_s": statistics.median(first_times),
        "preprocess_s": statistics.median(pre_times),
        "load_peak_mb": max(load_peak, peak),
        "rss_before_load_mb": rss_base,
        "rss_ready_mb": rss_ready,
        "weights_mb": weights_mb(backend.model),
        "peak_source": source if reset else f"{source} (not reset after load)",
        "prompt_tokens": int(batch.inputs["input_ids"].shape[1]),
        "new_tokens": int(tokens.shape[1]),
        "sample_text": backend.tokenizer.decode(tokens[0], skip_special_tokens=True),
        "int8": bool(spec.get("int8")),
        "int8_engine": engine,
        "quantized_linear": is_int8(backend.model),
        "torch_threads": torch.get_num_threads(),
    }
    if spec.get("score"):
        from drivekd.eval.predict import predict
        from drivekd.eval.scoring import score_file

        limit = spec.get("max_score_samples")
        scored = samples[:limit] if limit else samples
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "predictions.jsonl"
            predict(backend, scored, out)
            s = score_file(out)
        result["score_avg"] = s["average"]
        result["score_capabilities"] = s["capabilities"]
        result["score_samples"] = len(scored)
    return result


def measured(spec: dict[str, Any]) -> dict[str, Any]:
    """`worker(spec)`, or {"error": one line} when it fails (the parent names the model)."""
    try:
        return worker(spec)
    except DriveKDError as e:
        return {"error": str(e)}
    except Exception as e:  # one line for the parent, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        return {"error": f"{type(e).__name__}: {first}"}


def worker_main(argv: list[str]) -> int:
    """`python -m drivekd.bench.infer --worker SPEC_JSON`: one model measured, by hand."""
    parser = argparse.ArgumentParser(prog="python -m drivekd.bench.infer")
    parser.add_argument("--worker", required=True, help="JSON spec of the model to measure")
    result = measured(json.loads(parser.parse_args(argv).worker))
    print(json.dumps(result))
    return 2 if "error" in result else 0
