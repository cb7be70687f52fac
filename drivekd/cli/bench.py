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
        f"tiny InternVL student, batch {r['batch']} x {r['tokens']} tokens; SFT step {r['sft_step_s'] * 1000:.0f} ms"
    )
    click.echo("| strategy | step (ms) | / SFT |\n|---|---:|---:|")
    for name, seconds in r["step_s"].items():
        click.echo(f"| {name} | {seconds * 1000:.0f} | {r['ratios'][name]:.2f} |")
    click.echo(f"| agp, live teacher | {r['live_teacher_step_s'] * 1000:.0f} | {r['live_teacher_ratio']:.2f} |")
    _emit(
        {
            "sft_step_s": r["sft_step_s"],
            "ratios": r["ratios"],
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
