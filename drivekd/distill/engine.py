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
from pathlib import Path

import torch
from accelerate import Accelerator
from pydantic import ValidationError

from drivekd.data.sample import CAPABILITIES, Sample, capability_of
from drivekd.distill.aggregate import GradientAggregator
from drivekd.distill.signals import Internals, Positions, Signal, SignalSpec, captured_layers, make_signal
from drivekd.distill.teachers import CachedTeachers, LiveTeachers, TeacherSource
from drivekd.errors import DriveKDError, closest
from drivekd.models.backend import IGNORE_INDEX, Batch, VLMBackend
from drivekd.models.capture import capture, text_rows
from drivekd.train.config import DistillConfig, first_error
from drivekd.yamlfile import read_yaml

RECIPES = Path(__file__).parent / "recipes"
ANCHOR = "ce"


SHIPPED_CE_ONLY = "ce"  # the one recipe allowed to have no signals: the cross-entropy baseline, by name


def load_recipe(spec: str) -> dict[str, Signal]:
    """A shipped recipe name (`drive-kd`, `ce-kl`, ...) or a YAML path: {signal name: signal}.

    Each entry is checked against `SignalSpec` (unknown fields named with the closest valid one), and
    each signal's capability is its name or an explicit `capability:`, never a guess: a misspelt
    `planing` is refused rather than mixed into every sample."""
    path = Path(spec) if Path(spec).suffix in (".yaml", ".yml") else RECIPES / f"{spec}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise DriveKDError(f"recipe {spec!r}: no such file or shipped recipe ({shipped})")
    raw = read_yaml(path)
    if raw is None or raw == {}:
        if path.resolve() == (RECIPES / f"{SHIPPED_CE_ONLY}.yaml").resolve():
            return {}
        raise DriveKDError(
            f"{path}: the recipe has no signals; for cross-entropy alone use `recipe: {SHIPPED_CE_ONLY}` "
            "(or `drivekd sft`)"
        )
    if not isinstance(raw, dict):
        raise DriveKDError(f"{path}: a recipe maps signal names to their fields")
    signals = {}
    for name, fields in raw.items():
        where = f"{path}: signal {name!r}"
        if name == ANCHOR:
            raise DriveKDError(f"{path}: signal name {ANCHOR!r} is reserved for cross-entropy")
        if not isinstance(fields, dict):
            raise DriveKDError(f"{where}: expected its fields (kind, layer, ...), got {fields!r}")
        for key in fields:
            if key not in SignalSpec.model_fields:
                close = closest(key, SignalSpec.model_fields)
                hint = f" (did you mean {close!r}?)" if close else f" (fields: {', '.join(SignalSpec.model_fields)})"
                raise DriveKDError(f"{where}: unknown field {key!r}{hint}")
        try:
            entry = SignalSpec.model_validate(fields)
        except ValidationError as e:
            err, loc, _ = first_error(e)
            raise DriveKDError(f"{where}: {loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}") from e
        named = capability_of(name)
        if entry.capability is None and named is None:
            close = closest(name, CAPABILITIES)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise DriveKDError(
                f"{where}: the name is not a capability ({', '.join(CAPABILITIES)}){hint}: name the signal after "
                "the capability whose samples it is mixed for, or give it `capability:` (a capability, or all)"
            )
        if entry.capability is not None and named is not None and entry.capability != named:
            raise DriveKDError(f"{where}: named after {named} but given `capability: {entry.capability}`")
        values = entry.model_dump(exclude={"kind", "capability"})
        signals[name] = make_signal(entry.kind, **values, capability=entry.capability or named)
    return signals


def check_recipe(config: DistillConfig) -> dict[str, Signal]:
    """Everything a distillation config can get wrong, found from configs alone, before any model,
    data or output folder is touched: the recipe itself, each signal's layers against the student's
    and its teacher's depths, and teacher and student of one family (maps compare position by
    position only when the tokenizer and visual tokens per image agree)."""
    from drivekd.models.capture import resolve_layer
    from drivekd.models.loading import model_shape

    signals = load_recipe(config.recipe)
    for key in config.teacher.per_signal:
        if key not in signals:
            close = closest(key, signals)
            hint = f"did you mean {close!r}?" if close else f"its signals: {', '.join(signals) or 'none'}"
            raise DriveKDError(f"teacher.per_signal.{key}: recipe {config.recipe!r} has no signal {key!r} ({hint})")
    student = model_shape(config.model.name)
    for name, sig in signals.items():
        teacher_spec = config.teacher.of(name)
        if teacher_spec is None:
            raise DriveKDError(f"signal {name!r} has no teacher: set `teacher` (or `teacher.per_signal.{name}`)")
        teacher = model_shape(teacher_spec)
        if student is not None and teacher is not None and student.family != teacher.family:
            raise DriveKDError(
                f"teacher {teacher_spec} is a {teacher.family} model and the student {config.model.name} a "
                f"{student.family} one: their visual tokens per image differ, so attention maps cannot be "
                "compared position by position; distil within one family"
            )
        if not sig.reads_layers:
            continue
        for who, shape, spec, indices in (
            ("student", student, config.model.name, sig.named_layers("student") or ()),
            ("teacher", teacher, teacher_spec, sig.named_layers("teacher") or ()),
        ):
            if shape is None:
                continue
            resolved = []
            for index in indices:
                try:
                    resolved.append(resolve_layer(index, shape.num_layers))
                except ValueError:
                    raise DriveKDError(
                        f"recipe {config.recipe}: signal {name!r}: layer {index} is outside the {who} {spec} "
                        f"({shape.num_layers} LM layers: use 0..{shape.num_layers - 1}, or negative from the end)"
                    ) from None
            if len(resolved) == 2 and resolved[0] > resolved[1]:
                raise DriveKDError(
                    f"recipe {config.recipe}: signal {name!r}: layers {list(indices)} are an empty range in the "
                    f"{who} {spec} ({shape.num_layers} LM layers)"
                )
    mixing_matrix(config.mixing, signals)  # a matrix of the wrong shape or with negative entries
    return signals


def mixing_matrix(spec: str | list[list[float]], signals: dict[str, Signal]) -> torch.Tensor:
    """Rows: sample capability (perception, reasoning, planning); columns: signals; rows sum to 1.

    `identity` and `reference` (0.8 on the signal's own capability, 0.1 elsewhere) read each signal's
    capability; a signal for `all` capabilities (e.g. logit KD) weighs 1 in every row before norming.
    """
    names = list(signals)
    if isinstance(spec, list):
        w = torch.tensor(spec, dtype=torch.float32)
        if w.ndim != 2 or w.shape != (len(CAPABILITIES), len(names)):
            raise DriveKDError(
                f"mixing matrix must be {len(CAPABILITIES)}x{len(names)} (capabilities x signals {names})"
            )
    else:
        w = torch.zeros(len(CAPABILITIES), len(names))
        for j, sig in enumerate(signals.values()):
            for i, cap in enumerate(CAPABILITIES):
                if sig.capability == "all":
                    w[i, j] = 1.0
                elif spec == "identity":
                    w[i, j] = float(sig.capability == cap)
                else:
                    w[i, j] = 0.8 if sig.capability == cap else 0.1
    if (w < 0).any():
        raise DriveKDError("mixing matrix entries must be >= 0")
    sums = w.sum(1, keepdim=True)
    return torch.where(sums > 0, w / sums.clamp_min(1e-12), w)


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
                self.signals, self.teacher_of, student, dtype=config.teacher.dtype, probe=train
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
        # the combination itself; `sum` keeps the (possibly DDP-wrapped) model and DDP's reduction.
        model = model if self.aggregator.reduces_through_ddp else self.student.model
        needs_hidden = any(s.needs_hidden for s in self.signals.values())
        full, rows = self.captured_student_layers()
        row_index, row_valid = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
        with capture(self.student, full, row_layers=rows, row_index=row_index) as smaps:
            out = model(**batch.inputs, labels=batch.labels, output_hidden_states=needs_hidden)
        weighted = self.loss_weights()
        losses = {ANCHOR: out.loss if plain_ce else weighted[ANCHOR] * out.loss}
        if not self.signals:
            return losses
        labels = batch.labels
        answer = torch.zeros_like(labels, dtype=torch.bool)
        answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        pos = Positions(batch.inputs["attention_mask"].bool(), batch.visual_mask, answer, row_valid)
        caps = torch.tensor([CAPABILITIES.index(c) for c in batch.capabilities], device=labels.device)
        weights = self.mixing.to(labels.device)[caps]  # (B, signals)
        student = Internals(
            dict(smaps), out.hidden_states if needs_hidden else None, out.logits, dict(smaps.rows), row_index
        )
        targets = self.teachers.targets(batch)
        for j, (name, bound) in enumerate(self.bound.items()):
            projection = self.projections[name] if name in self.projections else None
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
