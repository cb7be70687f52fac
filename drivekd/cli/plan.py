"""`drivekd plan`: predicted peak memory per device of an SFT or distillation config, by part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="An SFT or distillation YAML."
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes of a data-parallel run; with N > 1, FSDP-sharded figures are shown beside DDP's.",
)
@click.option(
    "--device-memory",
    type=click.FloatRange(min=0, min_open=True),
    default=80.0,
    show_default=True,
    help="GiB per device: whether the plan fits, and what to change when it does not.",
)
@click.option(
    "--tokens", type=click.IntRange(min=1), default=None, help="Tokens per sample [default: data.max_length]."
)
@click.option(
    "--answer-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Answer tokens of the longest sample: the positions the LM head runs at for the CE "
    "[default: every text token, an upper bound].",
)
@click.option(
    "--images",
    type=click.IntRange(min=0),
    default=None,
    help="Images per sample [default: the most among the data's first samples, else 1].",
)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="cpu: plan for this machine's RAM (the CPU optimiser path, no CUDA context), as --measure does.",
)
@click.option(
    "--measure",
    is_flag=True,
    help="Also run one real training step of the config on this CPU (fresh process) and compare its peak "
    "with the plan for that batch. Small configs only: it loads the model, data and teacher cache.",
)
@click.option(
    "--questions-per-frame",
    type=click.FloatRange(min=1),
    default=None,
    help="Questions about each frame, for the teacher cache's size with shared prefixes [default: the data's].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.argument("overrides", nargs=-1)
def plan(
    config_path: Path,
    gpus: int,
    device_memory: float,
    tokens: int | None,
    answer_tokens: int | None,
    images: int | None,
    device: str,
    measure: bool,
    questions_per_frame: float | None,
    as_json: bool,
    overrides: tuple[str, ...],
) -> None:
    """Predicted peak memory per device of one training step of CONFIG (SFT or distillation, told
    apart by its fields), by part: weights, gradients, optimiser state, activations, captured
    attention maps, AGP buffers, teacher cache reads or a live teacher. Nothing is loaded: the models
    are built on the meta device. OVERRIDES are KEY=VALUE, as for `drivekd sft` and `drivekd distill`."""
    from drivekd.bench.plan import Inputs, load_any_config
    from drivekd.bench.plan import plan as make_plan
    from drivekd.bench.plan_measure import measure_step

    config = load_any_config(config_path, overrides)
    inputs = Inputs(
        tokens=tokens,
        answer_tokens=answer_tokens,
        images=images,
        gpus=gpus,
        device=device,
        device_memory_gb=device_memory,
        questions_per_frame=questions_per_frame,
    )
    result = make_plan(config, inputs)
    measured = measure_step(config) if measure else None
    if as_json:
        out: dict[str, Any] = {"config": str(config_path), **result.as_dict()}
        if measured is not None:
            out["measured"] = {**measured, "plan": measured["plan"].as_dict()}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(render(result, str(config_path), device_memory))
    if measured is not None:
        click.echo("\n" + render_measured(measured))


# the moments of the forward/backward phase a part counts in (drivekd.bench.plan.phases_of)
MOMENTS = {
    "saved": "",
    "teacher forward": " (teacher forward)",
    "targets": " (teacher forward, losses)",
    "losses": " (losses, backward)",
    "backward": " (backward)",
    "transient": " (backward, largest transient)",
}


def _where(counted: str) -> str:
    return f"forward/backward{MOMENTS[counted]}" if counted in MOMENTS else counted


def _m(n: float) -> str:
    from drivekd.bench.plan import format_bytes

    return format_bytes(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render(p: Any, config_path: str, device_memory: float) -> str:
    """The plan as Markdown: what is planned, a table of parts, the phases, the fit and the advice."""
    st, s = p.student, p.step
    lines = []
    what = "distillation" if p.kind == "distill" else "SFT"
    if p.kind == "distill":
        what += f", combine.strategy {s['strategy']}, {s['losses']} losses (CE and {s['losses'] - 1} signals)"
    lines.append(f"plan for {config_path}: {what}")
    parts = ", ".join(f"{k} {_count(v)}" for k, v in st["trainable_by_part"].items())
    lines.append(
        f"student {st['name']} ({st['family']}, {st['dtype']}): {_count(st['parameters'])} parameters, "
        f"{_count(st['trainable'])} trainable ({parts}); {st['layers']} LM layers, hidden {st['hidden']}, "
        f"{st['heads']} heads ({st['kv_heads']} KV), MLP {st['intermediate']}, vocabulary {st['vocab']}"
    )
    for t in p.teachers:
        where = "on the device" if t["on_device"] else "not loaded (teacher.cache)"
        if t.get("device_map") is not None:
            where = f"spread by teacher.device_map={t['device_map']} (the table counts its weights on one device)"
        lines.append(
            f"teacher {t['name']} ({_count(t['parameters'])} parameters, {t['layers']} LM layers, {t['dtype']}) "
            f"for {', '.join(t['signals'])}: {where}"
        )
    if p.cache is not None:
        c = p.cache
        size = ", ".join(f"{_m(b)} {s}" for s, b in c["bytes_per_sample"].items())
        size += (
            f" (each frame's {s['visual_tokens']}-token image prefix stored once for {c['questions_per_frame']:.1f} "
            f"questions; {_m(c['bytes_per_sample_unshared']['fp16'])} fp16 without)"
        )
        total = (
            f"; {c['samples']:,} train and val samples: at most "
            + ", ".join(f"{_m(b)} {s}" for s, b in c["bytes"].items())
            if c["bytes"] is not None
            else ""
        )
        lines.append(f"teacher cache (drivekd cache-teacher): {size} a sample at {c['tokens']} tokens{total}")
    per_device = "per device, " if s["gpus"] > 1 else ""
    lines.append(
        f"batch {per_device}{s['micro_batch']} x {s['tokens']} tokens ({s['images']} image(s) x "
        f"{st['visual_tokens_per_image']} visual tokens, {s['text_tokens']} text tokens), "
        f"activations in {s['activation_bytes']}-byte values; {s['gpus']} {'GPU' if s['device'] == 'cuda' else 'CPU'}"
        f"{'s' if s['gpus'] > 1 else ''}"
    )
    lines.append("")
    fsdp = p.fsdp
    head = (
        "| part | per device | counts in |"
        if fsdp is None
        else f"| part | DDP, per device | FSDP x{fsdp['gpus']}, per device | counts in |"
    )
    lines.append(head)
    lines.append("|---|---:|---|" if fsdp is None else "|---|---:|---:|---|")
    names = list(p.parts) + ([k for k in fsdp["parts"] if k not in p.parts] if fsdp else [])
    for name in names:
        counted = p.counted.get(name) or fsdp["counted"][name]
        where = ", ".join(_where(c) for c in counted)
        ddp = _m(p.parts[name]) if name in p.parts else "–"
        if fsdp is None:
            lines.append(f"| {name} | {ddp} | {where} |")
        else:
            shard = _m(fsdp["parts"][name]) if name in fsdp["parts"] else "–"
            lines.append(f"| {name} | {ddp} | {shard} | {where} |")
    top = max((k for k in p.phases if k != "resident"), key=lambda k: p.phases[k])
    if fsdp is None:
        lines.append(f"| **peak** | **{_m(p.peak)}** | resident + {top} |")
    else:
        lines.append(f"| **peak** | **{_m(p.peak)}** | **{_m(fsdp['peak'])}** | resident + the largest phase |")
    lines.append("")
    lines.append("phases: " + "; ".join(f"{k} {_m(v)}" for k, v in p.phases.items()))
    lines.append(
        "(forward/backward: what the forward saved, plus the largest of three moments: the teacher's forward, "
        "the losses, and the backward with only its largest transient)"
    )
    budget = f"{_m(p.budget)} usable" + (" after the CUDA context and allocator slack" if s["device"] == "cuda" else "")
    verdict = "fits" if p.fits else "does NOT fit"
    sharded = fsdp is not None and st.get("distributed") == "fsdp"
    peak = fsdp["peak"] if sharded else p.peak
    how = f" (train.distributed: fsdp, x{fsdp['gpus']})" if sharded else ""
    lines.append(f"{verdict} in {device_memory:g} GiB per device{how} ({budget}): peak {peak / p.budget:.0%} of it")
    if fsdp is not None and not sharded:
        lines.append(
            f"with FSDP x{fsdp['gpus']}: peak {_m(fsdp['peak'])}, {'fits' if fsdp['peak'] <= p.budget else 'does NOT fit'}"
        )
    for note in p.notes:
        lines.append(f"- {note}")
    if p.advice:
        lines.append("\nwhat to change, by memory saved (each planned on its own):\n")
        lines.append("| change | set | saves | peak then | fits |\n|---|---|---:|---:|---|")
        for a in p.advice:
            fields = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in a["fields"].items()).replace("|", "\\|") or "–"
            saves = "–" if a["saves"] is None else _m(a["saves"])
            peak = "–" if a["peak"] is None else _m(a["peak"])
            fits = "–" if a["fits"] is None else ("yes" if a["fits"] else "no")
            lines.append(f"| {a['change']} | {fields} | {saves} | {peak} | {fits} |")
    return "\n".join(lines)


def render_measured(r: dict[str, Any]) -> str:
    m = r["measured"]
    return "\n".join(
        [
            f"measured on this CPU: one step of {m['micro_batch']} x {m['tokens']} tokens ({m['images']} image(s), "
            f"{'padded' if m['padded'] else 'no padding'}), planned for this batch and the CPU optimiser path:",
            f"- predicted peak {_m(r['predicted_total'])}",
            f"- peak RSS: {_m(r['rss_total'])} (weights and optimiser state {_m(m['weights'] + m['optimiser_state'])} "
            f"+ the step's growth {_m(m['growth'])}); predicted / measured {r['ratio_rss']:.2f}",
            f"- live tensors: {_m(r['tensor_total'])}; predicted / measured {r['ratio_tensors']:.2f} "
            f"(forward/backward alone: growth {_m(m['tensor_growth_pass'])})",
        ]
    )
