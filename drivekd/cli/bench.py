"""`drivekd bench ...`: measured speed and memory figures."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _emit(result: dict, json_out: Path | None) -> None:
    if json_out is not None:
        from drivekd.atomic import atomic_file

        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_out}")


@click.group()
def bench() -> None:
    """Benchmarks (ratios are measured within one run: this machine is noisy)."""


@bench.command()
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON."
)
@click.option("--batch", type=click.IntRange(min=8), default=8, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--amortize-every", type=click.IntRange(min=2), default=8, show_default=True)
def step(json_out: Path | None, batch: int, repeats: int, amortize_every: int) -> None:
    """One optimiser step: SFT vs three-signal distillation (cached targets) per gradient strategy."""
    from drivekd.bench.step import bench_step

    r = bench_step(batch_size=batch, repeats=repeats, amortize_every=amortize_every)
    click.echo(
        f"tiny InternVL student, batch {r['batch']} x {r['tokens']} tokens; SFT step {r['sft_step_s'] * 1000:.0f} ms "
        f"(median of its timings), {r['sft_flops'] / 1e9:.2f} GFLOP; each ratio divides by the SFT step timed just "
        "before its figure"
    )
    click.echo(
        "| strategy | step (ms) | SFT before (ms) | / SFT | GFLOP | / SFT's FLOPs |\n|---|---:|---:|---:|---:|---:|"
    )
    for name, seconds in r["step_s"].items():
        click.echo(
            f"| {name} | {seconds * 1000:.0f} | {r['sft_step_s_before'][name] * 1000:.0f} | {r['ratios'][name]:.2f} "
            f"| {r['flops'][name] / 1e9:.2f} | {r['flop_ratios'][name]:.2f} |"
        )
    click.echo(
        f"| agp, live teacher | {r['live_teacher_step_s'] * 1000:.0f} | {r['live_teacher_sft_step_s_before'] * 1000:.0f} "
        f"| {r['live_teacher_ratio']:.2f} | | |"
    )
    parts = r["exact_agp_flops"]
    click.echo(
        f"exact agp's GFLOP: the forward {parts['forward'] / 1e9:.2f} (SFT's {r['sft_forward_flops'] / 1e9:.2f}), "
        "each loss's backward on its own: "
        + ", ".join(f"{name} {n / 1e9:.2f}" for name, n in parts.items() if name != "forward")
    )
    _emit(
        {
            "sft_step_s": r["sft_step_s"],
            "ratios": r["ratios"],
            "flop_ratios": r["flop_ratios"],
            "live_teacher_ratio": r["live_teacher_ratio"],
            "details": r,
        },
        json_out,
    )


@bench.command()
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON."
)
@click.option(
    "--tokens", type=click.IntRange(min=512), default=1024, show_default=True, help="Minimum sequence length."
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def capture(json_out: Path | None, tokens: int, repeats: int) -> None:
    """Peak memory and time of selective capture vs eager output_attentions over all layers (tiny teacher)."""
    from drivekd.bench.capture import bench_capture

    r = bench_capture(tokens=tokens, repeats=repeats)
    click.echo(f"tiny InternVL teacher, batch 2 x {r['tokens']} tokens, no grad (teacher-side capture)")
    click.echo("| variant | time (ms) | extra peak RSS (MiB) |\n|---|---:|---:|")
    for name, v in r["variants"].items():
        click.echo(f"| {name} | {v['time_s'] * 1000:.0f} | {v['extra_peak_mb']:.0f} |")
    click.echo(
        f"perception+planning vs eager: memory {r['memory_ratio']:.2f}, time {r['time_ratio']:.2f}; "
        f"reasoning (all intermediate layers): memory {r['reasoning_memory_ratio']:.2f}, time {r['reasoning_time_ratio']:.2f}"
    )
    _emit({"memory_ratio": r["memory_ratio"], "time_ratio": r["time_ratio"], "details": r}, json_out)


@bench.command()
@click.option("--models", "models", required=True, multiple=True, help="Preset or checkpoint directory (repeatable).")
@click.argument("more_models", nargs=-1, metavar="[MODEL]...")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset folder [default: runs/quick/data (the demo's) if present, else 3 generated scenes].",
)
@click.option("--split", default="test", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Prompt = first N samples.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs after 1 warm-up.")
@click.option("--int8", is_flag=True, help="Also measure the last model with int8 dynamic quantisation (CPU).")
@click.option("--score", is_flag=True, help="Also score greedy predictions on the split.")
@click.option("--max-score-samples", type=click.IntRange(min=1), default=None, help="Score the first N samples only.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="The weights' dtype once loaded (bfloat16 on a GPU, as deployed).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads per worker [default: torch's choice]; 1 is steadier on a busy CPU.",
)
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON."
)
def infer(
    models: tuple[str, ...],
    more_models: tuple[str, ...],
    data_dir: Path | None,
    split: str,
    batch: int,
    new_tokens: int,
    repeats: int,
    int8: bool,
    score: bool,
    max_score_samples: int | None,
    device: str,
    dtype: str,
    threads: int | None,
    json_out: Path | None,
) -> None:
    """Deployment figures per model, each in a fresh process: params, peak memory, decode tok/s, first-token latency.

    `--models A B C` (or `--models A --models B`); ratios divide by the first model.
    """
    from drivekd.bench.infer import bench_infer, render_table

    r = bench_infer(
        [*models, *more_models],
        data_dir=data_dir,
        split=split,
        batch=batch,
        new_tokens=new_tokens,
        repeats=repeats,
        int8=int8,
        score=score,
        max_score_samples=max_score_samples,
        device=device,
        dtype=dtype,
        threads=threads,
    )
    s = r["settings"]
    click.echo(
        f"batch {s['batch']} x {s['prompt_tokens']} prompt tokens ({s['split']} of {s['data']}), {s['new_tokens']} new "
        f"tokens (EOS suppressed), median of {s['repeats']} after 1 warm-up; device {s['device']} ({s['dtype']}), "
        f"torch {s['torch']}, "
        f"{s['torch_threads']} threads; peak memory: {s['peak_mem']}"
        + ("" if s["load_avg_1min"] is None else f"; load average {s['load_avg_1min']:.1f} before the run")
    )
    click.echo(render_table(r))
    first = r["models"][0]
    if s["device"].startswith("cpu"):
        click.echo(
            f"CPU peak memory is the whole process while serving; {first['rss_before_load_mb']:.0f} MB of it "
            "(Python, torch, data) is there before any model is loaded."
        )
    _emit(r, json_out)


@bench.command()
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Checkpoints, data and figures (resumable)."
)
@click.option(
    "--pair",
    "pairs",
    type=click.Choice(["internvl", "qwen", "internvl-8b", "tiny"]),
    multiple=True,
    default=("internvl",),
    show_default=True,
    help="internvl: InternVL3-1B student, -2B teacher; qwen: Qwen2.5-VL-3B, -7B; internvl-8b: "
    "InternVL3-1B, -8B (the paper's pair); tiny: the presets.",
)
@click.option("--cameras", type=click.IntRange(min=1), multiple=True, default=(2, 6), show_default=True)
@click.option("--phase", "phases", multiple=True, help="Only these phases (default: all, in order).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (bf16 autocast, bf16 teacher).")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON."
)
def scale(
    out: Path,
    pairs: tuple[str, ...],
    cameras: tuple[int, ...],
    phases: tuple[str, ...],
    device: str,
    json_out: Path | None,
) -> None:
    """Real-size SFT and distillation steps: time and peak memory per phase (each in its own process),
    teacher-cache bytes per sample, text-row vs eager capture. Heavy (minutes per phase on a CPU);
    run it again to resume."""
    from drivekd.bench.scale import PHASES, bench_scale, table
    from drivekd.errors import DriveKDError

    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise DriveKDError(f"unknown phase {unknown[0]!r} ({', '.join(PHASES)})")
    results = bench_scale(out, pairs, cameras, phases or PHASES, device=device, echo=click.echo)
    click.echo(table(results))
    _emit(results, json_out)


@bench.command(name="cache")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (and nothing else) on stdout.")
@click.option(
    "--pair",
    type=click.Choice(["internvl", "qwen"]),
    default="internvl",
    show_default=True,
    help="internvl: the shipped DriveSim teacher and student base (InternVL3 architecture); qwen: the tiny "
    "Qwen2.5-VL presets. With --real-shapes: InternVL3-1B student, -2B teacher; Qwen2.5-VL-3B, -7B.",
)
@click.option("--cameras", type=click.IntRange(min=1), default=2, show_default=True, help="Images per frame.")
@click.option("--questions-per-frame", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--frames", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Questions per teacher batch.")
@click.option(
    "--real-shapes",
    is_flag=True,
    help="The pair's published shapes with random weights (a GPU's work; checkpoints kept in --work).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (the teacher in bf16).")
@click.option(
    "--lossy-questions",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Questions whose losses and gradients compare each storage with the live teacher.",
)
@click.option("--lossy-batch", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Write the timed caches (with and without reuse) this many times in turn, keeping each one's fastest.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=None,
    help="Where --real-shapes keeps its random-weight checkpoints [default: a temporary folder].",
)
@click.option("--out", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def cache(
    as_json: bool,
    pair: str,
    cameras: int,
    questions_per_frame: int,
    frames: int,
    batch: int,
    real_shapes: bool,
    device: str,
    lossy_questions: int,
    lossy_batch: int,
    repeats: int,
    work: Path | None,
    json_out: Path | None,
) -> None:
    """Teacher-cache bytes and teacher seconds per question, with each frame's prefix run once and stored
    once and without (every question whole), and each lossy storage's error against the live teacher,
    on a synthetic dataset of FRAMES frames with CAMERAS images and Q questions each."""
    import sys

    from drivekd.bench.cache import bench_cache

    # progress on stderr: with --json, stdout holds the JSON object alone
    result = bench_cache(
        pair,
        cameras=cameras,
        questions_per_frame=questions_per_frame,
        frames=frames,
        real=real_shapes,
        device=device,
        batch=batch,
        lossy_questions=lossy_questions,
        lossy_batch=lossy_batch,
        repeats=repeats,
        work=work,
        echo=lambda line: click.echo(line, err=True),
    )
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        click.echo(
            f"{result['student']} <- {result['teacher']}, {cameras} cameras, {questions_per_frame} questions a frame, "
            f"{result['tokens_per_question']:.0f} tokens a question ({result['visual_tokens_per_frame']} visual), "
            f"{result['device']}"
        )
        click.echo("| cache | MiB a question | teacher s a question |\n|---|---:|---:|")
        click.echo(
            f"| prefix run and stored once, zstd | {result['bytes_per_question'] / 2**20:.3f} | "
            f"{result['teacher_seconds_per_question']:.4f} |"
        )
        click.echo(f"| the same, uncompressed | {result['bytes_per_question_uncompressed'] / 2**20:.3f} | |")
        click.echo(
            f"| every question whole | {result['bytes_per_question_unshared'] / 2**20:.3f} | "
            f"{result['teacher_seconds_per_question_without_reuse']:.4f} |"
        )
        for storage, row in result["lossy"].items():
            click.echo(
                f"{storage}: {row['bytes_per_question'] / 2**20:.3f} MiB a question (zstd; "
                f"{row['bytes_per_question_uncompressed'] / 2**20:.3f} uncompressed), loss error <= "
                f"{row['loss_rel_error']:.2e}, gradient cosine >= {row['grad_cosine']:.6f}"
            )
    _emit_quietly(result, json_out)


def _emit_quietly(result: dict, json_out: Path | None) -> None:
    if json_out is not None:
        from drivekd.atomic import atomic_file

        json_out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
