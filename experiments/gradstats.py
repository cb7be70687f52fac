"""Gradient and loss statistics of distillation runs, read from their `metrics.jsonl`.

    python experiments/gradstats.py runs/quick/runs/multi-agp/seed-0/metrics.jsonl
    python experiments/gradstats.py runs/NAME/runs/multi-agp/seed-*/metrics.jsonl --json

Reads only what `drivekd distill` (and so `drivekd reproduce`) logs every `train.log_every` steps
with a projection strategy (`sum` logs no gradients): each task's weighted loss (`ce`, one key per
signal), the cosine between every two task gradients (`cos/A~B`), the share of task-gradient pairs
with a negative dot product (`conflict_rate`) and the strategy's coefficients (`coef/NAME`).

Per run it prints:
- mean |cos| (and mean cos) between the CE gradient and each signal's, over the logged steps;
- the mean cos between every two signals;
- the mean conflict rate;
- each signal's loss as a multiple of the CE, on the first and the last logged step, and their sum;
- how many times CE and each signal fall from the first to the last logged step;
- the mean coefficient of each task.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

ANCHOR = "ce"


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The logged training steps of one metrics.jsonl: rows with the anchor's loss and gradient
    cosines (the step-0 row of loss weights and the validation rows are left out)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if ANCHOR in row and any(k.startswith("cos/") for k in row):
            rows.append(row)
    return rows


def _pair(key: str) -> tuple[str, str]:
    a, b = key.removeprefix("cos/").split("~")
    return a, b


def run_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one run's logged steps (see the module docstring)."""
    if not rows:
        raise ValueError("no logged training step with gradient cosines (a `sum` run logs none)")
    pairs = list(dict.fromkeys(k for r in rows for k in r if k.startswith("cos/")))  # in logged order
    signals = [b if a == ANCHOR else a for a, b in map(_pair, pairs) if ANCHOR in (a, b)]
    first, last = rows[0], rows[-1]

    def mean(key: str, f: Any = float) -> float:
        return statistics.fmean(f(r[key]) for r in rows if key in r)

    out: dict[str, Any] = {"steps": len(rows), "first_step": first.get("step"), "last_step": last.get("step")}
    out["abs_cos_ce"], out["cos_ce"], out["cos_signals"] = {}, {}, {}
    for key in pairs:
        a, b = _pair(key)
        if ANCHOR in (a, b):
            s = b if a == ANCHOR else a
            out["abs_cos_ce"][s] = mean(key, abs)
            out["cos_ce"][s] = mean(key)
        else:
            out["cos_signals"][f"{a}~{b}"] = mean(key)
    out["conflict_rate"] = mean("conflict_rate") if any("conflict_rate" in r for r in rows) else None
    out["ratio_first"] = {s: first[s] / first[ANCHOR] for s in signals if s in first}
    out["ratio_last"] = {s: last[s] / last[ANCHOR] for s in signals if s in last}
    out["sum_ratio_first"] = sum(out["ratio_first"].values())
    out["sum_ratio_last"] = sum(out["ratio_last"].values())
    out["fall"] = {n: first[n] / last[n] for n in [ANCHOR, *signals] if n in first and n in last and last[n] > 0}
    coefs = list(dict.fromkeys(k for r in rows for k in r if k.startswith("coef/")))
    out["coef"] = {k.removeprefix("coef/"): mean(k) for k in coefs}
    return out


def _fmt(values: dict[str, float], digits: int = 3) -> str:
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in values.items()) or "–"


def format_stats(name: str, stats: dict[str, Any]) -> str:
    lines = [f"{name}: {stats['steps']} logged steps ({stats['first_step']}–{stats['last_step']})"]
    lines.append(f"  mean |cos(CE, signal)|: {_fmt(stats['abs_cos_ce'])}")
    lines.append(f"  mean cos(CE, signal):   {_fmt(stats['cos_ce'])}")
    lines.append(f"  mean cos between signals: {_fmt(stats['cos_signals'])}")
    if stats["conflict_rate"] is not None:
        lines.append(f"  mean conflict rate: {stats['conflict_rate']:.3f}")
    lines.append(f"  signal / CE, first logged step: {_fmt(stats['ratio_first'])} (sum {stats['sum_ratio_first']:.3f})")
    lines.append(f"  signal / CE, last logged step:  {_fmt(stats['ratio_last'])} (sum {stats['sum_ratio_last']:.3f})")
    lines.append(f"  falls first → last (×): {_fmt(stats['fall'], 1)}")
    if stats["coef"]:
        lines.append(f"  mean coefficients: {_fmt(stats['coef'], 2)}")
    return "\n".join(lines)


def summarize(all_stats: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Over several runs: the range (min, max) of each signal's mean |cos| with CE, and of the mean
    conflict rate."""
    out: dict[str, list[float]] = {}
    for stats in all_stats.values():
        for s, v in stats["abs_cos_ce"].items():
            lo, hi = out.get(f"abs_cos_ce/{s}", [math.inf, -math.inf])
            out[f"abs_cos_ce/{s}"] = [min(lo, v), max(hi, v)]
        if stats["conflict_rate"] is not None:
            lo, hi = out.get("conflict_rate", [math.inf, -math.inf])
            out["conflict_rate"] = [min(lo, stats["conflict_rate"]), max(hi, stats["conflict_rate"])]
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files of distillation runs")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)
    all_stats = {str(p): run_stats(read_steps(p)) for p in args.metrics}
    if args.json:
        print(json.dumps(all_stats, indent=2))
    else:
        print("\n".join(format_stats(name, s) for name, s in all_stats.items()))
        if len(all_stats) > 1:
            ranges = summarize(all_stats)
            print("over the runs: " + ", ".join(f"{k} {lo:.3f}–{hi:.3f}" for k, (lo, hi) in ranges.items()))
    return all_stats


if __name__ == "__main__":
    main()
