"""Read what a model committed to: a multiple-choice letter, a `Final: {...}` set, a labelled field.

Every function here takes arbitrary model output and returns None rather than raising: a model that
writes nonsense loses the point, it does not stop the evaluation.
"""

from __future__ import annotations

import re

# The last `Final:` wins: models sometimes restate a draft answer before the final one. No two
# unbounded whitespace runs are adjacent in these patterns, so long blank runs cannot make them quadratic.
_FINAL = re.compile(r"final(?:\s+answer)?\s*[:：]", re.IGNORECASE)
# A letter is a letter only when something marks it as one: `C.`, `C)`, `(C)`, `{C}`, `C:` or
# the end of the text. A bare capital followed by a space is the article in "A car is ahead".
_MARKED_LETTER = re.compile(r"^[\s{\[\"'*]*(?P<open>\()?(?P<letter>[A-Za-z])(?P<mark>\s*[.):}\]]|\s*$)")
_ANSWER_IS = re.compile(
    r"\b(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?(?:\s*[:：])?\s*"
    r"(?P<open>[{\[(\"'*]*)(?P<letter>[A-Za-z])(?![A-Za-z])(?P<next>\s+[a-z])?"
)
_NON_WORD = re.compile(r"[^a-z0-9]+")
_SET_SPLIT = re.compile(r"\s*(?:[,;/|]|\band\b|\s)\s*", re.IGNORECASE)
_STRIP = " \t\r\n.,;:!?\"'`*[](){}<>"


def _normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def after_final(text: str) -> str | None:
    """The text after the last `Final:` marker, or None when there is none."""
    if not isinstance(text, str):
        return None
    last = None
    for m in _FINAL.finditer(text):
        last = m
    return text[last.end() :] if last else None


def _letter_in(letter: str | None, choices: dict[str, str]) -> str | None:
    if letter is None:
        return None
    for key in (letter, letter.upper(), letter.lower()):
        if key in choices:
            return key
    return None


def _marked_letter(text: str, choices: dict[str, str], *, lowercase_ok: bool) -> str | None:
    m = _MARKED_LETTER.match(text)
    if not m:
        return None
    letter = m["letter"]
    if letter.islower() and not (lowercase_ok or m["open"] or m["mark"].strip() == ")"):
        return None
    return _letter_in(letter, choices)


def _option_text(text: str, choices: dict[str, str]) -> str | None:
    """The one choice whose text equals `text`, ignoring case and punctuation (and a leading letter)."""
    said = _normalise(text)
    if not said:
        return None
    hits = {k for k, v in choices.items() if _normalise(str(v)) == said}
    if not hits:
        # "Final: C Turn right" (a letter without its dot, then the text) is still option C.
        hits = {k for k, v in choices.items() if _normalise(f"{k} {v}") == said}
    return hits.pop() if len(hits) == 1 else None


def parse_choice(prediction: str, choices: dict[str, str], *, loose: bool = True) -> str | None:
    """The letter of `choices` that `prediction` commits to, or None.

    Tried in order, the first hit inside `choices` wins: the text after the last `Final:` (a marked
    letter such as `{C. ...}`, `C. ...`, `(c)`, `C`, or one option's text); a marked letter at the
    start (`B. There is a car ahead.`, `(d)`, `C`); `Answer: A` / `the answer is (B)` / `option C`;
    the whole prediction equal to one option's text. With `loose` (model answers, not references),
    then what a sentence states: a parenthesised letter, a letter followed by its own option text
    (`I pick B. Turn left`), else one option's text not negated (`... so it will turn left`); two
    different options stated is None. A sentence-initial article ("A car is ahead") or a lower-case
    "a" is never option A.
    """
    if not isinstance(prediction, str) or not isinstance(choices, dict) or not choices:
        return None
    text = prediction.strip()
    final = after_final(text)
    if final is not None:
        first_line = final.strip().split("\n", 1)[0]
        hit = _marked_letter(first_line, choices, lowercase_ok=True) or _option_text(first_line, choices)
        if hit:
            return hit
    hit = _marked_letter(text, choices, lowercase_ok=len(text) <= 3)
    if hit:
        return hit
    for m in _ANSWER_IS.finditer(text):
        letter, bracketed = m["letter"], bool(m["open"])
        # "the answer is a car" / "Answer: A car ahead": an article, not option A.
        if not bracketed and (letter.islower() or (letter == "A" and m["next"])):
            continue
        hit = _letter_in(letter, choices)
        if hit:
            return hit
    hit = _option_text(text, choices)
    if hit or not loose:
        return hit
    return _stated_option(text, choices)


_NEGATIONS = {"not", "no", "never", "neither", "nor", "t", "without"}  # "t": the tail of "isn't", "won't"
# A letter standing for an option inside a sentence: upper-case, not glued to a word, optionally
# bracketed or followed by `.`, `)` or `:`.
_LETTER_IN_SENTENCE = re.compile(r"(?<![A-Za-z0-9])(?P<open>\()?(?P<letter>[A-H])(?P<mark>[.):])?(?![A-Za-z0-9])")


def _negated(said: str, start: int) -> bool:
    """Is the phrase at `start` of the normalised text negated by one of the 3 words before it?"""
    return bool(_NEGATIONS & set(said[max(0, start - 60) : start].split()[-3:]))  # a window: stays linear


def _spans(pattern: str, said: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(rf"(?<![a-z0-9]){pattern}(?![a-z0-9])", said)]


def _stated_option(text: str, choices: dict[str, str]) -> str | None:
    """The one option a sentence states (see `parse_choice`); None when none or several are."""
    texts = {k: _normalise(str(v)) for k, v in choices.items()}
    texts = {k: v for k, v in texts.items() if v}
    stated: set[str] = set()
    for m in _LETTER_IN_SENTENCE.finditer(text):
        letter = _letter_in(m["letter"], choices)
        if letter is None:
            continue
        if m["open"] and m["mark"] == ")":
            stated.add(letter)  # "(B)" anywhere
            continue
        before = text[max(0, m.start() - 80) : m.start()].rstrip()  # bounded windows: linear in the text
        article = m["letter"] == "A" and not m["mark"] and (not before or before[-1] in ".!?:")
        after = text[m.end() : m.end() + 3 * len(texts.get(letter, "")) + 40]
        if not article and letter in texts and _normalise(after).startswith(texts[letter]):
            stated.add(letter)  # "B. Turn left" / "B turn left" inside a sentence
    if stated:
        return stated.pop() if len(stated) == 1 else None
    said = _normalise(text)
    found = {k: [(a, b) for a, b in _spans(re.escape(v), said) if not _negated(said, a)] for k, v in texts.items()}
    found = {k: spans for k, spans in found.items() if spans}
    # a text inside a longer stated option's text ("left" in "turn left") is not stated on its own
    inside = {
        k
        for k, spans in found.items()
        if all(
            any(o != k and a <= s and e <= b and (b - a) > (e - s) for o, others in found.items() for a, b in others)
            for s, e in spans
        )
    }
    stated = set(found) - inside
    return stated.pop() if len(stated) == 1 else None


def letter_matches_text(prediction: str, choices: dict[str, str]) -> bool | None:
    """Does the option text a committed answer writes after its letter (`Final: {D. Black.}`) belong
    to that letter? True / False when the text is one of the options, None when the answer writes
    no letter, no text or free text.

    A model that picks letters without looking them up in the options writes `D. Black.` where D
    is White: its letter is chance even when its text is right.
    """
    if not isinstance(prediction, str) or not isinstance(choices, dict) or not choices:
        return None
    final = after_final(prediction.strip())
    line = (final if final is not None else prediction).strip().split("\n", 1)[0]
    m = _MARKED_LETTER.match(line)
    letter = _letter_in(m["letter"], choices) if m else None
    if letter is None or not m["mark"].strip():
        return None
    said = _option_text(line[m.end() :], choices)
    return None if said is None else said == letter


def parse_final_set(text: str) -> list[str] | None:
    """`Final: {IDLE, SLOWER}` -> ["IDLE", "SLOWER"]; `Final: {none}` -> []; no `Final:` -> None.

    Items keep their spelling (callers compare case-insensitively); braces are optional, in which
    case the set runs to the end of the line.
    """
    if not isinstance(text, str):
        return None
    after = after_final(text)
    if after is None:
        return None
    body = after.lstrip()
    if body.startswith("{"):
        end = body.find("}")
        body = body[1:end] if end >= 0 else body[1:].split("\n", 1)[0]
    else:
        body = body.split("\n", 1)[0]
    return parse_set(body)


def parse_set(text: str) -> list[str]:
    """`IDLE, SLOWER` / `LANE_LEFT and FASTER` -> the items; `none` -> []."""
    items = [item.strip(_STRIP) for item in _SET_SPLIT.split(text)]
    items = [item for item in items if item]
    if len(items) == 1 and items[0].lower() in ("none", "nothing", "empty"):
        return []
    return items


def parse_field(text: str, name: str) -> str | None:
    """The value of the first labelled line `NAME: value` (case-insensitive, `- ` bullets allowed), or None."""
    if not isinstance(text, str) or not isinstance(name, str) or not name:
        return None
    pattern = re.compile(
        rf"^[ \t]*(?:[-*•][ \t]*)?{re.escape(name)}[ \t]*[:：][ \t]*(.*)$", re.IGNORECASE | re.MULTILINE
    )
    m = pattern.search(text)
    return m.group(1).strip() if m else None
