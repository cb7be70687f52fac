"""Multiple-choice options written inline in question text, as DriveBench and the reference data do."""

from __future__ import annotations

import re

_OPTION = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=:))\(?([A-H])[.)]\s+")
_FINAL = re.compile(r"Final\s*:\s*\{?\s*\(?([A-H])[.)}\s]", re.IGNORECASE)
_LEADING = re.compile(r"^\s*\(?([A-H])(?:[.)]|\s*$)")


def parse_inline_options(question: str) -> dict[str, str] | None:
    """`... options: A. Going ahead. B. Turn left.` -> {"A": "Going ahead.", "B": "Turn left."}.

    Options must run A, B, C, ... in order; anything else is not treated as multiple choice.
    """
    marks = []
    expected = "A"
    for m in _OPTION.finditer(question):
        if m.group(1) == expected:
            marks.append(m)
            expected = chr(ord(expected) + 1)
    if len(marks) < 2:
        return None
    options = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(question)
        options[m.group(1)] = question[m.end() : end].strip()
    return options


def answer_letter(answer: str) -> str | None:
    """The letter a reference answer commits to: `Final: {C. ...}`, `Final: C. ...`, `C. ...`, `C`."""
    m = _FINAL.search(answer + " ")
    if m:
        return m.group(1).upper()
    m = _LEADING.match(answer)
    return m.group(1).upper() if m else None
