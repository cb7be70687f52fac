"""What multiple choice scored as text would hide: every answer given with a wrong letter.

    python experiments/mc_as_text.py runs/quick/data/test.jsonl

Takes the multiple-choice items of a native JSONL split, writes each reference answer with its
letter replaced by another option's (`Final: {D. In the same lane ...}` -> `Final: {A. In the same
lane ...}`, the text kept) and scores these answers twice with `drivekd score`'s rules
(`drivekd.eval.scoring`): by letter, as drivekd does, and as open-ended text (the item's options,
letter and facts left out, so the mean of sentence BLEU-4, ROUGE-L and CIDEr-D decides). Prints the
Avg of each.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def wrong_letter(answer: str, choices: dict[str, str], correct: str) -> str | None:
    """`answer` with its correct letter replaced by the next option's letter; None when the letter
    cannot be found in the answer as `{X.`, `X.` at the start, or `(X)`."""
    letters = sorted(choices)
    other = letters[(letters.index(correct) + 1) % len(letters)]
    for pattern in (rf"\{{{correct}\.", rf"^{correct}\.", rf"\({correct}\)"):
        m = re.search(pattern, answer, flags=re.MULTILINE)
        if m:
            return answer[: m.start()] + m.group(0).replace(correct, other) + answer[m.end() :]
    return None


def predictions(rows: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """(scored by letter, scored as text) predictions of every multiple-choice row with a findable letter."""
    from drivekd.eval.scoring import Prediction

    by_letter, as_text = [], []
    for r in rows:
        if not r.get("choices") or not r.get("correct_choice"):
            continue
        wrong = wrong_letter(r["answer"], r["choices"], r["correct_choice"])
        if wrong is None:
            continue
        common = {"id": r["id"], "capability": r["capability"], "question_type": r["question_type"]}
        by_letter.append(
            Prediction(
                **common,
                prediction=wrong,
                reference=r["answer"],
                choices=r["choices"],
                correct_choice=r["correct_choice"],
            )
        )
        as_text.append(Prediction(**common, prediction=wrong, reference=r["answer"]))
    return by_letter, as_text


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a native JSONL split (e.g. runs/quick/data/test.jsonl)")
    args = parser.parse_args(argv)
    from drivekd.eval.scoring import score_items, summarize

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    by_letter, as_text = predictions(rows)
    if not by_letter:
        raise SystemExit(f"{args.data}: no multiple-choice item with a letter in its answer")
    out = {
        "items": len(by_letter),
        "by letter": summarize("by letter", score_items(by_letter))["average"],
        "as text": summarize("as text", score_items(as_text))["average"],
    }
    print(
        f"{out['items']} multiple-choice items, every answer with a wrong letter: Avg {out['by letter']} "
        f"scored by letter, {out['as text']} scored as text"
    )
    return out


if __name__ == "__main__":
    main()
