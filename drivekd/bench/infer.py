"""`drivekd bench infer`: deployment figures per model (the paper's Table 1 columns).

Every model (and the optional int8 variant of the last one) runs in a fresh process,
`python -m drivekd.bench.infer --worker SPEC_JSON`, which prints one JSON line. Per model:

- params: parameter count (of the float model, before any quantisation);
- peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set of the worker
  (`VmHWM`) while it serves the prompt, i.e. with the model loaded (and quantised) and running. The
  load transient is excluded (peak reset once the model is ready; `load_peak_mb` keeps it) so an
  int8 variant quantised on the fly is not charged for its float copy. `ru_maxrss` is not used: after
  fork+exec Linux carries the parent's peak into it;
- first-token latency: prefill (vision encoder + prompt) and the greedy pick of the first token, batch
  already tokenised and on the device (`preprocess_s` reports the image/tokenising step separately);
- decode throughput: `batch * (new_tokens - 1)` tokens over the time of the remaining decode steps.
  EOS is suppressed, so exactly `new_tokens` tokens are generated (as `min_new_tokens` does in HF).

Decoding is a manual greedy loop over the KV cache that reproduces `model.generate` token for token
(position ids as HF computes them, left padding included); tested against it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import DriveKDError

INT8_SUFFIX = "-int8"
DEMO_DATA = Path("runs/demo/drivesim-qa")
CAPABILITIES = ("perception", "reasoning", "planning")


# ---------------------------------------------------------------- int8


def quantize_int8(backend: Any) -> Any:
    """Int8 dynamic quantisation of every `nn.Linear` (weights int8, activations quantised per batch).

    CPU only. Replaces `backend.model` in place and returns the backend. Uses
    `torch.ao.quantization.quantize_dynamic` (deprecated in torch 2.13 in favour of torchao, still
    working); the first quantised engine among the current one, x86, fbgemm, qnnpack that runs a
    smoke test is used, and recorded as `backend.int8_engine`.
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise DriveKDError(
            f"int8: torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic ({e})"
        ) from e
    if backend.device.type != "cpu":
        raise DriveKDError(f"int8: dynamic quantisation runs on CPU only, the model is on {backend.device}")
    if backend.model.dtype != torch.float32:
        raise DriveKDError(f"int8: dynamic quantisation needs a float32 model, not {backend.model.dtype}")
    engine = _pick_engine(quantize_dynamic)
    backend.model.eval()
    with _quiet():
        backend.model = quantize_dynamic(backend.model, {torch.nn.Linear}, dtype=torch.qint8)
    backend.int8_engine = engine
    return backend


def _pick_engine(quantize_dynamic: Any) -> str:
    """Select (and leave selected: modules run with the engine that packed them) a working engine."""
    supported = torch.backends.quantized.supported_engines
    old = torch.backends.quantized.engine
    errors = []
    for engine in dict.fromkeys(e for e in (old, "x86", "fbgemm", "qnnpack") if e in supported and e != "none"):
        try:
            torch.backends.quantized.engine = engine
            with _quiet():
                probe = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 8)), {torch.nn.Linear}, torch.qint8)
                probe(torch.randn(2, 8))
            return engine
        except Exception as e:  # an engine that is compiled in but unusable on this CPU
            errors.append(f"{engine}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    torch.backends.quantized.engine = old
    raise DriveKDError(f"int8: no quantised engine works here ({'; '.join(errors) or 'none supported'})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        yield


def is_int8(model: torch.nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return any(isinstance(m, QLinear) for m in model.modules())


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes of the state dict (shared tensors once, int8 packed weights at one byte each), in MB."""
    seen: set[int] = set()

    def size(value: Any) -> int:
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return 0
        key = value.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.numel() * value.element_size()

    with _quiet():
        return sum(size(v) for v in model.state_dict().values()) / 2**20


# ---------------------------------------------------------------- timed greedy decoding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt_positions(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The prompt's position ids exactly as `generate` builds them (2-D, or 4-D for Qwen2.5-VL mRoPE)."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is None:  # other transformers versions: let the model infer them (exact for batch 1)
        return None
    return prepare(inputs["input_ids"], dict(inputs))


@torch.no_grad()
def greedy_timed(backend: Any, batch: Any, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding of exactly `new_tokens` tokens (EOS suppressed) with the KV cache.

    Returns (tokens (B, new_tokens), first_token_s, decode_s): first_token_s is the prefill forward
    plus the pick of the first token; decode_s the remaining `new_tokens - 1` steps.
    """
    model = backend.model
    device = backend.device
    was_training = model.training
    model.eval()
    inputs = dict(batch.inputs)
    mask = inputs["attention_mask"]
    positions = _prompt_positions(model, inputs)
    step_extra: dict[str, torch.Tensor] = {}
    if "mm_token_type_ids" in inputs:  # new tokens are text
        step_extra["mm_token_type_ids"] = inputs["mm_token_type_ids"].new_zeros((mask.shape[0], 1))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1].float()
        logits[:, backend.eos_id] = -math.inf
        return logits.argmax(-1)

    _sync(device)
    start = time.perf_counter()
    kwargs = {} if positions is None else {"position_ids": positions}
    out = model(**inputs, **kwargs, use_cache=True, logits_to_keep=1)
    token = pick(out.logits)
    _sync(device)
    first = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if positions is not None:
            positions = positions[..., -1:] + 1
            kwargs = {"position_ids": positions}
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
            **step_extra,
        )
        token = pick(out.logits)
        tokens.append(token)
    _sync(device)
    end = time.perf_counter()
    model.train(was_training)
    return torch.stack(tokens, dim=1), first - start, end - first


# ---------------------------------------------------------------- memory


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _hwm_mb() -> float | None:
    """Peak resident set of this process image (`VmHWM`), None where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak(device: torch.device) -> bool:
    """Start a new peak from now; False where the CPU peak cannot be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap (e.g. the pre-quantisation copy) back
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    hwm = _hwm_mb()
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


# ---------------------------------------------------------------- worker


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one model in this process (run through `python -m drivekd.bench.infer --worker`)."""
    from drivekd.data.formats import load_split
    from drivekd.models.loading import LoadOptions, count_parameters, load_backend

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    samples = load_split(spec["data_dir"], spec["split"])
    prompt = samples[: spec["batch"]]
    rss_base = _rss_mb()
    backend = load_backend(spec["model"], LoadOptions(device=spec["device"]))
    backend.model.eval()
    params = count_parameters(backend)
    engine = None
    if spec.get("int8"):
        quantize_int8(backend)
        engine = backend.int8_engine
    load_peak, source = _peak_mb(device)
    reset = _reset_peak(device)
    rss_ready = _rss_mb()

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
    peak, source = _peak_mb(device)
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


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivekd.bench.infer")
    parser.add_argument("--worker", required=True, help="JSON spec of the model to measure")
    args = parser.parse_args(argv)
    try:
        result = worker(json.loads(args.worker))
    except DriveKDError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    except Exception as e:  # one line for the parent, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        print(json.dumps({"error": f"{type(e).__name__}: {first}"}))
        return 1
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- driver


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
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
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
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run(
        [sys.executable, "-m", "drivekd.bench.infer", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict):
            if "error" in out:
                raise DriveKDError(f"model {name}: {out['error']}")
            return out
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise DriveKDError(f"model {name}: worker exited with code {proc.returncode}: {tail}")


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
    threads: int | None = None,
) -> dict[str, Any]:
    """Params, peak memory, decode tok/s and first-token latency per model, each in a fresh process.

    Returns `{"models": [{"name", "params", "peak_mem_mb", "tok_per_s", "first_token_s", ...}],
    "ratios": {name: {"mem_ratio", "speed_ratio", "latency_ratio", "params_ratio"}}, "settings": {...}}`;
    ratios divide by the first model. With `int8`, the last model is measured again as `<name>-int8`.
    `threads` sets the workers' torch threads (default: torch's own choice, or OMP_NUM_THREADS).
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


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
