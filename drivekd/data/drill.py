"""Option-lookup drill: text-only items that teach a language model to answer multiple choice.

Every multiple-choice answer here starts with a letter, and choosing it is an in-context lookup:
find the option that says what you know, copy its letter. A language model trained from random
initialisation (the tiny presets) learns the rest of a driving answer long before it learns that
step, so its letters stay at chance whatever it knows (docs/teacher-study.md, "QA SFT from the grounded teacher").
These items isolate the step: the question quotes the right option's text, the answer is
`Final: {X. text}`. On DriveSim-QA the 12M teacher learns them in ~3,000 steps at lr 3e-4 (not at
1e-3); real pretrained teachers arrive with the skill and need no drill.
"""

from __future__ import annotations

from collections.abc import Iterable

from drivekd.data.choices import mc_question
from drivekd.data.sample import Sample


def option_lookup(samples: Iterable[Sample]) -> list[Sample]:
    """One lookup item per multiple-choice sample (others are skipped); no images."""
    out = []
    for s in samples:
        if not s.choices or s.correct_choice not in s.choices:
            continue
        letter, text = s.correct_choice, s.choices[s.correct_choice]
        out.append(
            Sample(
                id=f"{s.id}-lookup",
                capability=s.capability,
                question_type=s.question_type,
                images=[],
                question=mc_question(f'Which option says "{text}"?', s.choices),
                answer=f"Final: {{{letter}. {text}}}",
                scene_id=s.scene_id,
                choices=dict(s.choices),
                correct_choice=letter,
            )
        )
    return out
