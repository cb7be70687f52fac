"""Multiple-choice options written inline in question text, as DriveBench and the reference data do."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from drivekd.data.sample import Sample

_OPTION = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=:))\(?([A-H])[.)]\s+")
_FINAL = re.compile(r"Final\s*:\s*\{?\s*\(?([A-H])[.)}\s]", re.IGNORECASE)
_LEADING = re.compile(r"^\s*\(?([A-H])(?:[.)]|\s*$)")
_ANSWER_IS = re.compile(r"\b(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*\(?([A-H])(?:[.)]|\s*$)")


def _option_marks(question: str) -> list[re.Match[str]]:
    """Where the inline options `A.`, `B.`, ... start, in order (fewer than two: not multiple choice).

    The first option must open a line, a clause after `:` or a new sentence (`? A. ...`): letters
    inside a sentence ("at exit A. Then at exit B.", "object A) the car") are not options.
    """
    marks: list[re.Match[str]] = []
    expected = "A"
    for m in _OPTION.finditer(question):
        if m.group(1) != expected:
            continue
        before = question[: m.start()].rstrip(" \t")
        if expected == "A" and before and before[-1] not in ":?!.\n":
            continue
        marks.append(m)
        expected = chr(ord(expected) + 1)
    return marks if len(marks) >= 2 else []


def _option_spans(question: str) -> list[tuple[str, int, int]]:
    """(letter, start, end) of each option's text. With one option per line, the last option ends at
    its line's end, so an instruction after the options is not part of it."""
    marks = _option_marks(question)
    one_per_line = all(question[: m.start()].rstrip(" \t").endswith("\n") for m in marks[1:])
    spans = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(question)
        if i + 1 == len(marks) and one_per_line and "\n" in question[m.end() :]:
            end = question.index("\n", m.end())
        text = question[m.end() : end]
        spans.append((m.group(1), m.end(), m.end() + len(text.rstrip())))
    return spans


def format_options(choices: dict[str, str]) -> str:
    """{"A": "Going ahead.", "B": "Turn left."} -> `A. Going ahead. B. Turn left.` (inverse of `parse_inline_options`)."""
    return " ".join(f"{k}. {v}" for k, v in choices.items())


def mc_question(stem: str, choices: dict[str, str]) -> str:
    """A question with its options inline, in DriveBench's wording."""
    return f"{stem} Please select the correct answer from the following options: {format_options(choices)}"


def parse_inline_options(question: str) -> dict[str, str] | None:
    """`... options: A. Going ahead. B. Turn left.` -> {"A": "Going ahead.", "B": "Turn left."}.

    Options must run A, B, C, ... in order; anything else is not treated as multiple choice.
    """
    spans = _option_spans(question)
    return {letter: question[a:b].strip() for letter, a, b in spans} or None


def answer_letter(answer: str) -> str | None:
    """The letter a reference answer commits to: `Final: {C. ...}`, `Final: C. ...`, `C. ...`, `C`,
    `Answer: C`, `The answer is C.` (an upper-case letter, marked or ending the answer)."""
    m = _FINAL.search(answer + " ")
    if m:
        return m.group(1).upper()
    m = _LEADING.match(answer) or _ANSWER_IS.search(answer.strip())
    return m.group(1).upper() if m else None


def permute_choices(sample: Sample, order: Sequence[int]) -> Sample:
    """The same question with its options re-lettered: option `order[i]` becomes letter i.

    Letters of an answer are arbitrary; a model trained many epochs on fixed letters can memorise
    them per question instead of reading the options. Rewrites the inline options of the question,
    the answer's committed letter and `choices`/`correct_choice`. A sample whose question, choices
    and answer do not agree (options not inline, answer not `Final: {X. ...}`-style) is returned
    unchanged: it cannot be re-lettered safely.
    """
    if not sample.choices or not sample.correct_choice or len(order) != len(sample.choices):
        return sample
    inline = parse_inline_options(sample.question)
    letters = sorted(sample.choices)
    if inline != sample.choices or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return sample
    m = _FINAL.search(sample.answer + " ")
    if m is None or m.group(1) != sample.correct_choice:
        return sample
    texts = [sample.choices[k] for k in letters]
    new_choices = {letters[i]: texts[j] for i, j in enumerate(order)}
    new_letter = letters[list(order).index(letters.index(sample.correct_choice))]
    question = sample.question
    for letter, a, b in reversed(_option_spans(question)):  # in place: layout and trailing text stay
        question = question[:a] + new_choices[letter] + question[b:]
    answer = sample.answer[: m.start(1)] + new_letter + sample.answer[m.end(1) :]
    return dataclasses.replace(sample, question=question, answer=answer, choices=new_choices, correct_choice=new_letter)


def shuffle_choices(sample: Sample, key: Sequence[int]) -> Sample:
    """`permute_choices` with a permutation drawn from `key` (e.g. seed, epoch, sample index)."""
    if not sample.choices:
        return sample
    order = np.random.default_rng(list(key)).permutation(len(sample.choices))
    return permute_choices(sample, order.tolist())
