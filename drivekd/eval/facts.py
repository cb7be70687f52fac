"""Field checks: an open-ended answer scored against the sample's `facts` (`fact_score`).

Apart from `scoring`, which reads files and aggregates: these are the rules for reading one answer
(fields, `Final:` lines, object tags), one checker per fact name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from drivekd.errors import DataError
from drivekd.eval.parsing import after_final, parse_field, parse_final_set, parse_set

FACT_CHECKS: tuple[str, ...] = ("safe_actions", "collision_actions", "count", "action", "lane", "attribute", "object")
OBJECT_TOLERANCE = 0.05

_INT = re.compile(r"(?<![\w.])(-?\d+)(?!\w|\.\d)")
_TAG = re.compile(r"<\s*c?\d+\s*,\s*([A-Za-z_]+)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*>")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def _upper_set(items: Sequence[Any]) -> set[str]:
    return {str(i).strip().upper() for i in items}


def _f1(predicted: list[str] | None, gold: Any) -> float:
    if not isinstance(gold, list | tuple):
        raise TypeError("expected a list of actions")
    if predicted is None:
        return 0.0
    p, g = _upper_set(predicted), _upper_set(gold)
    if not p and not g:
        return 100.0  # both say "none"
    hit = len(p & g)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p), hit / len(g)
    return 100.0 * 2 * precision * recall / (precision + recall)


def _set_answer(prediction: str, label: str) -> list[str] | None:
    final = parse_final_set(prediction)
    if final is not None:
        return final
    line = parse_field(prediction, label)
    return None if line is None else parse_set(line)


def _final_line(prediction: str) -> str | None:
    after = after_final(prediction)
    if after is None:
        return None
    line = after.strip().split("\n", 1)[0].strip()
    if line.startswith("{"):
        line = line[1:].split("}", 1)[0]
    return line


def _first_int(text: str | None) -> int | None:
    m = _INT.search(text or "")
    return int(m.group(1)) if m else None


def _word(text: str | None) -> str:
    return _NON_WORD.sub(" ", (text or "").lower()).strip()


def _tag(text: str | None) -> tuple[str, float, float] | None:
    m = _TAG.search(text or "")
    if not m:
        return None
    x, y = float(m.group(2)), float(m.group(3))
    return (m.group(1).upper(), x, y) if math.isfinite(x) and math.isfinite(y) else None


def _check_safe(prediction: str, gold: Any) -> tuple[float, str | None]:
    got = _set_answer(prediction, "Safe")
    return _f1(got, gold), None if got is None else ",".join(got)


def _check_collision(prediction: str, gold: Any) -> tuple[float, str | None]:
    got = _set_answer(prediction, "Self-vehicle action")
    return _f1(got, gold), None if got is None else ",".join(got)


def _check_count(prediction: str, gold: Any) -> tuple[float, str | None]:
    if isinstance(gold, bool) or not isinstance(gold, int | str):
        raise TypeError("expected an integer")
    want = int(gold)
    final = _final_line(prediction)
    got = _first_int(final) if final is not None else None
    if got is None:
        got = _first_int(prediction)
    return (100.0 if got == want else 0.0), None if got is None else str(got)


def _check_action(prediction: str, gold: Any) -> tuple[float, str | None]:
    said = parse_field(prediction, "Action")
    if said is None:
        said = _final_line(prediction)
    items = parse_set(said) if said is not None else []
    got = items[0].upper() if len(items) == 1 else None
    return (100.0 if got == str(gold).strip().upper() else 0.0), got


def _check_lane(prediction: str, gold: Any) -> tuple[float, str | None]:
    said = parse_field(prediction, "Lane")
    if said is None:
        said = _final_line(prediction)
    got = _word(said) if said is not None else None
    return (100.0 if got and got == _word(str(gold)) else 0.0), got


def _check_attribute(prediction: str, gold: Any) -> tuple[float, str | None]:
    said = _final_line(prediction)
    if said is None:
        said = prediction.strip().splitlines()[0] if prediction.strip() else ""
    got = _word(said)
    return (100.0 if got and got == _word(str(gold)) else 0.0), got or None


def _check_object(prediction: str, gold: Any) -> tuple[float, str | None]:
    want = _tag(gold) if isinstance(gold, str) else None
    if want is None:
        raise ValueError("expected an object tag like <c1,CAM_FRONT,0.5,0.5>")
    got = _tag(_final_line(prediction)) or _tag(prediction)
    if got is None:
        return 0.0, None
    close = (
        got[0] == want[0] and abs(got[1] - want[1]) <= OBJECT_TOLERANCE and abs(got[2] - want[2]) <= OBJECT_TOLERANCE
    )
    return (100.0 if close else 0.0), f"<{got[0]},{got[1]},{got[2]}>"


_CHECKS: dict[str, Callable[[str, Any], tuple[float, str | None]]] = {
    "safe_actions": _check_safe,
    "collision_actions": _check_collision,
    "count": _check_count,
    "action": _check_action,
    "lane": _check_lane,
    "attribute": _check_attribute,
    "object": _check_object,
}


def fact_score(prediction: str, facts: dict[str, Any]) -> tuple[str, float, str | None] | None:
    """(fact name, score 0..100, what was read) from the first of `FACT_CHECKS` in `facts`; None if none applies."""
    for name in FACT_CHECKS:
        if facts.get(name) is not None:
            try:
                score, parsed = _CHECKS[name](prediction, facts[name])
            except (TypeError, ValueError) as e:
                # Unusable ground truth (e.g. a non-numeric count) is a data problem, not a model miss.
                raise DataError(f"fact {name!r} has an unusable value {facts[name]!r}: {e}") from None
            return name, score, parsed
    return None
