"""Multi-teacher Drive-KD: a recipe's signals, teacher targets, mixing, and combined gradients.

The `Distiller` plugs into the generic `Trainer` as an objective (named losses: the weighted CE
anchor plus one weighted distillation loss per signal) and a backward (the gradient strategy). It
knows signals and teachers; it knows nothing of capabilities beyond the mixing matrix's rows.

A subclass may change how the losses are weighted during a run (`drivekd.experimental` does). Its
hooks: `loss_weights` (each loss's weight in the objective), `observe_gram` (the task gradients'
Gram matrix whenever the aggregator computes one), `set_weights`, `backward` and `before_step`
(extend them, calling the base), and `state_dict` / `load_state_dict`, which must carry the
subclass's own state so a resumed run continues bit-identically; `run_distill(..., distiller_class=)`
runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
from accelerate import Accelerator

from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.distill.aggregate import GradientAggregator
from drivekd.distill.recipe import ANCHOR, load_recipe, mixing_matrix
from drivekd.distill.signals import Internals, Positions, captured_layers
from drivekd.distill.teachers import CachedTeachers, LiveTeachers, TeacherSource
from drivekd.errors import DriveKDError
from drivekd.models.backend import Batch, VLMBackend, answer_cross_entropy, answer_positions
from drivekd.models.capture import capture, text_rows
from drivekd.train.config import DistillConfig


class Distiller:
    def __init__(self, config: DistillConfig, student: VLMBackend, train: Sequence[Sample]) -> None:
        self.config = config
        self.student = student
        self.signals = load_recipe(config.recipe)
        self.names = list(self.signals)
        missing = [n for n in self.names if config.teacher.of(n) is None]
        if missing:
            raise DriveKDError(f"signals {missing} have no teacher: set `teacher` (or `teacher.per_signal`)")
        self.teacher_of = {n: str(config.teacher.of(n)) for n in self.names}
        self.teachers: TeacherSource
        if config.teacher.cache and self.signals:
            self.teachers = CachedTeachers(
                config.teacher.cache, self.signals, self.teacher_of, student, train, config.teacher.dtype
            )
        else:
            self.teachers = LiveTeachers(
                self.signals,
                self.teacher_of,
                student,
                dtype=config.teacher.dtype,
                probe=train,
                placement=config.teacher.placement(),
            )
        self.bound = self.teachers.bound if self.signals else {}
        self.mixing = mixing_matrix(config.mixing, self.signals)
        self.projections = torch.nn.ModuleDict()
        for name, sig in self.signals.items():
            if sig.needs_hidden:
                t_width = self.teachers.width(name)
                s_width = student.hidden_size
                if t_width != s_width:
                    self.projections[name] = torch.nn.Linear(s_width, t_width, bias=False).to(student.device)
        # each signal's loss weight: set by `set_weights` once measured (distill/calibrate.py)
        self.weights: dict[str, float] = {}
        self._weak = WeakSignalWatch(self.names)
        self.aggregator = GradientAggregator(
            self.trainable,
            config.combine.strategy,
            anchor=ANCHOR,
            seed=config.train.seed,
            amortize_every=config.combine.amortize_every,
            project_per=config.combine.project_per,
            buffer_dtype=getattr(torch, config.combine.buffer_dtype) if config.combine.buffer_dtype else None,
            observe_gram=self.observe_gram,
            gram=config.combine.gram,
            modules=lambda: [self.student.model, self.projections],
        )

    def set_weights(self, weights: dict[str, float]) -> None:
        """Each signal's loss weight (explicit in the recipe, or calibrated from its share)."""
        if sorted(weights) != sorted(self.names):
            raise DriveKDError(f"loss weights for {sorted(weights)}, the recipe's signals are {sorted(self.names)}")
        self.weights = dict(weights)

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss in the objective, the CE anchor's included: `ce_weight` and the
        signals' set weights (a subclass may move them during the run)."""
        return {ANCHOR: self.config.ce_weight, **self.weights}

    def captured_student_layers(self) -> tuple[set[int], set[int]]:
        """Student layers whose whole maps, and whose text rows only, the signals read."""
        return captured_layers(self.bound.values(), "student")

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs to continue bit-identically: amortised coefficients and task
        gradients pending for a step-wise projection (a subclass adds its own)."""
        return {"names": [ANCHOR, *self.names], **self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["names"] != [ANCHOR, *self.names]:
            raise DriveKDError(
                f"the checkpoint was written with losses {state['names']}, this config has {[ANCHOR, *self.names]}; "
                "resume with the run's own recipe"
            )
        self.aggregator.load_state_dict(state)

    # ---- objective ---------------------------------------------------------------------------
    def validation_objective(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Validation: plain (unweighted) CE, so runs with any weighting compare; signal losses as trained."""
        return self.objective(model, batch, plain_ce=True)

    def objective(
        self, model: torch.nn.Module, batch: Batch, *, plain_ce: bool = False, unit_weights: bool = False
    ) -> dict[str, torch.Tensor]:
        """Named losses of one batch: the CE anchor (weighted unless `plain_ce`) and each signal's
        mixed loss times its weight (1 with `unit_weights`: what calibration measures)."""
        if not unit_weights and len(self.weights) != len(self.names):
            raise RuntimeError("the signals' loss weights are not set: calibrate first (distill/calibrate.py)")
        plain_ce = plain_ce or unit_weights
        # A projection strategy's aggregator takes per-loss gradients of the plain model and reduces
        # the combination itself; `sum`, and a recipe with no signal (one loss: one ordinary backward),
        # keep the (possibly DDP-wrapped) model and DDP's reduction.
        model = model if self.aggregator.reduces_through_ddp or not self.signals else self.student.model
        needs_hidden = any(s.needs_hidden for s in self.signals.values())
        needs_logits = any(s.needs_logits for s in self.signals.values())
        full, rows = self.captured_student_layers()
        row_index, row_valid = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
        labels = batch.labels
        assert labels is not None
        pos = Positions(batch.inputs["attention_mask"].bool(), batch.visual_mask, answer_positions(labels), row_valid)
        # the targets come first: the attention-map losses are taken inside the student's forward, each
        # at its layer (models/capture.py), so no captured map outlives its layer
        targets = self.teachers.targets(batch) if self.signals else {}
        consumers: dict[tuple[int, str], list] = {}
        slots: dict[str, list[tuple[tuple[int, str], int]]] = {}
        for name, bound in self.bound.items():
            if bound.reads in ("maps", "text_rows"):
                for key, pair_loss in bound.map_losses(targets[name], pos, full, row_index):
                    slots.setdefault(name, []).append((key, len(consumers.setdefault(key, []))))
                    consumers[key].append(pair_loss)
        with capture(self.student, full, row_layers=rows, row_index=row_index, losses=consumers) as smaps:
            ce, out = answer_cross_entropy(model, batch, all_logits=needs_logits, output_hidden_states=needs_hidden)
        weighted = self.loss_weights()
        losses = {ANCHOR: ce if plain_ce else weighted[ANCHOR] * ce}
        if not self.signals:
            return losses
        caps = torch.tensor([CAPABILITIES.index(c) for c in batch.capabilities], device=labels.device)
        weights = self.mixing.to(labels.device)[caps]  # (B, signals)
        student = Internals(
            dict(smaps),
            out.hidden_states if needs_hidden else None,
            out.logits if needs_logits else None,
            dict(smaps.rows),
            row_index,
        )
        for j, (name, bound) in enumerate(self.bound.items()):
            projection = self.projections[name] if name in self.projections else None
            if name in slots:  # the mean over its matched layers, as `bound.loss` takes it
                per_sample = torch.stack([smaps.losses[key][i] for key, i in slots[name]]).mean(0)
            else:
                per_sample = bound.loss(student, targets[name], pos, projection)
            weight = 1.0 if unit_weights else weighted[name]
            losses[name] = weight * (weights[:, j] * per_sample).mean()
        if not plain_ce and torch.is_grad_enabled() and self._weak.watching:  # training's first batches
            self._weak.observe({k: float(v.detach()) for k, v in losses.items()})
        return losses

    # ---- gradients -------------------------------------------------------------------------------
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in [*self.student.model.parameters(), *self.projections.parameters()] if p.requires_grad]

    def observe_gram(self, names: list[str], gram: torch.Tensor) -> None:
        """Called with the loss names and the fp64 Gram matrix of their (weighted) task gradients
        whenever the aggregator computes one; nothing here."""

    def backward(self, losses: dict[str, torch.Tensor], accelerator: Accelerator, step: int) -> dict[str, float]:
        return self.aggregator.backward(losses, accelerator, step)

    def before_step(self, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Once per optimiser step: combine step-summed gradients (`project_per: step`)."""
        return self.aggregator.before_step(accelerator, step)


class WeakSignalWatch:
    """One warning per signal whose weighted loss stays below `ratio` x CE over the first `steps`
    training batches: at that scale its gradient changes nothing and the run is fine-tuning only."""

    def __init__(self, names: Sequence[str], *, ratio: float = 1e-3, steps: int = 10) -> None:
        self.ratio, self.steps = ratio, steps
        self.seen = 0
        self.below = dict.fromkeys(names, 0)

    @property
    def watching(self) -> bool:
        return self.seen < self.steps and bool(self.below)

    def observe(self, losses: dict[str, float]) -> None:
        if not self.watching:
            return
        self.seen += 1
        ce = abs(losses[ANCHOR])
        for name in self.below:
            self.below[name] += abs(losses[name]) < self.ratio * ce
        if self.seen == self.steps:
            for name, count in self.below.items():
                if count == self.steps:
                    if int(os.environ.get("RANK", "0")) != 0:  # every rank sees it; one says it
                        continue
                    print(
                        f"warning: signal {name!r}: its weighted loss stayed below {self.ratio:g} x CE for the first "
                        f"{self.steps} batches, so it distils next to nothing; raise its weight, or give it a `share`",
                        file=sys.stderr,
                    )
