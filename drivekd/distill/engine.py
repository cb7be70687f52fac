"""Multi-teacher Drive-KD: a recipe's signals, teacher targets, mixing, and combined gradients.

The `Distiller` plugs into the generic `Trainer` as an objective (named losses: the weighted CE
anchor plus one weighted distillation loss per signal) and a backward (the gradient strategy). It
knows signals and teachers; it knows nothing of capabilities beyond the mixing matrix's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.distill.cache import TeacherCache, expand_block, fingerprint
from drivekd.distill.capture import capture
from drivekd.distill.combine import combination_coefficients, gradient_stats
from drivekd.distill.reweight import LossReweighter
from drivekd.distill.signals import Positions, Signal, attention_loss, group_windows, hidden_loss, logit_kl
from drivekd.errors import DriveKDError
from drivekd.models.backend import IGNORE_INDEX, Batch, VLMBackend
from drivekd.models.loading import LoadOptions, load_backend
from drivekd.train.config import DistillConfig

RECIPES = Path(__file__).parent / "recipes"
ANCHOR = "ce"


def load_recipe(spec: str) -> dict[str, Signal]:
    """A shipped recipe name (`drive-kd`, `ce-kl`, ...) or a YAML path: {signal name: signal fields}."""
    path = Path(spec) if Path(spec).suffix in (".yaml", ".yml") else RECIPES / f"{spec}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise DriveKDError(f"recipe {spec!r}: no such file or shipped recipe ({shipped})")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    signals = {}
    if not isinstance(raw, dict):
        raise DriveKDError(f"{path}: a recipe maps signal names to their fields")
    for name, fields in raw.items():
        where = f"{path}: signal {name!r}"
        if name == ANCHOR:
            raise DriveKDError(f"{path}: signal name {ANCHOR!r} is reserved for cross-entropy")
        if not isinstance(fields, dict):
            raise DriveKDError(f"{where}: expected its fields (kind, layer, ...), got {fields!r}")
        fields = dict(fields)
        layers = fields.get("layers")
        if layers is not None:
            if not (isinstance(layers, list | tuple) and len(layers) == 2 and all(_is_int(i) for i in layers)):
                raise DriveKDError(f"{where}: layers must be [first, last] (two integers), got {layers!r}")
            fields["layers"] = tuple(layers)
        if fields.get("layer") is not None and not _is_int(fields["layer"]):
            raise DriveKDError(f"{where}: layer must be an integer, got {fields['layer']!r}")
        for key in ("weight", "temperature"):
            if key in fields and (not isinstance(fields[key], int | float) or isinstance(fields[key], bool)):
                raise DriveKDError(f"{where}: {key} must be a number, got {fields[key]!r}")
        try:
            signal = Signal(**fields)
        except TypeError as e:
            raise DriveKDError(f"{where}: {e}") from e
        if signal.kind not in ("attn_tv", "attn_full", "attn_group", "hidden", "logit_kl"):
            raise DriveKDError(f"{where}: unknown kind {signal.kind!r}")
        if signal.distance not in ("mse", "cosine"):
            raise DriveKDError(f"{where}: unknown distance {signal.distance!r} (mse or cosine)")
        signals[name] = signal
    return signals


def check_recipe(config: DistillConfig) -> dict[str, Signal]:
    """Everything a distillation config can get wrong, found from configs alone, before any model,
    data or output folder is touched: the recipe itself, each signal's layers against the student's
    and its teacher's depths, and teacher and student of one family (maps compare position by
    position only when the tokenizer and visual tokens per image agree)."""
    from drivekd.distill.capture import resolve_layer
    from drivekd.models.loading import model_shape

    signals = load_recipe(config.recipe)
    student = model_shape(config.model.name)
    for name, sig in signals.items():
        teacher_spec = config.teachers.get(name, config.teacher)
        if teacher_spec is None:
            raise DriveKDError(f"signal {name!r} has no teacher: set `teacher` (or `teachers.{name}`)")
        teacher = model_shape(teacher_spec)
        if student is not None and teacher is not None and student.family != teacher.family:
            raise DriveKDError(
                f"teacher {teacher_spec} is a {teacher.family} model and the student {config.model.name} a "
                f"{student.family} one: their visual tokens per image differ, so attention maps cannot be "
                "compared position by position; distil within one family"
            )
        indices = list(sig.layers) if sig.layers is not None else [sig.layer if sig.layer is not None else 0]
        if sig.kind == "logit_kl":
            continue
        for who, shape, spec in (("student", student, config.model.name), ("teacher", teacher, teacher_spec)):
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
    if config.reweight and config.strategy == "sum":
        raise DriveKDError("reweight needs per-loss gradient norms: use a projection strategy (e.g. agp), not sum")
    mixing_matrix(config.mixing, list(signals))  # a matrix of the wrong shape or with negative entries
    return signals


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def mixing_matrix(spec: str | list[list[float]], names: Sequence[str]) -> torch.Tensor:
    """Rows: sample capability (perception, reasoning, planning); columns: signals; rows sum to 1.

    `identity` and `reference` (0.8 on the matching capability, 0.1 elsewhere) match columns to rows
    by name; a signal not named after a capability (e.g. `kd`) weighs 1 in every row before norming.
    """
    if isinstance(spec, list):
        w = torch.tensor(spec, dtype=torch.float32)
        if w.shape != (len(CAPABILITIES), len(names)):
            raise DriveKDError(
                f"mixing matrix must be {len(CAPABILITIES)}x{len(names)} (capabilities x signals {list(names)})"
            )
    else:
        w = torch.zeros(len(CAPABILITIES), len(names))
        for j, name in enumerate(names):
            for i, cap in enumerate(CAPABILITIES):
                if name not in CAPABILITIES:
                    w[i, j] = 1.0
                elif spec == "identity":
                    w[i, j] = float(name == cap)
                else:
                    w[i, j] = 0.8 if name == cap else 0.1
    if (w < 0).any():
        raise DriveKDError("mixing matrix entries must be >= 0")
    sums = w.sum(1, keepdim=True)
    return torch.where(sums > 0, w / sums.clamp_min(1e-12), w)


@dataclass
class Targets:
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None


class Distiller:
    def __init__(self, config: DistillConfig, student: VLMBackend, train: Sequence[Sample]) -> None:
        self.config = config
        self.student = student
        self.signals = load_recipe(config.recipe)
        self.names = list(self.signals)
        self.teacher_of = {n: config.teachers.get(n, config.teacher) for n in self.names}
        missing = [n for n, t in self.teacher_of.items() if t is None]
        if missing:
            raise DriveKDError(f"signals {missing} have no teacher: set `teacher` (or `teachers.<signal>`)")
        self.teachers: dict[str, VLMBackend] = {}
        self.cache: TeacherCache | None = None
        if config.cache and self.signals:
            expected = fingerprint(self.signals, {n: str(t) for n, t in self.teacher_of.items()}, student, train)
            self.cache = TeacherCache(config.cache, expected)  # no teacher is loaded at all
        else:
            for ckpt in dict.fromkeys(self.teacher_of.values()):  # each distinct checkpoint loaded once
                teacher = load_backend(str(ckpt), LoadOptions(dtype=config.teacher_dtype, device=str(student.device)))
                teacher.model.eval().requires_grad_(False)
                self.teachers[str(ckpt)] = teacher
                check_same_layout(student, teacher, train[:4], str(ckpt))
        self.mixing = mixing_matrix(config.mixing, self.names)
        self.projections = torch.nn.ModuleDict()
        for name, sig in self.signals.items():
            if sig.kind == "hidden":
                t_width = self._teacher_width(name)
                s_width = student.model.config.text_config.hidden_size
                if t_width != s_width:
                    self.projections[name] = torch.nn.Linear(s_width, t_width, bias=False).to(student.device)
        self.coefficients: torch.Tensor | None = None
        self._pending: tuple[list[str], torch.Tensor] | None = None  # task gradients summed over a step
        self.reweighter: LossReweighter | None = None
        self._last_values: dict[str, float] = {}
        if config.reweight:
            if config.strategy == "sum":
                raise DriveKDError(
                    "reweight needs per-loss gradient norms: use a projection strategy (e.g. agp), not sum"
                )
            static = {ANCHOR: config.ce_weight, **{n: sig.weight for n, sig in self.signals.items()}}
            self.reweighter = LossReweighter(
                static, lr=config.reweight_lr, alpha=config.reweight_alpha, floor=config.ce_floor
            )
        self.step_of = lambda: 0  # the trainer's optimiser step, set by the caller

    def _teacher_width(self, name: str) -> int:
        if self.cache is not None:
            return int(self.cache.manifest["teacher_widths"][name])
        return int(self.teachers[str(self.teacher_of[name])].model.config.text_config.hidden_size)

    def teacher_layers(self, name: str) -> int:
        if self.cache is not None:
            return self.cache.teacher_layers(name)
        return self.teachers[str(self.teacher_of[name])].num_layers

    # ---- what to compute -------------------------------------------------------------------
    def _student_attention_layers(self) -> set[int]:
        n = self.student.num_layers
        return {layer for s in self.signals.values() if s.needs_attention for layer in s.student_layers(n)}

    def _teacher_needs(self, ckpt: str) -> tuple[set[int], bool, bool, int]:
        teacher = self.teachers[ckpt]
        layers: set[int] = set()
        hidden = logits = False
        deepest = 0
        for name, sig in self.signals.items():
            if str(self.teacher_of[name]) != ckpt:
                continue
            used = sig.teacher_layers(self.student.num_layers, teacher.num_layers)
            if sig.needs_attention:
                layers |= set(used)
            hidden |= sig.kind == "hidden"
            logits |= sig.kind == "logit_kl"
            deepest = max([deepest, *used])
        return layers, hidden, logits, deepest

    @torch.no_grad()
    def teacher_targets(self, batch: Batch) -> dict[str, Targets]:
        out = {}
        for ckpt, teacher in self.teachers.items():
            layers, hidden, logits, deepest = self._teacher_needs(ckpt)
            # hidden_states[k + 1] is layer k's raw output only while a later layer runs (the last is
            # normed), so hidden signals keep one layer more
            keep = None if logits else deepest + (2 if hidden else 1)
            with capture(teacher, layers) as maps, _truncated(teacher, keep):
                model = teacher.model if logits else teacher.model.model
                result = model(**batch.inputs, output_hidden_states=hidden)
            out[ckpt] = Targets(dict(maps), result.hidden_states if hidden else None, result.logits if logits else None)
        return out

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs to continue bit-identically: amortised coefficients, task
        gradients pending for a step-wise projection, the reweighter."""
        return {
            "names": [ANCHOR, *self.names],
            "coefficients": self.coefficients,
            "pending": None if self._pending is None else {"names": self._pending[0], "grads": self._pending[1]},
            "last_values": dict(self._last_values),
            "reweighter": self.reweighter.state_dict() if self.reweighter is not None else None,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["names"] != [ANCHOR, *self.names]:
            raise DriveKDError(
                f"the checkpoint was written with losses {state['names']}, this config has {[ANCHOR, *self.names]}; "
                "resume with the run's own recipe"
            )
        self.coefficients = state["coefficients"]  # type: ignore[assignment]
        pending = state["pending"]
        self._pending = None if pending is None else (list(pending["names"]), pending["grads"])  # type: ignore[index]
        self._last_values = dict(state["last_values"])  # type: ignore[call-overload]
        if (state["reweighter"] is None) != (self.reweighter is None):
            raise DriveKDError("checkpoint and config disagree on `reweight`; resume with the run's own config")
        if self.reweighter is not None:
            self.reweighter.load_state_dict(state["reweighter"])  # type: ignore[arg-type]

    # ---- objective ---------------------------------------------------------------------------
    def validation_objective(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Validation: plain (unweighted) CE, so runs with any weighting compare; signal losses as trained."""
        return self.objective(model, batch, plain_ce=True)

    def objective(self, model: torch.nn.Module, batch: Batch, *, plain_ce: bool = False) -> dict[str, torch.Tensor]:
        # Projection strategies take gradients per loss with autograd.grad and all-reduce the
        # combination themselves, so they run the plain model; `sum` keeps DDP's own reduction.
        model = model if self.config.strategy == "sum" else self.student.model
        needs_hidden = any(s.kind == "hidden" for s in self.signals.values())
        with capture(self.student, self._student_attention_layers()) as smaps:
            out = model(**batch.inputs, labels=batch.labels, output_hidden_states=needs_hidden)
        dynamic = self.reweighter.weights() if self.reweighter is not None else {}
        losses = {ANCHOR: out.loss if plain_ce else dynamic.get(ANCHOR, self.config.ce_weight) * out.loss}
        if not self.signals:
            return losses
        labels = batch.labels
        answer = torch.zeros_like(labels, dtype=torch.bool)
        answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        pos = Positions(batch.inputs["attention_mask"].bool(), batch.visual_mask, answer)
        caps = torch.tensor([CAPABILITIES.index(c) for c in batch.capabilities], device=labels.device)
        weights = self.mixing.to(labels.device)[caps]  # (B, signals)
        aligned = self.aligned_targets(batch)
        n_student = self.student.num_layers
        for j, (name, sig) in enumerate(self.signals.items()):
            pairs = group_windows(
                sig.student_layers(n_student), sig.teacher_layers(n_student, self.teacher_layers(name))
            )
            s_layers = [s for s, _ in pairs]
            if sig.needs_attention:
                per_sample = attention_loss(sig, smaps, s_layers, aligned[name], pos)
            elif sig.kind == "hidden":
                proj = self.projections[name] if name in self.projections else None
                per_sample = torch.stack(
                    [
                        hidden_loss(out.hidden_states[s + 1], t, pos, proj, sig.distance)
                        for s, t in zip(s_layers, aligned[name], strict=True)
                    ]
                ).mean(0)
            else:
                per_sample = logit_kl(out.logits, aligned[name][0], pos, sig.temperature)
            losses[name] = dynamic.get(name, sig.weight) * (weights[:, j] * per_sample).mean()
        return losses

    def aligned_targets(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Per signal, the teacher tensors matched to its student layers, padded to the batch."""
        if self.cache is None:
            return self._live_aligned(batch)
        lengths = batch.inputs["attention_mask"].sum(1).tolist()
        per_sample: list[dict[str, torch.Tensor]] = [{} for _ in lengths]
        for b, sample_id in enumerate(batch.sample_ids):
            for name, sig in self.signals.items():
                for k in range(self._targets_per_signal(name, sig)):
                    key = f"{name}/{k}"
                    t = self.cache.tensors(sample_id, key)
                    if sig.kind == "attn_tv":
                        t = expand_block(t, batch.visual_mask[b, : int(lengths[b])].cpu())
                    per_sample[b][key] = t
        width = batch.inputs["input_ids"].shape[1]
        device = batch.inputs["input_ids"].device
        out: dict[str, list[torch.Tensor]] = {}
        for name, sig in self.signals.items():
            out[name] = [
                _pad([per_sample[b][f"{name}/{k}"] for b in range(len(lengths))], width, square=sig.needs_attention).to(
                    device
                )
                for k in range(self._targets_per_signal(name, sig))
            ]
        return out

    def _live_aligned(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Live teachers: window means straight from the padded batch (the losses mask padding and,
        for `attn_tv`, everything outside the block, so nothing needs trimming here)."""
        live = self.teacher_targets(batch)
        n = self.student.num_layers
        out: dict[str, list[torch.Tensor]] = {}
        for name, sig in self.signals.items():
            t = live[str(self.teacher_of[name])]
            if sig.kind == "logit_kl":
                out[name] = [t.logits]
                continue
            windows = [
                w for _, w in group_windows(sig.student_layers(n), sig.teacher_layers(n, self.teacher_layers(name)))
            ]
            if sig.needs_attention:
                out[name] = [torch.stack([t.maps[k] for k in w]).mean(0) for w in windows]
            else:
                out[name] = [torch.stack([t.hidden[k + 1] for k in w]).mean(0) for w in windows]
        return out

    def _targets_per_signal(self, name: str, sig: Signal) -> int:
        n = self.student.num_layers
        return (
            len(group_windows(sig.student_layers(n), sig.teacher_layers(n, self.teacher_layers(name))))
            if sig.kind != "logit_kl"
            else 1
        )

    # ---- gradient strategy -------------------------------------------------------------------
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in [*self.student.model.parameters(), *self.projections.parameters()] if p.requires_grad]

    def backward(self, losses: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
        if self.config.strategy == "sum" or len(losses) == 1:
            accelerator.backward(sum(losses.values()))
            return {}
        names = list(losses)
        if self.reweighter is not None:
            w_now = self.reweighter.weights()
            self._last_values = {n: float(losses[n].detach()) / max(w_now[n], 1e-12) for n in names}
        step = self.step_of()
        every = self.config.amortize_every
        if every and self.coefficients is not None and step % every != 0:
            accelerator.backward(sum(float(w) * losses[n] for w, n in zip(self.coefficients, names, strict=True)))
            if accelerator.num_processes > 1:
                for p in self.trainable():
                    if p.grad is not None:
                        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
            return {}
        params = self.trainable()
        # One (k, P) buffer, each task's gradient written into its row piece by piece: one
        # gradient-sized copy per task, no concatenated or stacked second copy.
        total = sum(p.numel() for p in params)
        stacked = torch.empty((len(names), total), dtype=params[0].dtype, device=params[0].device)
        for i, name in enumerate(names):
            grads = torch.autograd.grad(losses[name], params, retain_graph=i < len(names) - 1, allow_unused=True)
            offset = 0
            for g, p in zip(grads, params, strict=True):
                piece = stacked[i, offset : offset + p.numel()]
                if g is None:
                    piece.zero_()
                else:
                    piece.copy_(g.reshape(-1))
                offset += p.numel()
            del grads
        if self.config.project_per == "step":
            if self._pending is None:
                self._pending = (names, stacked)
            else:
                self._pending[1].add_(stacked)
            return {}
        return self._combine(names, stacked, accelerator)

    def before_step(self, accelerator: Accelerator) -> dict[str, float]:
        """Once per optimiser step: combine step-summed gradients (`project_per: step`), then reweight."""
        stats: dict[str, float] = {}
        if self._pending is not None:
            names, stacked = self._pending
            self._pending = None
            if accelerator.num_processes > 1:
                stacked = accelerator.reduce(stacked, reduction="mean")  # project the global task gradients
            stats = self._combine(names, stacked, accelerator, reduced=True)
        if self.reweighter is not None:
            reduce = (
                (lambda t: accelerator.reduce(t.to(accelerator.device), reduction="mean").cpu())
                if accelerator.num_processes > 1
                else None
            )
            stats.update(self.reweighter.step(reduce))
        return stats

    def _combine(
        self, names: list[str], stacked: torch.Tensor, accelerator: Accelerator, *, reduced: bool = False
    ) -> dict[str, float]:
        params = self.trainable()
        step = self.step_of()
        gram = (stacked.float() @ stacked.float().T).double()
        if self.reweighter is not None:
            w_now = self.reweighter.weights()
            norms = {n: float(gram[i, i].sqrt()) / max(w_now[n], 1e-12) for i, n in enumerate(names)}
            self.reweighter.observe(norms, self._last_values)
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step)
        w = combination_coefficients(gram, names, self.config.strategy, anchor=ANCHOR, generator=generator)
        self.coefficients = w
        combined = w.to(stacked.dtype) @ stacked
        if accelerator.num_processes > 1 and not reduced:
            combined = accelerator.reduce(combined, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            piece = combined[offset : offset + n].view_as(p)
            p.grad = piece.clone() if p.grad is None else p.grad + piece
            offset += n
        stats = gradient_stats(gram, names)
        stats.update({f"coef/{n}": float(x) for n, x in zip(names, w, strict=True)})
        return stats


def _pad(items: list[torch.Tensor], width: int, *, square: bool) -> torch.Tensor:
    """Place per-sample tensors trimmed to their length into a right-padded batch tensor."""
    first = items[0]
    shape = (len(items), width, width) if square else (len(items), width, *first.shape[1:])
    out = torch.zeros(shape, dtype=torch.float32)
    for b, t in enumerate(items):
        n = t.shape[0]
        if square:
            out[b, :n, :n] = t.float()
        else:
            out[b, :n] = t.float()
    return out


def check_same_layout(student: VLMBackend, teacher: VLMBackend, probe: Sequence[Sample], name: str) -> None:
    """Attention maps compare position by position: token ids and visual positions must agree."""
    if not probe:
        return
    bs, bt = student.build_batch(probe), teacher.build_batch(probe)
    ids_s, ids_t = bs.inputs["input_ids"], bt.inputs["input_ids"]
    if ids_s.shape != ids_t.shape or not torch.equal(ids_s, ids_t):
        i = next(k for k in range(len(probe)) if ids_s.shape != ids_t.shape or not torch.equal(ids_s[k], ids_t[k]))
        vis_t, vis_s = int(bt.visual_mask[i].sum()), int(bs.visual_mask[i].sum())
        raise DriveKDError(
            f"teacher {name} ({teacher.family}) and the student ({student.family}) tokenise sample {probe[i].id} "
            f"differently ({ids_t.shape[1]} vs {ids_s.shape[1]} tokens, {vis_t} vs {vis_s} visual): they need "
            "the same tokenizer and visual tokens per image"
        )
    if not torch.equal(bs.visual_mask, bt.visual_mask):
        raise DriveKDError(f"teacher {name} and the student place visual tokens at different positions")


@contextlib.contextmanager
def _truncated(backend: VLMBackend, keep: int | None) -> Iterator[None]:
    """Run only the first `keep` LM layers of a teacher (None: all of them)."""
    lm = backend.model.model.language_model
    if keep is None or keep >= len(lm.layers):
        yield
        return
    full = lm.layers
    lm.layers = full[:keep]
    try:
        yield
    finally:
        lm.layers = full
