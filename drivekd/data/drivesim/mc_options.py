"""Multiple-choice options: drawing the distractors of deferred items, then writing their question and answer."""

from __future__ import annotations

import numpy as np

from drivekd.data.choices import mc_question
from drivekd.data.drivesim.scene_context import QA, Options


def _distinct_distractors(correct: str, distractors: list[str]) -> list[str]:
    return [d for d in dict.fromkeys(distractors) if d != correct]


def multiple_choice(
    rng: np.random.Generator,
    correct: str,
    distractors: list[str],
    n: int,
    answer_counts: dict[str, int] | None = None,
    position: int | None = None,
) -> tuple[dict[str, str], str]:
    """Shuffle the correct option among up to n-1 distractors; letters A, B, ... in shuffled order.

    With `answer_counts`, distractors are drawn in proportion to how often each is a correct answer
    (options that are never right are used only to fill up); otherwise uniformly. `position` puts
    the correct option at that index (the distractors stay shuffled) instead of a random one.
    """
    pool = _distinct_distractors(correct, distractors)
    k = min(n - 1, len(pool))
    weights = np.array([(answer_counts or {}).get(d, 0) for d in pool], dtype=float)
    if answer_counts is None or k == len(pool) or np.count_nonzero(weights) < k:
        ranked = rng.permutation(len(pool)).tolist()
        if answer_counts is not None:  # answers first, in random order, then fillers
            ranked.sort(key=lambda i: weights[i] == 0)
        picked = [pool[i] for i in ranked[:k]]
    else:
        picked = [pool[i] for i in rng.choice(len(pool), size=k, replace=False, p=weights / weights.sum())]
    options = [correct, *picked]
    options = [options[i] for i in rng.permutation(len(options))]
    if position is not None:
        options.remove(correct)
        options.insert(min(position, len(options)), correct)
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return dict(zip(letters, options, strict=True)), letters[options.index(correct)]


def option_count(o: Options) -> int:
    """How many options `multiple_choice` will offer for this item."""
    return 1 + min(o.n - 1, len(_distinct_distractors(o.correct, o.pool)))


def render_options(
    qa: QA, rng: np.random.Generator, answer_counts: dict[str, int] | None, position: int | None = None
) -> QA:
    """Draw the options of a deferred multiple-choice item and write its question and answer."""
    o = qa.options
    if o is None:
        return qa
    choices, letter = multiple_choice(rng, o.correct, o.pool, o.n, answer_counts, position)
    qa.question = mc_question(o.stem, choices)
    qa.answer = "\n".join([f"Final: {{{letter}. {o.correct}}}", *o.evidence])
    qa.choices, qa.correct_choice, qa.options = choices, letter, None
    if qa.facts["label"] is None:  # options unique to the item (object tags): the letter is the class
        qa.facts["label"] = letter
    return qa
