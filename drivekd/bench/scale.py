"""`drivekd bench scale`: SFT and distillation steps at the published shapes, on this machine.

A student and a teacher with real architectures (`drivekd models init --like`, random weights), one
driving sample with 2 or 6 camera images at the model's image size, and one phase per fresh process
so each phase's peak resident memory is its own: SFT step; teacher cache; distillation steps with the
cached and the live teacher under `sum`, exact `agp` (fp32 and bf16 task buffers) and the cheap step
of amortised `agp`; the student's forward+backward with every map captured eagerly
(`output_attentions`) against the text-row capture of the text->vision signals. Each phase's figures
are written to OUT/phases/ as it finishes, so a killed run resumes with the next phase.

The student trains its language model and projector (vision frozen) in fp32: this CPU runs bf16
matrix products ~70x slower than fp32, so a live teacher is fp32 here too.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from drivekd.atomic import atomic_file
from drivekd.bench.isolated import IsolatedFailure, run_isolated
from drivekd.bench.memory import peak_rss_bytes, rss_bytes

# student, teacher; `tiny` runs the same phases on the tiny presets (what the tests run)
PAIRS = {
    "internvl": ("internvl3-1b", "internvl3-2b"),
    "qwen": ("qwen2.5-vl-3b", "qwen2.5-vl-7b"),
    "internvl-8b": ("internvl3-1b", "internvl3-8b"),  # the paper's pair (a GPU's size)
    "tiny": ("tiny-internvl-student", "tiny-internvl-teacher"),
}
STEP_PHASES = (
    "sft",
    "cache",
    "sum-cached",
    "agp-cached",
    "agp-bf16-cached",
    "agp-reuse-cached",
    "agp-modules-cached",  # combine.gram: modules, exact AGP without the (k, P) gradient buffer
    "sum-live",
    "agp-live",
    "sft-fsdp",  # the student sharded by FSDP2 (train.distributed: fsdp), one process: the path at real size
    "agp-fsdp-cached",
    "sft-ac",  # train.activation_checkpointing: every decoder layer recomputed in the backward pass
    "agp-ac-cached",
    "agp-modules-ac-cached",  # refused under mixed precision (a GPU's bf16), as the config is
)
CAPTURE_PHASES = ("capture-none", "capture-eager", "capture-rows")  # none: the same pass, no map kept
PHASES = STEP_PHASES + CAPTURE_PHASES
AMORTIZE_EVERY = 8
RECIPE = "drive-kd"
QUESTION = (
    "You are driving. Which action is safest for the ego vehicle now?\n"
    "A. Keep the lane at the current speed\nB. Change to the left lane\nC. Brake hard\nD. Change to the right lane\n"
    "Answer with the letter and the action."
)


def prepare(root: Path, pair: str, cameras: int) -> dict[str, Any]:
    """The pair's random-weight checkpoints (bf16 on disk, shared by camera counts) and a one-sample
    dataset with `cameras` images at the student's image size."""
    import numpy as np
    from PIL import Image

    from drivekd.data.formats import write_jsonl
    from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample
    from drivekd.models.loading import PRESETS, LoadOptions, init_like, real_shapes

    root = root.resolve()  # the dataset names its images by absolute path
    student_name, teacher_name = PAIRS[pair]
    paths: dict[str, Path | str] = {}
    for role, name in (("student", student_name), ("teacher", teacher_name)):
        if name in PRESETS:
            paths[role] = name
            continue
        paths[role] = root / "models" / name
        if not (root / "models" / name / "config.json").is_file():
            init_like(name, root / "models" / name, LoadOptions(dtype="bfloat16", seed=0))
    side = real_shapes()[student_name]["vision"].get("image", 448) if student_name not in PRESETS else 96
    data = root / "data" / f"{pair}-{cameras}cam"
    if not (data / "train.jsonl").is_file():
        (data / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        images, prompt = [], ""
        for c in range(cameras):
            path = data / "images" / f"cam{c}.png"
            pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            images.append(ImageRef(f"CAM_{c}", str(path)))
            prompt += f"CAM_{c}: {IMAGE_PLACEHOLDER}\n"
        sample = Sample("bench-0", "planning", "plan_action", images, prompt + QUESTION, "A. Keep the lane", "bench")
        # a one-camera copy warms every code path up before the timed step (first calls are slow)
        warm = Sample(
            "bench-warm",
            "planning",
            "plan_action",
            images[:1],
            f"CAM_0: {IMAGE_PLACEHOLDER}\n" + QUESTION,
            "A. Keep the lane",
            "bench",
        )
        write_jsonl([warm, sample], data / "train.jsonl")
        for split in ("val", "test"):  # `bench infer --data` prompts with the first test sample
            write_jsonl([sample], data / f"{split}.jsonl")
    paths["data"] = data
    return paths


def worker(phase: str, root: str, pair: str, cameras: int, device: str = "cpu") -> dict[str, Any]:
    """One phase in this (fresh) process: its time and peak memory (CPU: this process's peak RSS;
    CUDA: the peak allocated, student fp32 under bf16 autocast, teacher bf16)."""
    from accelerate import Accelerator

    from drivekd.data.formats import load_split
    from drivekd.distill.engine import Distiller
    from drivekd.distill.run import run_cache_teacher
    from drivekd.models.capture import capture, text_rows
    from drivekd.models.loading import LoadOptions, load_backend
    from drivekd.train.config import CombineConfig, DataConfig, DistillConfig, ModelConfig, TrainConfig

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    cuda = device.startswith("cuda")
    paths = prepare(Path(root), pair, cameras)
    cache_dir = Path(root) / "cache" / f"{pair}-{cameras}cam"
    student_options = LoadOptions(dtype="float32", freeze_vision=True, device=device)
    student = load_backend(str(paths["student"]), student_options)
    if "ac" in phase.split("-"):
        from drivekd.models import checkpointing

        student.model.train()  # layers are checkpointed in training mode only
        checkpointing.enable(student.model)
    if "fsdp" in phase.split("-"):
        from drivekd.train import fsdp

        fsdp.shard(student.model, student.fsdp_units(), torch.device(device), "bf16" if cuda else "no")
    samples = load_split(paths["data"], "train")
    warm, batch = (student.build_batch([s], max_length=8192).to(device) for s in samples)
    figures: dict[str, Any] = {
        "tokens": int(batch.inputs["input_ids"].shape[1]),
        "visual_tokens": int(batch.visual_mask.sum()),
        "trainable_parameters": sum(p.numel() for p in student.model.parameters() if p.requires_grad),
        "rss_after_load_bytes": rss_bytes(),
    }
    if cuda:
        figures["cuda_after_load_bytes"] = torch.cuda.memory_allocated(device)
    config = DistillConfig(
        model=ModelConfig(name=str(paths["student"]), freeze_vision=True),
        teacher={"name": str(paths["teacher"]), "dtype": "bfloat16" if cuda else "float32"},
        recipe=RECIPE,
        data=DataConfig(path=str(paths["data"]), val_split=None, max_length=8192),
        train=TrainConfig(
            output_dir=str(Path(root) / "run"),
            micro_batch_size=1,
            mixed_precision="bf16" if cuda else "no",
            activation_checkpointing="ac" in phase.split("-"),
        ),
    )
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step(backward: Any) -> float:
        """A warm-up step on the one-camera sample, then the timed step (AdamW's state, created at
        the first step, is part of the peak)."""
        times = []
        for b in (warm, batch):
            _sync(device)
            start = time.perf_counter()
            with accelerator.autocast():
                backward(b)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
        return times[-1]

    if phase in ("sft", "sft-fsdp", "sft-ac"):
        from drivekd.train.sft import cross_entropy

        figures["step_s"] = step(lambda b: accelerator.backward(cross_entropy(student.model, b)["ce"]))
    elif phase == "cache":
        start = time.perf_counter()
        run_cache_teacher(config, cache_dir, echo=lambda _: None)
        figures["step_s"] = time.perf_counter() - start
        figures["cache_bytes_per_sample"] = _cached_bytes(cache_dir, samples[-1].id)  # the timed sample's
    elif phase in STEP_PHASES:
        strategy, *rest = (part for part in phase.split("-") if part not in ("fsdp", "ac"))
        live = rest[-1] == "live"
        if not live and not (cache_dir / "manifest.json").is_file():
            raise RuntimeError(f"phase {phase} needs the cache phase first")
        combine = CombineConfig(
            strategy=strategy,
            buffer_dtype="bfloat16" if "bf16" in rest else None,
            amortize_every=AMORTIZE_EVERY if "reuse" in rest else None,
            gram="modules" if "modules" in rest else "buffer",
        )
        changed = config.model_copy(
            update={
                "combine": combine,
                "teacher": config.teacher.model_copy(update={"cache": None if live else str(cache_dir)}),
            }
        )
        cfg = DistillConfig.model_validate(changed.model_dump())  # what the config reader refuses, refused

        distiller = Distiller(cfg, student, samples)
        distiller.set_weights(dict.fromkeys(distiller.names, 1.0))  # a step's cost does not depend on them
        if "reuse" in rest:
            # the cheap step of amortised AGP reuses earlier coefficients; their values do not
            # change its cost, so it is timed at step 1 with coefficients set, without an exact step
            distiller.aggregator.coefficients = torch.ones(1 + len(distiller.names), dtype=torch.float64)
        at = 1 if "reuse" in rest else 0
        figures["step_s"] = step(lambda b: distiller.backward(distiller.objective(student.model, b), accelerator, at))
    elif phase in CAPTURE_PHASES:
        n = student.num_layers

        def forward_backward(b: Any) -> list[int]:
            if phase == "capture-none":  # the baseline: what the pass costs without any map
                out = student.model(**b.inputs)
                maps = [out.logits[:, :1, :1]]
            elif phase == "capture-eager":  # every layer's maps, as output_attentions gives them
                student.set_attention("eager")
                out = student.model(**b.inputs, output_attentions=True)
                maps = [out.attentions[0].mean(1), out.attentions[n - 2].mean(1)]
            else:  # what attn_tv at layers 0 and -2 captures
                index, _ = text_rows(b.inputs["attention_mask"], b.visual_mask)
                with capture(student, [], row_layers=[0, n - 2], row_index=index) as sink:
                    out = student.model(**b.inputs)
                maps = list(sink.rows.values())
            (out.logits.float().mean() + sum(m.float().mean() for m in maps)).backward()
            student.model.zero_grad(set_to_none=True)
            return list(maps[0].shape)

        with accelerator.autocast():
            forward_backward(warm)
            _sync(device)
            start = time.perf_counter()
            figures["map_shape"] = forward_backward(batch)
            _sync(device)
        figures["step_s"] = time.perf_counter() - start
    else:
        raise ValueError(f"unknown phase {phase!r} ({', '.join(PHASES)})")
    figures["peak_rss_bytes"] = peak_rss_bytes()
    if cuda:
        figures["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    figures["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    return figures


def _cached_bytes(cache_dir: Path, sample_id: str) -> int:
    """Bytes of one sample's targets in a teacher cache (the shards also hold the warm-up sample), its
    frame's prefix rows included: what one question of a frame costs on its own."""
    from safetensors import safe_open

    from drivekd.distill.cache import ITEM_BYTES

    shared = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))["prefixes"].get(sample_id)
    mine = {sample_id} | ({f"prefix:{shared[0]}"} if shared else set())
    total = 0
    for shard in cache_dir.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.split("/")[0] in mine:  # as stored: compressed values and their shapes
                    t = f.get_slice(key)
                    total += math.prod(t.get_shape()) * ITEM_BYTES[t.get_dtype()]
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def bench_scale(
    out: Path,
    pairs: tuple[str, ...] = ("internvl",),
    cameras: tuple[int, ...] = (2, 6),
    phases: tuple[str, ...] = PHASES,
    device: str = "cpu",
    echo: Any = print,
) -> dict[str, Any]:
    """Every (pair, cameras, phase) not measured yet, each in a fresh process; returns all figures."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        from drivekd.errors import DriveKDError

        raise DriveKDError(f"bench scale: device {device}: CUDA is not available")
    out.mkdir(parents=True, exist_ok=True)
    (out / "phases").mkdir(exist_ok=True)
    for pair in pairs:
        for n in cameras:
            prepare(out, pair, n)
            for phase in phases:
                file = out / "phases" / f"{pair}-{n}cam-{phase}.json"
                if file.is_file():
                    continue
                echo(f"[scale] {pair}, {n} cameras: {phase} ...")
                try:
                    result: dict[str, Any] = run_isolated(
                        "drivekd.bench.scale:worker", phase, str(out), pair, n, device
                    )
                except IsolatedFailure as e:  # recorded: one pair's failure (out of memory) is a figure too
                    result = {"error": str(e)}
                with atomic_file(file) as tmp:
                    tmp.write_text(json.dumps(result, indent=2) + "\n")
                echo(f"[scale] {pair}, {n} cameras: {phase}: {_summary(result)}")
    return collect(out)


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    return f"{result['step_s']:.1f} s, peak {_peak(result) / 2**30:.2f} GiB"


def _peak(result: dict[str, Any]) -> int:
    """The phase's peak memory on its device (CUDA allocated, or the process's RSS)."""
    return int(result.get("peak_cuda_bytes", result["peak_rss_bytes"]))


def collect(out: Path) -> dict[str, Any]:
    """The figures under OUT/phases with the ratios the issue's targets are stated in."""
    results: dict[str, Any] = {"machine": _machine(), "runs": {}}
    for file in sorted((out / "phases").glob("*.json")):
        pair, cams, phase = file.stem.split("-", 2)
        results["runs"].setdefault(f"{pair}-{cams}", {})[phase] = json.loads(file.read_text())
    for run in results["runs"].values():
        ok = {k: v for k, v in run.items() if "error" not in v}
        ratios: dict[str, float] = {}
        if "sft" in ok:
            sft = ok["sft"]["step_s"]
            for phase in ok:
                if phase in STEP_PHASES and phase not in ("sft", "cache"):
                    ratios[f"{phase} / sft"] = ok[phase]["step_s"] / sft
                    ratios[f"{phase} peak / sft peak"] = _peak(ok[phase]) / max(_peak(ok["sft"]), 1)
                if "ac" in phase.split("-") and phase != "sft-ac" and "sft-ac" in ok:  # both checkpointed
                    ratios[f"{phase} / sft-ac"] = ok[phase]["step_s"] / ok["sft-ac"]["step_s"]
                    ratios[f"{phase} peak / sft-ac peak"] = _peak(ok[phase]) / max(_peak(ok["sft-ac"]), 1)
            if "agp-cached" in ok and "agp-reuse-cached" in ok:
                amortised = (ok["agp-cached"]["step_s"] + (AMORTIZE_EVERY - 1) * ok["agp-reuse-cached"]["step_s"]) / (
                    AMORTIZE_EVERY
                )
                ratios[f"agp amortised every {AMORTIZE_EVERY} (cached) / sft"] = amortised / sft
        if all(p in ok for p in CAPTURE_PHASES):
            # what the maps add to the same forward and backward pass without them
            _, eager, rows = (_peak(ok[p]) - _peak(ok["capture-none"]) for p in CAPTURE_PHASES)
            ratios["capture memory: text rows / eager (over the pass without maps)"] = max(rows, 0) / max(eager, 1)
        run["ratios"] = ratios
    return results


def _machine() -> str:
    import os

    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU threads, torch {torch.__version__}"


def table(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']}", ""]
    for name, run in results["runs"].items():
        first = next((v for v in run.values() if isinstance(v, dict) and "tokens" in v), {})
        lines.append(
            f"## {name}: {first.get('tokens', '?')} tokens ({first.get('visual_tokens', '?')} visual), "
            f"{first.get('trainable_parameters', 0) / 1e6:.0f}M trainable parameters"
        )
        device = first.get("device", "cpu")
        label = "peak RSS (GiB)" if device == "cpu" else f"peak CUDA allocated (GiB, {device})"
        lines.append(f"| phase | step (s) | {label} | note |\n|---|---:|---:|---|")
        for phase in PHASES:
            if phase not in run:
                continue
            r = run[phase]
            if "error" in r:
                lines.append(f"| {phase} | – | – | {r['error']} |")
                continue
            note = ""
            if "cache_bytes_per_sample" in r:
                note = f"cache {r['cache_bytes_per_sample'] / 2**20:.1f} MiB per sample"
            if "map_shape" in r:
                note = f"map {tuple(r['map_shape'])}"
            lines.append(f"| {phase} | {r['step_s']:.2f} | {_peak(r) / 2**30:.2f} | {note} |")
        for k, v in run.get("ratios", {}).items():
            lines.append(f"- {k}: **{v:.2f}**")
        lines.append("")
    return "\n".join(lines)
