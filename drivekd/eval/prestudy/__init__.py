"""The Drive-KD pre-study (docs/method.md §6, paper Fig. 2): which layer and signal carries each capability.

Four layer-wise analyses of one model on driving data (and a general control set), then fixed
rules that turn them into a recipe (`recipe.yaml`, the schema of `drivekd/distill/recipes/`):

(a) adjacent-layer cosine of hidden states, and within-layer vision-text cosine;
(b) capability-wise intra-group similarity of per-sample representations;
(c) dispersion `1 - cos` across samples of hidden states vs text->vision attention profiles;
(d) position-normalised generalised margin along the answer (logit lens at every layer).

`metrics` holds the pure functions over tensors (tested against explicit loops); `collection` runs
the model batch by batch and reduces per-sample statistics to per-layer curves; `rules` turns the
curves into a recipe; `run` writes `prestudy.json`, `prestudy.png` (drawn by `plot`) and `recipe.yaml`.
The exact formulas are in `collection.DEFINITIONS` and `rules.RULES` (copied into the JSON) and in
docs/prestudy.md.
"""

from drivekd.eval.prestudy.run import run_prestudy, summary_markdown

__all__ = ["run_prestudy", "summary_markdown"]
