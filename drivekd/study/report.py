"""The study's report: `results.json`, `report.md` and its PNG plots, rebuilt from whatever exists.

Scores are on `test`; `val` scores are reported beside them because choices (loss share, best
variant) are made on `val`. A difference counts as beyond the seed spread only when the two means
are further apart than the sum of their standard deviations and both have at least two seeds.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from drivekd.atomic import atomic_file
from drivekd.data.sample import CAPABILITIES
from drivekd.errors import DataError

COLUMNS = (*CAPABILITIES, "average")
REFERENCES = ("teacher", "majority")  # rows that are not student variants


def _score(path: Path) -> dict[str, Any] | None:
    from drivekd.eval.scoring import normalize_question_type, score_file

    if not path.is_file():
        return None
    result = score_file(path)
    return {
        **{c: result["capabilities"].get(c) for c in CAPABILITIES},
        "average": result["average"],
        "average_over": result["average_over"],
        "setting": result["setting"],
        "items": result["samples"],
        "types": {normalize_question_type(t): v["score"] for t, v in result["by_question_type"].items()},
    }


AVERAGES = ("average", "val_average", "other_images_average")


def _lacks(*scores: dict[str, Any] | None) -> dict[str, list[str]]:
    """Per Avg (`AVERAGES`: test, val, other images), the capabilities it lacks (an Avg over fewer than three)."""
    return {
        k: [] if s is None or s["average"] is None else [c for c in CAPABILITIES if c not in s["average_over"]]
        for k, s in zip(AVERAGES, scores, strict=True)
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out: Path) -> dict[str, Any]:
    settings = json.loads((out / "study.json").read_text(encoding="utf-8"))["settings"]
    variants: list[dict[str, Any]] = []
    for name in REFERENCES:
        test, val = _score(out / "preds" / name / "test.jsonl"), _score(out / "preds" / name / "val.jsonl")
        control = _score(out / "preds" / name / "test-other-images.jsonl")
        if test:
            variants.append(
                {
                    "name": name,
                    **{c: test[c] for c in COLUMNS},
                    "capabilities": {c: test[c] for c in CAPABILITIES},
                    "items": test["items"],
                    "types": test["types"],
                    "other_images_average": control["average"] if control else None,
                    "val_average": val["average"] if val else None,
                    "avg_lacks": _lacks(test, val, control),
                    "seeds": [],
                    "std": dict.fromkeys(COLUMNS, 0.0),
                    "failed": [],
                }
            )
    for name in settings["variants"]:
        per_seed, failed = [], []
        for seed in settings["seeds"]:
            fail = out / "runs" / name / f"seed-{seed}" / "failed.json"
            if fail.is_file():
                failed.append({"seed": seed, "error": json.loads(fail.read_text())["error"]})
                continue
            test = _score(out / "preds" / name / f"seed-{seed}" / "test.jsonl")
            val = _score(out / "preds" / name / f"seed-{seed}" / "val.jsonl")
            control = _score(out / "preds" / name / f"seed-{seed}" / "test-other-images.jsonl")
            if test:
                val_ce = _final_val_ce(out / "runs" / name / f"seed-{seed}" / "metrics.jsonl")
                per_seed.append(
                    {
                        "seed": seed,
                        **test,
                        "other_images_average": control["average"] if control else None,
                        "val_average": val["average"] if val else None,
                        "val_ce": val_ce,
                        "avg_lacks": _lacks(test, val, control),
                    }
                )
        row: dict[str, Any] = {"name": name, "seeds": per_seed, "failed": failed, "std": {}}
        for c in COLUMNS:
            row[c], row["std"][c] = _mean_std([s[c] for s in per_seed if s[c] is not None])
        row["capabilities"] = {c: row[c] for c in CAPABILITIES}
        row["items"] = per_seed[0]["items"] if per_seed else None
        types = sorted({t for p in per_seed for t in p["types"]})
        row["types"] = {
            t: _mean_std([p["types"][t] for p in per_seed if p["types"].get(t) is not None])[0] for t in types
        }
        row["other_images_average"] = _mean_std(
            [p["other_images_average"] for p in per_seed if p["other_images_average"] is not None]
        )[0]
        row["val_average"] = _mean_std([s["val_average"] for s in per_seed if s["val_average"] is not None])[0]
        row["val_ce"], row["std"]["val_ce"] = _mean_std([s["val_ce"] for s in per_seed if s["val_ce"] is not None])
        row["avg_lacks"] = {
            k: [c for c in CAPABILITIES if any(c in s["avg_lacks"][k] for s in per_seed)] for k in AVERAGES
        }
        variants.append(row)
    mechanism_file = out / "mechanism.json"
    mechanism = json.loads(mechanism_file.read_text(encoding="utf-8")) if mechanism_file.is_file() else None
    return {"settings": settings, "variants": variants, "mechanism": mechanism, "robustness": robustness(out, settings)}


def robustness(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """DriveBench's robustness table: per model (the teacher, each variant's first seed), the test Avg
    on the robustness subset clean, per corruption, per group (the mean of its corruptions' Avgs) and
    text-only. Empty unless the profile asked for it."""
    from drivekd.eval.corruptions import CORRUPTIONS, GROUPS

    config = settings.get("robustness")
    if not config:
        return []
    models = [("teacher", out / "preds" / "teacher" / "robust")]
    models += [(f"{v}/seed-{settings['seeds'][0]}", out / "preds" / v / f"seed-{settings['seeds'][0]}" / "robust")
               for v in settings["variants"]]  # fmt: skip
    rows = []
    for name, folder in models:
        if not folder.is_dir():
            continue

        def avg(stem: str, folder: Path = folder) -> float | None:
            file = folder / f"{stem}.jsonl"
            score = _score(file)
            if score is None:
                return None
            # the answers must have been made under the setting the file's name says
            expected = None if stem == "clean" else stem if stem == "text_only" else stem.replace("-", ":", 1)
            if score["setting"] != expected and not str(score["setting"]).startswith(f"{expected}:"):
                raise DataError(
                    f"{file}: answers made under setting {score['setting']!r}, the file name says {expected!r}"
                )
            return score["average"]

        per = {c: avg(f"{c}-{config['severity']}") for c in config["corruptions"]}
        groups: dict[str, Any] = {}
        for group in GROUPS:
            names = [c for c in config["corruptions"] if CORRUPTIONS[c].group == group]
            done = [per[c] for c in names if per[c] is not None]
            groups[group] = {
                "average": statistics.fmean(done) if done else None,
                "of": len(done),
                "named": len(names),
            }
        rows.append(
            {
                "model": name,
                "clean": avg("clean"),
                "text_only": avg("text_only") if config["text_only"] else None,
                "corruptions": per,
                "groups": groups,
            }
        )
    return rows


def _final_val_ce(metrics: Path) -> float | None:
    """The answer-token CE on val at the end of an all-data run (per-capability runs have none)."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    values = [r["val_ce"] for r in rows if "val_ce" in r]
    return values[-1] if values else None


def beyond_spread(a: dict[str, Any], b: dict[str, Any], column: str = "average") -> bool | None:
    """True/False when both rows have >= 2 seeds; None when the spread is unknown."""
    if len(a["seeds"]) < 2 or len(b["seeds"]) < 2 or a[column] is None or b[column] is None:
        return None
    return abs(a[column] - b[column]) > a["std"][column] + b["std"][column]


def _fmt(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "–"
    if len(row["seeds"]) > 1:
        return f"{value:.1f} ± {row['std'][column]:.1f}" + _mark(row, column)
    return f"{value:.1f}" + _mark(row, column)


PARTIAL = "*"  # as `drivekd score`: an Avg over fewer than the three capabilities


def _mark(row: dict[str, Any], column: str) -> str:
    return PARTIAL if (row.get("avg_lacks") or {}).get(column) else ""


def _avg(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return "–" if value is None else f"{value:.1f}" + _mark(row, column)


def _partial_note(variants: list[dict[str, Any]]) -> list[str]:
    names = {"average": "test", "val_average": "val", "other_images_average": "test with other images"}
    lacking = [
        f"{v['name']} ({names[k]}) has no {', '.join(v['avg_lacks'][k])}"
        for v in variants
        for k in AVERAGES
        if (v.get("avg_lacks") or {}).get(k)
    ]
    if not lacking:
        return []
    n = len(CAPABILITIES)
    note = f"Avg{PARTIAL} is the mean of fewer than the {n} capabilities, not comparable with an Avg of all {n}: "
    return ["", note + "; ".join(lacking) + "."]


def _curves(out: Path, settings: dict[str, Any], png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(7, 4))
    drew = False
    seed = settings["seeds"][0]
    for name in settings["variants"]:
        path = out / "runs" / name / f"seed-{seed}" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        points = [(r["step"], r["ce"]) for r in rows if "ce" in r and "lr" in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=name, linewidth=1)
            drew = True
    ax.set_title(f"students (seed {seed}, all-data runs)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training CE (answer tokens)")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if drew:
        _save(fig, png)
    plt.close(fig)
    return drew


def _bars(variants: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [v for v in variants if v["average"] is not None]
    fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(rows) + 2), 4))
    width = 0.8 / len(COLUMNS)
    x = np.arange(len(rows))
    for k, column in enumerate(COLUMNS):
        values = [v[column] or 0.0 for v in rows]
        errors = [v["std"].get(column) or 0.0 for v in rows]
        ax.bar(x + (k - 1.5) * width, values, width, yerr=errors, capsize=2, label=column)
    ax.set_xticks(x, [v["name"] for v in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test score (0-100)")
    ax.legend(fontsize=8, ncols=4)
    ax.set_title("per-capability test scores (mean ± std over seeds)")
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)


def _save(fig: Any, png: Path) -> None:
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _deployment(out: Path) -> str:
    file = out / "bench" / "infer.json"
    if not file.is_file():
        return "_not measured yet_\n"
    from drivekd.bench.infer import render_table

    return render_table(json.loads(file.read_text(encoding="utf-8"))) + "\n"


def _timings(out: Path) -> list[str]:
    file = out / "timings.jsonl"
    if not file.is_file():
        return []
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    total = sum(r["seconds"] for r in rows)
    lines = [f"Steps run by the invocations so far: {total / 60:.1f} min of step time in total."]
    ends = [(r["end"] - r["seconds"], r["end"]) for r in rows if "end" in r]
    if ends:  # parallel jobs overlap, so the wall time is shorter than the sum
        wall = max(e for _, e in ends) - min(s for s, _ in ends)
        lines[0] += f" Wall time from the first step's start to the last one's end: {wall / 60:.1f} min"
        lines[0] += " (it includes any pause between invocations)."
    return [*lines, "", *(f"- {r['step']} {r['seconds']:.0f} s" for r in rows)]


def _matched_layers(recipe: Path, settings: dict[str, Any]) -> list[str]:
    """Which student layers each signal of the recipe constrains, with the teacher layers it is taught."""
    from drivekd.distill.recipe import load_recipe
    from drivekd.models.loading import model_shape

    student, teacher = model_shape(settings["student"]), model_shape(settings["teacher"])
    if student is None or teacher is None:
        return []
    parts = []
    for name, sig in load_recipe(str(recipe)).items():
        pairs = sig.pairs(student.num_layers, teacher.num_layers)
        taught = ", ".join(f"{s} <- {w[0]}" if len(w) == 1 else f"{s} <- mean of {w[0]}..{w[-1]}" for s, w in pairs)
        parts.append(f"{name}: {taught}")
    return [
        f"Student layer <- teacher layer(s), on the {student.num_layers}-layer student and the "
        f"{teacher.num_layers}-layer teacher: " + "; ".join(parts) + ".",
        "",
    ]


def write_report(out: Path) -> Path:
    results = collect(out)
    settings, variants = results["settings"], results["variants"]
    _write(out / "results.json", json.dumps(results, indent=2) + "\n")
    _bars(variants, out / "scores.png")
    has_curves = _curves(out, settings, out / "curves.png")
    by_name = {v["name"]: v for v in variants}
    ce = by_name.get("ce")
    lines = [
        f"# Drive-KD reproduction on DriveSim-QA — profile `{settings['name']}`",
        "",
        f"Report written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, Python {platform.python_version()}). "
        f"Teacher `{settings['teacher']}`, students from `{settings['student']}` ({settings['student_epochs']} "
        f"epochs, lr {settings['student_lr']}), {settings['scenes']} scenes split {settings['split']} "
        f"(seed {settings['data_seed']}), seeds {settings['seeds']}, each distillation loss starting at "
        f"{settings['kd_share']} x CE unless its variant sets another share (each run's weights in "
        "`runs/NAME/seed-N/calibration.json`).",
        "",
        "## Scores (test; val Avg is what choices are made on)",
        "",
        "| variant | Perception | Reasoning | Planning | Avg | val Avg | val CE | seeds | vs CE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in variants:
        versus = ""
        if ce is not None and v is not ce and v["seeds"] and ce["average"] is not None and v["average"] is not None:
            delta = v["average"] - ce["average"]
            verdict = {True: "beyond seed spread", False: "within seed spread", None: "one seed: spread unknown"}[
                beyond_spread(v, ce)
            ]
            versus = f"{delta:+.1f} ({verdict})"
            if v.get("val_ce") is not None and ce.get("val_ce") is not None:
                beyond = beyond_spread(v, ce, "val_ce")
                versus += f"; val CE {v['val_ce'] - ce['val_ce']:+.3f}" + (" (beyond seed spread)" if beyond else "")
        val = _avg(v, "val_average")
        val_ce = "–"
        if v.get("val_ce") is not None:
            val_ce = f"{v['val_ce']:.3f}" + (f" ± {v['std']['val_ce']:.3f}" if len(v["seeds"]) > 1 else "")
        lines.append(
            f"| {v['name']} | {_fmt(v, 'perception')} | {_fmt(v, 'reasoning')} | {_fmt(v, 'planning')} | "
            f"{_fmt(v, 'average')} | {val} | {val_ce} | {len(v['seeds']) if v['name'] not in REFERENCES else '–'} | {versus} |"
        )
    lines += _partial_note(variants)
    failed = [(v["name"], f) for v in variants for f in v["failed"]]
    if failed:
        lines += ["", "### Failed runs", ""]
        lines += [f"- `{name}` seed {f['seed']}: {f['error']}" for name, f in failed]
    lines += ["", "![per-capability scores](scores.png)", ""]
    lines += _per_type(variants)
    lines += _robustness_lines(results["robustness"], settings)
    lines += _mechanism(variants, results["mechanism"], settings["seeds"][0])
    if has_curves:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    lines += ["## Teacher pre-study", ""]
    recipe = out / "prestudy" / "recipe.yaml"
    if recipe.is_file():
        lines += [
            "Recommended signals (the students' `prestudy` recipe; rules in docs/prestudy.md):",
            "",
            "```yaml",
            recipe.read_text(encoding="utf-8").strip(),
            "```",
            "",
            *_matched_layers(recipe, settings),
            "![pre-study panels](prestudy/prestudy.png)",
            "",
        ]
    lines += ["## Deployment (teacher vs student vs int8 student)", "", _deployment(out)]
    lines += ["## Time", "", *_timings(out)]
    report = out / "report.md"
    _write(report, "\n".join(lines) + "\n")
    return report


def _robustness_lines(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    from drivekd.eval.corruptions import GROUPS

    if not rows:
        return []
    config = settings["robustness"]

    def cell(value: float | None, note: str = "") -> str:
        return "–" if value is None else f"{value:.1f}{note}"

    def group_cell(g: dict[str, Any]) -> str:
        if g["named"] == 0:
            return "–"
        return cell(g["average"], "" if g["of"] == g["named"] else f" ({g['of']} of {g['named']})")

    lines = [
        "## Robustness (DriveBench's settings)",
        "",
        f"Test Avg on {config['samples']} test questions spread over the split, clean, under each corruption "
        f"group at severity {config['severity']} (the mean of its corruptions' Avgs; `drivekd eval --corruption "
        "list` says what each does) and text-only (no images). Students: each variant's first seed. A column "
        "near clean means the model does not use what the setting took away; text-only near clean means it "
        "answers from the question alone.",
        "",
        "| model | clean | " + " | ".join(GROUPS) + " | text-only |",
        "|---|---:|" + "---:|" * len(GROUPS) + "---:|",
    ]
    for row in rows:
        groups = " | ".join(group_cell(row["groups"][g]) for g in GROUPS)
        lines.append(f"| {row['model']} | {cell(row['clean'])} | {groups} | {cell(row['text_only'])} |")
    lines += ["", "Per corruption (Avg): " + "; ".join(
        f"{row['model']}: " + ", ".join(f"{c} {cell(v)}" for c, v in row["corruptions"].items()) for row in rows
    ), ""]  # fmt: skip
    return lines


def _per_type(variants: list[dict[str, Any]]) -> list[str]:
    rows = [v for v in variants if v.get("types")]
    if not rows:
        return []
    types = sorted({t for v in rows for t in v["types"]})
    items = rows[0].get("items")
    out = [
        f"## Per question type (test, {items} items)",
        "",
        "| type | " + " | ".join(v["name"] for v in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for t in types:
        cells = [v["types"].get(t) for v in rows]
        out.append(f"| {t} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    return [*out, ""]


def _mechanism(variants: list[dict[str, Any]], mechanism: dict[str, Any] | None, first_seed: int) -> list[str]:
    """Does each model read the images, and where does it look when it answers about an object?"""
    out = [
        "## Mechanism: reading the image, looking at the object",
        "",
        "Test Avg with each model's own images and with another scene's (the image-blind control: a "
        "model whose score barely drops answers from the text). Attention: head-mean mass that the "
        "positions committing the answer put on the visual token under the asked-about object, as a "
        "multiple of an even spread over the visual tokens (1.0 = no preference), mean over LM layers, "
        "the students' first seed (per layer in `mechanism.json`); the scores are means over seeds.",
        "",
        "| model | test Avg | Avg, other images | drop | attention on the object (x even) |",
        "|---|---:|---:|---:|---:|",
    ]
    attention = {
        # the first seed's students (a suffix match would take seed-10 for seed-0), the teacher and the base
        k.split("/seed-")[0]: v
        for k, v in (mechanism or {}).items()
        if k.endswith((f"/seed-{first_seed}", "teacher", "base"))
    }
    names = [v["name"] for v in variants if v["name"] != "majority"]
    for name in [*names, *(k for k in attention if k not in names)]:
        row = next((v for v in variants if v["name"] == name), {})
        own, other = row.get("average"), row.get("other_images_average")
        drop = f"{own - other:+.1f}" if own is not None and other is not None else "–"
        ratio = (attention.get(name) or {}).get("mean_ratio")
        out.append(
            f"| {name} | {_avg(row, 'average')} | {_avg(row, 'other_images_average')} | "
            f"{drop} | {'–' if ratio is None else f'{ratio:.2f}'} |"
        )
    return [*out, ""]


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
