"""Score prediction files: multiple-choice accuracy, field checks against `facts`, language metrics.

A prediction file is JSONL, one object per line: `id`, `capability`, `question_type`, `prediction`,
`reference`, and optionally `choices` (letter -> text), `correct_choice`, `facts` and `question`.
Every sample gets a score in 0..100:

- multiple choice (`choices` and `correct_choice`): 100 if `parse_choice` finds the correct letter;
- open-ended with facts: the first of `FACT_CHECKS` present in `facts` decides (set F1, exact match,
  count, object tag within `OBJECT_TOLERANCE`); the checks are in `drivekd.eval.facts`;
- open-ended without facts: the mean of sentence BLEU-4, ROUGE-L x 100 and min(CIDEr-D, 10) x 10.
  CIDEr's idf comes from the references of the file's open-ended samples (it is a corpus measure: one
  sample alone scores 0), and capping at 10 puts the three on the same 0..100 scale.

A capability's score is the mean over its samples and `average` the mean of the capabilities present,
as the paper's Avg; `average_over` names those capabilities. An Avg over fewer than all three is not
comparable with one over all three: tables mark it `*` with a footnote (`render_markdown`). Question
types are grouped under `normalize_question_type`'s key and capabilities under
`normalize_capability`'s, so `Object Status`, `object-status` and `object_status` are one row.
Corpus BLEU-4 (0-100), mean ROUGE-L (x 100) and CIDEr-D (0-10, as coco-caption reports it) over all
open-ended samples are reported beside, under `language`.

Multiple choice also gets a letter-bias check (`letters`): how many answers use the model's most
used letter, and what the best constant letter would score on the same items. A tiny model often
answers every item with one letter; on a test set whose correct letters are uneven that alone can
look like +20 points, so read an MC score beside these two figures. A third,
`letter_matches_text`, is the share of answers writing a letter and an option's text
(`Final: {D. Black.}`) whose letter names that text: near chance, the model has not learned to
look its answer up among the options, and its letters are chance whatever it knows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivekd.data.sample import CAPABILITIES, normalize_capability
from drivekd.errors import DataError
from drivekd.eval import metrics
from drivekd.eval.facts import fact_score
from drivekd.eval.parsing import letter_matches_text, parse_choice

REQUIRED_FIELDS: tuple[str, ...] = ("id", "capability", "question_type", "prediction", "reference")

# DriveBench/DriveLM name their question types after capabilities, in several spellings; one key each.
_QUESTION_TYPE_ALIASES: dict[str, str] = {
    "behaviour": "behavior",
    "behaviours": "behavior",
    "behaviors": "behavior",
    "perceptual": "perception",
    "perceive": "perception",
    "predict": "prediction",
    "predictions": "prediction",
    "plan": "planning",
}
_QT_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_question_type(name: str) -> str:
    """The one key a question type is grouped under in every table: lowercase, runs of spaces,
    hyphens and underscores as one `_`, DriveBench's spellings as one name (`Behaviour` -> `behavior`).
    Idempotent: a normalised name maps to itself."""
    key = _QT_SEPARATORS.sub("_", str(name).strip().lower()).strip("_")
    return _QUESTION_TYPE_ALIASES.get(key, key)


def average_over(capabilities: dict[str, float | None]) -> list[str]:
    """The capabilities an Avg is the mean of: those with a score, in `CAPABILITIES` order."""
    return [c for c in CAPABILITIES if capabilities.get(c) is not None]


@dataclass
class Prediction:
    """One line of a prediction file."""

    id: str
    capability: str
    question_type: str
    prediction: str
    reference: str
    choices: dict[str, str] | None = None
    correct_choice: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    question: str | None = None
    where: str = ""
    setting: str | None = None  # the robustness setting it was answered under (`fog:3`); None: clean inputs

    @property
    def is_choice(self) -> bool:
        return self.choices is not None and self.correct_choice is not None


@dataclass
class Language:
    """An open-ended sample's language metrics: BLEU statistics, ROUGE-L F (0-1), CIDEr-D (0-10)."""

    bleu_stats: list[int]
    rouge_l: float
    cider: float


@dataclass
class ItemScore:
    """How one sample was scored: `method` is `choice`, `facts:<name>` or `language`.

    `language` is set for every open-ended sample (also those scored by facts), for corpus metrics.
    """

    id: str
    capability: str
    question_type: str
    score: float
    method: str
    parsed: str | None = None
    language: Language | None = None
    expected: str | None = None  # the correct letter, for multiple choice
    letter_matches_text: bool | None = None  # multiple choice: see `parsing.letter_matches_text`


# ---------------------------------------------------------------- reading


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read a prediction JSONL file; DataError names the file, line and field of the first problem."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    out: list[Prediction] = []
    seen: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{e.colno}: malformed JSON: {e.msg}") from e
        pred = _prediction(item, where)
        if pred.id in seen:
            raise DataError(f"{where}: duplicate id {pred.id!r} (also at {seen[pred.id]})")
        seen[pred.id] = where
        out.append(pred)
    if not out:
        # Scored, it would show "–" everywhere and exit 0: a failed or filtered-out run looking like a result.
        raise DataError(f"{file}: no predictions (the file is empty); expected one JSON object per line")
    settings = sorted({str(p.setting) for p in out})
    if len(settings) > 1:
        counts = ", ".join(
            f"{sum(str(p.setting) == s for p in out)} {'clean' if s == 'None' else repr(s)}" for s in settings
        )
        raise DataError(
            f"{file}: answers under different input settings in one file ({counts}); score each setting apart"
        )
    return out


def file_setting(preds: Sequence[Prediction]) -> str | None:
    """The input setting a file's answers were made under (read_predictions makes them agree)."""
    return preds[0].setting if preds else None


def _prediction(item: Any, where: str) -> Prediction:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in item:
            raise DataError(f"{where}: missing required field {key!r}")
    if not isinstance(item["id"], str | int) or isinstance(item["id"], bool):
        raise DataError(f"{where}: field 'id' must be a string or integer")
    # A model that produced nothing (null) simply scores 0; a missing or non-text reference is a data bug.
    prediction = "" if item["prediction"] is None else item["prediction"]
    for key, value in (
        ("prediction", prediction),
        ("reference", item["reference"]),
        ("question_type", item["question_type"]),
    ):
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not isinstance(item["capability"], str):
        raise DataError(f"{where}: field 'capability' must be a string, got {type(item['capability']).__name__}")
    question_type = normalize_question_type(item["question_type"])
    if not question_type:
        raise DataError(f"{where}: field 'question_type' is empty")
    choices = item.get("choices")
    if choices is not None and not (
        isinstance(choices, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
    ):
        raise DataError(f"{where}: field 'choices' must map letters to option texts")
    choices = choices or None  # {} offers nothing to choose from
    correct = item.get("correct_choice")
    if correct is not None and (not isinstance(correct, str) or (choices is not None and correct not in choices)):
        raise DataError(
            f"{where}: field 'correct_choice' {correct!r} is not one of the choices {sorted(choices or {})}"
        )
    if choices is not None and correct is None:
        # The reference states the letter (`Final: {B. Turn left.}`): read it with the models' parser.
        # strict: a reference's letter is marked (`Final: {B. ...}`, `B.`, `Answer: B`) or it is an option's text
        correct = parse_choice(item["reference"], choices, loose=False) if isinstance(item["reference"], str) else None
        if correct is None:
            raise DataError(
                f"{where}: has 'choices' but no 'correct_choice', and its reference names no option "
                f"({str(item['reference'])[:60]!r}); add correct_choice or drop choices"
            )
    facts = item.get("facts") or {}
    if not isinstance(facts, dict):
        raise DataError(f"{where}: field 'facts' must be a JSON object")
    question = item.get("question")
    setting = item.get("setting")
    if setting is not None and (not isinstance(setting, str) or not setting):
        raise DataError(f"{where}: field 'setting' must be a non-empty string (e.g. 'fog:3'), got {setting!r}")
    return Prediction(
        id=str(item["id"]),
        capability=normalize_capability(item["capability"], where=f"{where}: field 'capability'"),
        question_type=question_type,
        prediction=prediction,
        reference=item["reference"],
        choices=choices,
        correct_choice=correct,
        facts=facts,
        question=question if isinstance(question, str) else None,
        where=where,
        setting=setting,
    )


# ---------------------------------------------------------------- scoring


def score_items(preds: Sequence[Prediction]) -> list[ItemScore]:
    """Score every sample (see the module docstring for the rules)."""
    open_ended = [p for p in preds if not p.is_choice]
    _, ciders = metrics.cider_d([p.prediction for p in open_ended], [[p.reference] for p in open_ended])
    cider_of = {id(p): c for p, c in zip(open_ended, ciders, strict=True)}
    out = []
    for p in preds:
        if p.is_choice:
            assert p.choices is not None
            letter = parse_choice(p.prediction, p.choices)
            score = 100.0 if letter == p.correct_choice else 0.0
            agrees = letter_matches_text(p.prediction, p.choices)
            out.append(
                ItemScore(
                    p.id,
                    p.capability,
                    p.question_type,
                    score,
                    "choice",
                    letter,
                    expected=p.correct_choice,
                    letter_matches_text=agrees,
                )
            )
            continue
        language = Language(
            metrics.bleu_stats(p.prediction, [p.reference]), metrics.rouge_l(p.prediction, p.reference), cider_of[id(p)]
        )
        try:
            checked = fact_score(p.prediction, p.facts)
        except DataError as e:
            raise DataError(f"{p.where}: {e}") from None
        if checked is not None:
            name, score, parsed = checked
            out.append(ItemScore(p.id, p.capability, p.question_type, score, f"facts:{name}", parsed, language))
            continue
        bleu = metrics.bleu_from_stats(language.bleu_stats, effective_order=True)  # = sacrebleu sentence BLEU
        score = (bleu + 100.0 * language.rouge_l + 10.0 * min(language.cider, 10.0)) / 3
        out.append(ItemScore(p.id, p.capability, p.question_type, score, "language", None, language))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def letter_bias(items: Sequence[ItemScore]) -> dict[str, Any] | None:
    """Multiple-choice letter use, in %: `top_letter_share` of answers with the most used letter
    (per question type, pooled), `best_constant_letter` the accuracy of always answering the letter
    most often correct (per question type, pooled). None without multiple choice."""
    groups: dict[str, list[ItemScore]] = {}
    for i in items:
        if i.method == "choice":
            groups.setdefault(normalize_question_type(i.question_type), []).append(i)
    if not groups:
        return None
    top = sum(max(Counter(i.parsed for i in g if i.parsed).values(), default=0) for g in groups.values())
    constant = sum(max(Counter(i.expected for i in g).values()) for g in groups.values())
    n = sum(len(g) for g in groups.values())
    checked = [i.letter_matches_text for g in groups.values() for i in g if i.letter_matches_text is not None]
    return {
        "top_letter_share": _r(100.0 * top / n),
        "best_constant_letter": _r(100.0 * constant / n),
        "letter_matches_text": _r(100.0 * sum(checked) / len(checked)) if checked else None,
    }


def summarize(file: str, items: Sequence[ItemScore], setting: str | None = None) -> dict[str, Any]:
    """The per-file result: see `score_file`."""
    groups: dict[tuple[str, str], list[ItemScore]] = {}
    for i in items:
        cap = normalize_capability(i.capability, where=f"{file}: item {i.id!r}")
        groups.setdefault((cap, normalize_question_type(i.question_type)), []).append(i)
    caps = {c: _r(_mean([i.score for (cap, _), g in groups.items() if cap == c for i in g])) for c in CAPABILITIES}
    over = average_over(caps)
    qt_caps: dict[str, set[str]] = {}
    for cap, qt in groups:
        qt_caps.setdefault(qt, set()).add(cap)
    by_qt = {}
    for (cap, qt), group in sorted(groups.items(), key=lambda kv: (CAPABILITIES.index(kv[0][0]), kv[0][1])):
        # A question type used under two capabilities is kept apart rather than silently merged.
        key = qt if len(qt_caps[qt]) == 1 else f"{cap}/{qt}"
        by_qt[key] = {"capability": cap, "samples": len(group), "score": _r(_mean([i.score for i in group]))}
        bias = letter_bias(group)
        if bias:
            by_qt[key]["letters"] = bias
    langs = [i.language for i in items if i.language is not None]
    if langs:
        summed = [sum(column) for column in zip(*(lang.bleu_stats for lang in langs), strict=True)]
        language = {
            "bleu4": _r(metrics.bleu_from_stats(summed)),
            "rougeL": _r(100.0 * sum(lang.rouge_l for lang in langs) / len(langs)),
            "cider": _r(sum(lang.cider for lang in langs) / len(langs)),
        }
    else:
        language = {"bleu4": None, "rougeL": None, "cider": None}
    return {
        "file": file,
        "setting": setting,
        "samples": len(items),
        "capabilities": caps,
        "average": _r(_mean([caps[c] for c in over])),  # type: ignore[misc]
        "average_over": over,
        "by_question_type": by_qt,
        "language": language,
        "unparseable": sum(1 for i in items if i.method == "choice" and i.parsed is None),
        "letters": letter_bias(items),
    }


def score_file(path: str | Path) -> dict[str, Any]:
    """Score one prediction file.

    Returns `{"file", "samples", "capabilities": {"perception", "reasoning", "planning"}, "average",
    "average_over": [the capabilities Avg is the mean of], "by_question_type": {qt: {"capability", "samples", "score"}}, "language": {"bleu4", "rougeL",
    "cider"}, "unparseable", "letters"}` (`letters` also per MC question type: see `letter_bias`);
    scores are 0..100 (CIDEr 0..10), None where there is nothing to score. Question types are the
    keys of `normalize_question_type`. An empty file is a DataError, as any other unusable input.
    """
    preds = read_predictions(path)
    return summarize(str(path), score_items(preds), file_setting(preds))


# ---------------------------------------------------------------- markdown


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _column_names(results: Sequence[dict[str, Any]]) -> list[str]:
    stems = [Path(r["file"]).stem for r in results]
    # Same stem in two folders (runs/a/test.jsonl, runs/b/test.jsonl): show the paths instead.
    names = [s if stems.count(s) == 1 else r["file"] for s, r in zip(stems, results, strict=True)]
    # answers to corrupted or image-less inputs say so in their column, whatever the file is called
    return [n if r.get("setting") is None else f"{n} [{r['setting']}]" for n, r in zip(names, results, strict=True)]


def render_markdown(results: Sequence[dict[str, Any]]) -> str:
    """One table, a column per file: capabilities and Avg, each question type, counts and language metrics, judge."""
    names = _column_names(results)
    rows: list[tuple[str, list[Any]]] = []
    for cap in CAPABILITIES:
        rows.append((f"**{cap.capitalize()}**", [r["capabilities"][cap] for r in results]))
    rows.append(("**Avg**", [_avg_cell(r) for r in results]))
    qts: dict[str, str] = {}
    for r in results:
        for qt, v in r["by_question_type"].items():
            qts.setdefault(qt, v["capability"])
    for qt, cap in sorted(qts.items(), key=lambda kv: (CAPABILITIES.index(kv[1]), kv[0])):
        rows.append((f"{cap} · {qt}", [(r["by_question_type"].get(qt) or {}).get("score") for r in results]))
    rows.append(("Samples", [r["samples"] for r in results]))
    rows.append(("BLEU-4", [r["language"]["bleu4"] for r in results]))
    rows.append(("ROUGE-L", [r["language"]["rougeL"] for r in results]))
    rows.append(("CIDEr", [r["language"]["cider"] for r in results]))
    rows.append(("MC unparseable", [r["unparseable"] for r in results]))
    rows.append(
        ("MC answers in the most used letter %", [(r.get("letters") or {}).get("top_letter_share") for r in results])
    )
    rows.append(("MC best constant letter %", [(r.get("letters") or {}).get("best_constant_letter") for r in results]))
    rows.append(
        (
            "MC letter names the option text written %",
            [(r.get("letters") or {}).get("letter_matches_text") for r in results],
        )
    )
    if any("judge" in r for r in results):
        for cap in CAPABILITIES:
            rows.append((f"Judge {cap}", [(r.get("judge") or {}).get("capabilities", {}).get(cap) for r in results]))
        rows.append(("Judge avg", [_avg_cell(r.get("judge")) for r in results]))
        rows.append(("Judge failed", [(r.get("judge") or {}).get("failed") for r in results]))
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(_cell(v) for v in values) + " |" for label, values in rows]
    named = list(zip(names, results, strict=True))
    notes = [
        note
        for note in (
            _partial_note("Avg", [(n, r) for n, r in named], ""),
            _partial_note("Judge avg", [(n, r.get("judge")) for n, r in named], "judged "),
        )
        if note
    ]
    return "\n".join([*lines, "", *notes] if notes else lines)


PARTIAL = "*"  # marks an Avg over fewer than the three capabilities


def _partial(result: dict[str, Any] | None) -> list[str] | None:
    """The capabilities a result's Avg lacks, or None when it has an Avg over all three (or none)."""
    if not result or result.get("average") is None:
        return None
    missing = [c for c in CAPABILITIES if c not in average_over(result.get("capabilities") or {})]
    return missing or None


def _avg_cell(result: dict[str, Any] | None) -> str:
    value = (result or {}).get("average")
    return _cell(value) + (PARTIAL if _partial(result) else "")


def _partial_note(label: str, columns: list[tuple[str, dict[str, Any] | None]], what: str) -> str | None:
    lacking = [f"{name} has no {what}{', '.join(m)}" for name, r in columns if (m := _partial(r))]
    if not lacking:
        return None
    return (
        f"{label}{PARTIAL} is the mean of fewer than the {len(CAPABILITIES)} capabilities, not comparable "
        f"with an Avg of all {len(CAPABILITIES)}: " + "; ".join(lacking) + "."
    )
