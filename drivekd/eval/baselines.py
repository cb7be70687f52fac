"""Constant-answer baselines, scored like any model: what a model that ignores the input achieves.

`majority`: per question type, the answer most often correct in the training split. For multiple
choice that is the most common correct option text when the sample offers it, else the most common
correct letter; for open-ended questions, the most common reference answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from drivekd.data.sample import Sample
from drivekd.eval.scoring import normalize_question_type


def majority_predictions(train: Sequence[Sample], samples: Sequence[Sample]) -> list[str]:
    """One constant answer per question type (grouped as the scorer groups them), per sample."""
    texts: dict[str, Counter[str]] = {}
    letters: dict[str, Counter[str]] = {}
    answers: dict[str, Counter[str]] = {}
    for s in train:
        qt = normalize_question_type(s.question_type)
        if s.choices and s.correct_choice:
            texts.setdefault(qt, Counter())[s.choices[s.correct_choice]] += 1
            letters.setdefault(qt, Counter())[s.correct_choice] += 1
        else:
            answers.setdefault(qt, Counter())[s.answer] += 1
    out = []
    for s in samples:
        qt = normalize_question_type(s.question_type)
        if s.choices:
            offered = {text: letter for letter, text in s.choices.items()}
            ranked = [t for t, _ in texts.get(qt, Counter()).most_common() if t in offered]
            if ranked and texts[qt][ranked[0]] > 1:
                letter = offered[ranked[0]]
            else:
                common = letters.get(qt, Counter({"A": 1})).most_common(1)[0][0]
                letter = common if common in s.choices else sorted(s.choices)[0]
            out.append(f"Final: {{{letter}. {s.choices[letter]}}}")
        else:
            common = answers.get(qt, Counter({"": 1})).most_common(1)[0][0]
            out.append(common)
    return out


def majority_records(train: Sequence[Sample], samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The majority baseline as prediction records (what `drivekd score` reads)."""
    from drivekd.eval.predict import prediction_record

    return [prediction_record(s, p) for s, p in zip(samples, majority_predictions(train, samples), strict=True)]
