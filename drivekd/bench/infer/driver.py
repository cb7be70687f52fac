"""`bench_infer`: check the arguments and the data, run one worker process per model, gather the rows.

Never loads a model itself, so bad arguments fail before any worker starts; `render_table` shows the result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from drivekd.bench.isolated import IsolatedFailure, run_isolated
from drivekd.errors import DriveKDError

INT8_SUFFIX = "-int8"
DEMO_DATA = Path("runs/quick/data")  # the demo's task set (`./run.sh demo`)
CAPABILITIES = ("perception", "reasoning", "planning")


def _check_model(spec: str) -> None:
    from drivekd.models.loading import PRESETS, PRETRAINED, pretrained_path

    if spec in PRESETS:
        return
    if spec in PRETRAINED:
        pretrained_path(spec)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise DriveKDError(f"model {spec}: no such checkpoint directory, and not a preset ({', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise DriveKDError(f"model {spec}: no config.json: not a model checkpoint directory")


def _default_data() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / DEMO_DATA / "test.jsonl").is_file():
            return root / DEMO_DATA
    return None


def _names(models: list[str]) -> list[str]:
    names: list[str] = []
    for spec in models:
        name = spec.rstrip("/") or spec
        k = 2
        while name in names:
            name = f"{spec}#{k}"
            k += 1
        names.append(name)
    return names


def _run_worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {"TQDM_DISABLE": "1", **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {})}
    try:
        out = run_isolated("drivekd.bench.infer.worker:measured", spec, env=env)
    except IsolatedFailure as e:
        raise DriveKDError(f"model {name}: worker exited with code {e.returncode}: {e}") from e
    if "error" in out:
        raise DriveKDError(f"model {name}: {out['error']}")
    return out


def _ratio(value: float | None, first: float | None) -> float | None:
    if value is None or not first:
        return None
    return value / first


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Every model's figures divided by the first model's."""
    first = rows[0]
    return {
        r["name"]: {
            "mem_ratio": _ratio(r["peak_mem_mb"], first["peak_mem_mb"]),
            "speed_ratio": _ratio(r["tok_per_s"], first["tok_per_s"]),
            "latency_ratio": _ratio(r["first_token_s"], first["first_token_s"]),
            "params_ratio": _ratio(r["params"], first["params"]),
        }
        for r in rows
    }


def bench_infer(
    models: list[str],
    *,
    data_dir: Path | None = None,
    split: str = "test",
    batch: int = 1,
    new_tokens: int = 32,
    repeats: int = 5,
    int8: bool = False,
    score: bool = False,
    max_score_samples: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
) -> dict[str, Any]:
    """Params, peak memory, decode tok/s and first-token latency per model, each in a fresh process.

    Returns `{"models": [{"name", "params", "peak_mem_mb", "tok_per_s", "first_token_s", ...}],
    "ratios": {name: {"mem_ratio", "speed_ratio", "latency_ratio", "params_ratio"}}, "settings": {...}}`;
    ratios divide by the first model. With `int8`, the last model is measured again as `<name>-int8`.
    `dtype` is the weights' dtype once loaded. `threads` sets the workers' torch threads (default: torch's own choice, or OMP_NUM_THREADS).
    """
    from drivekd.data.formats import load_split
    from drivekd.data.validate import validate_samples

    if not models:
        raise DriveKDError("bench infer: no models given")
    if batch < 1 or repeats < 1 or (threads is not None and threads < 1):
        raise DriveKDError("bench infer: --batch, --repeats and --threads must be at least 1")
    if new_tokens < 2:
        raise DriveKDError("bench infer: --new-tokens must be at least 2 (decode speed excludes the first token)")
    for spec in models:
        _check_model(spec)
    if int8 and dtype != "float32":
        raise DriveKDError(f"bench infer: --int8 quantises float32 weights, not {dtype}")
    if int8 and torch.device(device).type != "cpu":
        raise DriveKDError(f"bench infer: --int8 (dynamic quantisation) runs on CPU only, not {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DriveKDError(f"bench infer: device {device}: CUDA is not available")

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = _default_data()
        if data_dir is None:  # nothing generated yet: a small DriveSim-QA set just for the prompt
            from drivekd.data.drivesim.generate import GenerateConfig, generate

            data_dir = Path(tmp) / "data"
            generate(data_dir, GenerateConfig(scenes=3, seed=0))
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DriveKDError(f"data {data_dir}: no such dataset folder")
        samples = load_split(data_dir, split)
        if not samples:
            raise DriveKDError(f"data {data_dir}: split {split} is empty")
        if len(samples) < batch:
            raise DriveKDError(f"data {data_dir}: split {split} has {len(samples)} samples, fewer than batch {batch}")
        checked = (samples[:max_score_samples] if max_score_samples else samples) if score else samples[:batch]
        validate_samples(checked).raise_if_bad(f"{data_dir}/{split}.jsonl")

        names = _names(models)
        jobs = [(name, spec, False) for name, spec in zip(names, models, strict=True)]
        if int8:
            jobs.append((f"{names[-1]}{INT8_SUFFIX}", models[-1], True))
        rows = []
        for name, spec, quantise in jobs:
            job = {
                "model": spec,
                "data_dir": str(data_dir.resolve()),
                "split": split,
                "batch": batch,
                "new_tokens": new_tokens,
                "repeats": repeats,
                "device": device,
                "dtype": dtype,
                "int8": quantise,
                "score": score,
                "max_score_samples": max_score_samples,
                "threads": threads,
            }
            rows.append({"name": name, "model": spec, **_run_worker(name, job)})

    return {
        "models": rows,
        "ratios": ratios(rows),
        "settings": {
            "data": str(data_dir),
            "split": split,
            "batch": batch,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": 1,
            "prompt_tokens": rows[0]["prompt_tokens"],
            "device": device,
            "dtype": dtype,
            "torch": torch.__version__,
            "torch_threads": rows[0]["torch_threads"],
            "peak_mem": rows[0]["peak_source"],
            "load_avg_1min": load_before,  # other work on the machine skews the timings
            "score": score,
            "max_score_samples": max_score_samples,
        },
    }


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_table(result: dict[str, Any]) -> str:
    """Markdown table in the paper's deployment columns (+ scores when measured)."""
    scored = any("score_avg" in r for r in result["models"])
    # On CPU a fresh process holds ~300 MB of Python and torch before any model: the weights column
    # shows what the model itself takes, which is what shrinks with the student.
    head = (
        "| model | params (M) | weights (MB) | peak mem (MB) | tok/s | first token (s) "
        "| mem ratio | speed ratio | latency ratio |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if scored:
        head += " Perc. | Reas. | Plan. | Avg |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in result["models"]:
        q = result["ratios"][r["name"]]
        cells = [
            r["name"],
            f"{r['params'] / 1e6:.2f}",
            _fmt(r.get("weights_mb"), 1),
            f"{r['peak_mem_mb']:.0f}",
            f"{r['tok_per_s']:.1f}",
            f"{r['first_token_s']:.3f}",
            _fmt(q["mem_ratio"], 2),
            _fmt(q["speed_ratio"], 2),
            _fmt(q["latency_ratio"], 2),
        ]
        if scored:
            caps = r.get("score_capabilities") or {}
            cells += [_fmt(caps.get(c), 2) for c in CAPABILITIES] + [_fmt(r.get("score_avg"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
