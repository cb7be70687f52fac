"""Distillation signals: what a teacher's internals tell the student, and how far apart they are.

A signal is a small object read from a recipe YAML (kind, layers, distance, weight). Its class says
what it needs from the forward passes (attention maps, hidden states, logits), what the teacher
targets are and what a cache stores of them, and its loss. Every loss is per sample, shape `(B,)`,
so multi-teacher mixing can weight samples by their capability. Maps are head-averaged attention
probabilities `(B, T, T)` of student and teacher over the same token sequence (same tokenizer and
visual layout); padding is excluded from every mean.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from drivekd.models.capture import resolve_layer


@dataclass
class Internals:
    """What one forward pass exposes: attention maps of the captured layers (whole, or their text rows
    only), hidden states, logits."""

    maps: dict[int, torch.Tensor]
    hidden: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, R, T) at the positions row_index
    row_index: torch.Tensor | None = None  # (B, R), from `models.capture.text_rows`

    def text_rows(self, layer: int) -> torch.Tensor:
        """The layer's map at the text rows `(B, R, T)`: captured so, or cut from the whole map."""
        if layer in self.rows:
            return self.rows[layer]
        assert self.row_index is not None, "text rows need the batch's row_index"
        full = self.maps[layer]
        return full.gather(1, self.row_index[:, :, None].expand(-1, -1, full.shape[2]).to(full.device))


@dataclass(frozen=True)
class Signal:
    # the student's layer or inclusive range (negative counts from the end); the teacher's too unless
    # teacher_layer(s) name its own, and then, without layer(s), the student's are at the same depth
    layer: int | None = None
    layers: tuple[int, int] | None = None  # group-matched to the teacher's layers with sliding windows
    teacher_layer: int | None = None
    teacher_layers: tuple[int, int] | None = None
    distance: Literal["mse", "cosine"] = "mse"
    temperature: float = 1.0  # logit_kl
    # the loss's scale: an absolute `weight`, or a `share` of the CE at the start that each run turns
    # into a weight by measuring both losses before step 1 (distill/calibrate.py); neither: DEFAULT_SHARE
    weight: float | None = None
    share: float | None = None
    capability: str = "all"  # the samples it is mixed for: a capability's, or all of them alike

    kind: ClassVar[str] = ""
    text_rows_only: ClassVar[bool] = False  # reads only the text rows of its maps
    needs_hidden: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    square: ClassVar[bool] = False  # targets are (T, T) maps
    reads_layers: ClassVar[bool] = True  # False: the output only (its layer fields are ignored)

    def __post_init__(self) -> None:
        for one, both in (("layer", "layers"), ("teacher_layer", "teacher_layers")):
            if getattr(self, one) is not None and getattr(self, both) is not None:
                raise ValueError(f"give {one} or {both}, not both")

    # ---- layers --------------------------------------------------------------------------------
    def named_layers(self, side: Literal["student", "teacher"]) -> tuple[int, ...] | None:
        """The indices the recipe names for one side, as written (first and last of a range); None
        for a student matched to the teacher's layers by depth."""
        student, teacher = (self.layer, self.layers), (self.teacher_layer, self.teacher_layers)
        if side == "teacher" and teacher != (None, None):
            layer, layers = teacher
        elif side == "student" and student == (None, None) and teacher != (None, None):
            return None
        else:
            layer, layers = student
        return tuple(layers) if layers is not None else (layer if layer is not None else 0,)

    def teacher_indices(self, teacher_depth: int) -> list[int]:
        """The teacher layers the signal reads (ascending)."""
        named = self.named_layers("teacher")
        assert named is not None
        return _span(named, teacher_depth)

    def student_indices(self, student_depth: int, teacher_depth: int) -> list[int]:
        """The student layers the signal constrains (ascending)."""
        named = self.named_layers("student")
        if named is None:
            taught = self.teacher_indices(teacher_depth)
            lo, hi = (same_depth(t, teacher_depth, student_depth) for t in (taught[0], taught[-1]))
            return list(range(lo, hi + 1))
        return _span(named, student_depth)

    def pairs(self, student_depth: int, teacher_depth: int) -> list[tuple[int, list[int]]]:
        """Each matched student layer with the teacher layers whose mean it is taught."""
        return group_windows(self.student_indices(student_depth, teacher_depth), self.teacher_indices(teacher_depth))

    def bind(self, name: str, student_depth: int, teacher_depth: int) -> BoundSignal:
        """This signal for a student and a teacher of these depths (the one place its layers are resolved)."""
        return BoundSignal(name, self, student_depth, teacher_depth)

    def recipe_entry(self) -> dict[str, Any]:
        """The signal as a recipe YAML entry that loads back as the same signal: unset fields left out,
        the capability always written (a name need not imply it, as `kd` does not)."""
        entry: dict[str, Any] = {"kind": self.kind}
        for key, value in vars(self).items():
            if key == "kind":
                continue
            if value is not None and (key == "capability" or value != getattr(type(self), key, None)):
                entry[key] = list(value) if isinstance(value, tuple) else value
        return entry

    # ---- teacher targets ------------------------------------------------------------------------
    def targets(self, teacher: Internals, student_depth: int, teacher_depth: int) -> list[torch.Tensor]:
        """Per matched student layer, the batch's teacher tensor (a window mean for grouped layers)."""
        raise NotImplementedError

    def _window_means(
        self, at_layer: Callable[[int], torch.Tensor], student_depth: int, teacher_depth: int
    ) -> list[torch.Tensor]:
        """Per matched student layer, the mean of the teacher tensors of its window of layers."""
        return [
            torch.stack([at_layer(t) for t in window]).mean(0) for _, window in self.pairs(student_depth, teacher_depth)
        ]

    def stored(self, target: torch.Tensor, length: int, visual: torch.Tensor) -> torch.Tensor:
        """What a cache keeps of one sample's target: trimmed to its `length` tokens."""
        return target[:length, :length] if self.square else target[:length]

    def restored(self, stored: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Inverse of `stored`, up to the padding (`visual`: the sample's visual mask, trimmed)."""
        return stored

    def stored_elements(self, length: int, visual: int, width: int, vocab: int) -> int:
        """Number of values a cache keeps per sample and matched layer."""
        raise NotImplementedError

    # ---- loss ----------------------------------------------------------------------------------
    def loss(
        self,
        student: Internals,
        targets: list[torch.Tensor],
        positions: Positions,
        student_layers: list[int],
        projection: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class _Attention(Signal):
    square = True
    block: ClassVar[str] = "full"

    def targets(self, teacher: Internals, student_depth: int, teacher_depth: int) -> list[torch.Tensor]:
        return self._window_means(lambda t: teacher.maps[t], student_depth, teacher_depth)

    def stored_elements(self, length: int, visual: int, width: int, vocab: int) -> int:
        return length * length

    def student_map(self, student: Internals, layer: int) -> torch.Tensor:
        """The student's map the loss compares with the target."""
        return student.maps[layer]

    def loss_mask(self, positions: Positions) -> torch.Tensor:
        """The map entries the loss reads."""
        return positions.pair_mask(self.block)

    def map_loss(self, smap: torch.Tensor, target: torch.Tensor, positions: Positions) -> torch.Tensor:
        """One matched layer's per-sample distance; `smap` is the student's map as `student_map` gives it."""
        weights, count = positions.weights(self.loss_mask(positions), smap.dtype)
        return map_distance(smap, target, weights, self.distance, count)

    def loss(
        self,
        student: Internals,
        targets: list[torch.Tensor],
        positions: Positions,
        student_layers: list[int],
        projection: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Mean over matched layers of the per-sample map distance; `targets[k]` is the teacher map
        (its group window's mean) matched to `student_layers[k]`."""
        losses = [
            self.map_loss(self.student_map(student, s), t, positions)
            for s, t in zip(student_layers, targets, strict=True)
        ]
        return torch.stack(losses).mean(0)


@dataclass(frozen=True)
class AttnTV(_Attention):
    """The text→vision block of one layer's map: where text positions look in the images. Maps are
    captured for the text rows only, `(B, R, T)` (R: the batch's most text tokens)."""

    kind = "attn_tv"
    block = "tv"
    square = False
    text_rows_only = True

    def targets(self, teacher: Internals, student_depth: int, teacher_depth: int) -> list[torch.Tensor]:
        return self._window_means(teacher.text_rows, student_depth, teacher_depth)

    def stored(self, target: torch.Tensor, length: int, visual: torch.Tensor) -> torch.Tensor:
        # only the text->vision block: the loss reads nothing else. `target` is the sample's text rows
        # (its text positions in order, then padding rows)
        texts = int((~visual).sum())
        return target[:texts, :length][:, visual]

    def restored(self, stored: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The sample's text rows `(texts, length)`: the block in the visual columns, zeros elsewhere."""
        rows = torch.zeros(stored.shape[0], visual.shape[0], dtype=stored.dtype)
        rows[:, visual] = stored
        return rows

    def stored_elements(self, length: int, visual: int, width: int, vocab: int) -> int:
        return (length - visual) * visual

    def student_map(self, student: Internals, layer: int) -> torch.Tensor:
        return student.text_rows(layer)

    def loss_mask(self, positions: Positions) -> torch.Tensor:
        return positions.text_row_mask()


@dataclass(frozen=True)
class AttnMaps(_Attention):
    """Whole maps of one layer or a range, each student layer taught the mean of a sliding window of
    teacher layers (`group_windows`; one layer is a window of size 1). The paper names the one-layer
    use `attn_full` and the range `attn_group`: both kinds are this signal, and the kind a recipe
    gives is kept (it is part of the signal's identity, so caches and runs keep theirs)."""

    kind: Literal["attn_full", "attn_group"] = "attn_full"  # type: ignore[misc]


@dataclass(frozen=True)
class Hidden(Signal):
    """Hidden states (through a learned projection when the widths differ)."""

    kind = "hidden"
    needs_hidden = True

    def targets(self, teacher: Internals, student_depth: int, teacher_depth: int) -> list[torch.Tensor]:
        hidden = teacher.hidden
        assert hidden is not None
        # hidden_states[k + 1] is layer k's output
        return self._window_means(lambda t: hidden[t + 1], student_depth, teacher_depth)

    def stored_elements(self, length: int, visual: int, width: int, vocab: int) -> int:
        return length * width

    def loss(
        self,
        student: Internals,
        targets: list[torch.Tensor],
        positions: Positions,
        student_layers: list[int],
        projection: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        assert student.hidden is not None
        return torch.stack(
            [
                hidden_loss(student.hidden[s + 1], t, positions, projection, self.distance)
                for s, t in zip(student_layers, targets, strict=True)
            ]
        ).mean(0)


@dataclass(frozen=True)
class LogitKL(Signal):
    """The output distribution on the answer positions (classic KD)."""

    kind = "logit_kl"
    needs_logits = True
    reads_layers = False

    def student_indices(self, student_depth: int, teacher_depth: int) -> list[int]:
        return []

    def pairs(self, student_depth: int, teacher_depth: int) -> list[tuple[int, list[int]]]:
        return [(-1, [-1])]  # one target: the logits

    def targets(self, teacher: Internals, student_depth: int, teacher_depth: int) -> list[torch.Tensor]:
        assert teacher.logits is not None
        return [teacher.logits]

    def stored_elements(self, length: int, visual: int, width: int, vocab: int) -> int:
        return length * vocab

    def loss(
        self,
        student: Internals,
        targets: list[torch.Tensor],
        positions: Positions,
        student_layers: list[int],
        projection: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        assert student.logits is not None
        return logit_kl(student.logits, targets[0], positions, self.temperature)


# `attn_full` and `attn_group` are two names of one signal
KINDS: dict[str, type[Signal]] = {cls.kind: cls for cls in (AttnTV, Hidden, LogitKL)}
KINDS |= {"attn_full": AttnMaps, "attn_group": AttnMaps}


@dataclass(frozen=True)
class BoundSignal:
    """A recipe's signal bound to a student and a teacher of known depths, built once and read by
    everything that needs its layers: the distiller (which student maps to capture, what the loss
    compares), the teachers (which teacher maps to capture, which window means are the targets), the
    cache (what it stores, and its identity) and the memory planner."""

    name: str
    signal: Signal
    student_depth: int
    teacher_depth: int

    @functools.cached_property
    def pairs(self) -> list[tuple[int, list[int]]]:
        """Each matched student layer with the teacher layers whose mean it is taught."""
        return self.signal.pairs(self.student_depth, self.teacher_depth)

    @property
    def student_layers(self) -> list[int]:
        """The student layers the signal reads (none for logits)."""
        return [s for s, _ in self.pairs] if self.signal.reads_layers else []

    @property
    def teacher_layers(self) -> list[int]:
        """The teacher layers the signal reads, ascending (none for logits)."""
        return sorted({t for _, window in self.pairs for t in window}) if self.signal.reads_layers else []

    @property
    def reads(self) -> Literal["maps", "text_rows", "hidden", "logits"]:
        """What of a forward pass it reads: whole attention maps, their text rows, hidden states, logits."""
        sig = self.signal
        if sig.needs_logits:
            return "logits"
        if sig.needs_hidden:
            return "hidden"
        return "text_rows" if sig.text_rows_only else "maps"

    def identity(self) -> dict[str, Any]:
        """What decides its teacher targets (a cache's identity): kind, layer pairs and windows, what is read."""
        return {"kind": self.signal.kind, "pairs": [[s, list(w)] for s, w in self.pairs], "reads": self.reads}

    def targets(self, teacher: Internals) -> list[torch.Tensor]:
        """Per matched student layer, the batch's teacher tensor (a window mean for grouped layers)."""
        return self.signal.targets(teacher, self.student_depth, self.teacher_depth)

    def loss(
        self, student: Internals, targets: list[torch.Tensor], positions: Positions, projection: torch.nn.Module | None
    ) -> torch.Tensor:
        """Per-sample loss `(B,)` of the student's internals against the targets."""
        return self.signal.loss(student, targets, positions, [s for s, _ in self.pairs], projection)

    def map_losses(
        self, targets: list[torch.Tensor], positions: Positions, whole: set[int], row_index: torch.Tensor
    ) -> list[tuple[tuple[int, str], Callable[[torch.Tensor], torch.Tensor]]]:
        """For a signal reading attention maps: per matched layer, the capture it reads (`(layer, "full")`
        for a layer captured whole, which `whole` lists, else `(layer, "rows")`) and the function from
        that capture to the layer's per-sample loss (`loss`, one layer at a time: `models.capture` runs
        it inside the layer's forward). The signal's loss is their mean."""
        sig = self.signal
        assert isinstance(sig, _Attention), f"{sig.kind} reads no attention map"
        out = []
        for (layer, _), target in zip(self.pairs, targets, strict=True):
            full = self.reads == "maps" or layer in whole

            def pair_loss(
                captured: torch.Tensor, layer: int = layer, target: torch.Tensor = target, full: bool = full
            ) -> torch.Tensor:
                view = Internals(
                    {layer: captured} if full else {}, rows={} if full else {layer: captured}, row_index=row_index
                )
                return sig.map_loss(sig.student_map(view, layer), target, positions)

            out.append(((layer, "full" if full else "rows"), pair_loss))
        return out


def captured_layers(bound: Iterable[BoundSignal], side: Literal["student", "teacher"]) -> tuple[set[int], set[int]]:
    """One side's layers whose whole maps are needed, and those whose text rows are enough (a layer
    some signal needs whole serves the text-row signals too)."""
    full: set[int] = set()
    rows: set[int] = set()
    for b in bound:
        if b.reads in ("maps", "text_rows"):
            layers = b.student_layers if side == "student" else b.teacher_layers
            (rows if b.reads == "text_rows" else full).update(layers)
    return full, rows - full


def make_signal(kind: str, **fields: Any) -> Signal:
    """A signal of `kind` (attn_tv, attn_full, attn_group, hidden, logit_kl) with its fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} ({', '.join(KINDS)})")
    cls = KINDS[kind]
    return cls(**fields, kind=kind) if cls is AttnMaps else cls(**fields)


def _span(named: tuple[int, ...], num_layers: int) -> list[int]:
    """The layers from the first to the last of `named` in a `num_layers`-layer model."""
    lo, hi = resolve_layer(named[0], num_layers), resolve_layer(named[-1], num_layers)
    return list(range(lo, hi + 1))


def same_depth(layer: int, num_from: int, num_to: int) -> int:
    """The layer of a `num_to`-layer model at the relative depth of `layer` (resolved) in a `num_from`-layer one.

    The last layers match each other; the others spread evenly over the layers before the last, so a
    layer below the teacher's last never lands on the student's last one, the layer that writes the
    answer (docs/prestudy.md rule 5). 8-layer teacher to 4-layer student: 0->0, 3->1, 6->2, 7->3.
    """
    if layer == num_from - 1:
        return num_to - 1
    if num_from <= 2 or num_to <= 2:
        return 0
    return math.floor(layer * (num_to - 2) / (num_from - 2) + 0.5)


def group_windows(student: list[int], teacher: list[int]) -> list[tuple[int, list[int]]]:
    """The sliding-window rule (docs/method.md §3): student layer i <- mean of teacher t_i .. t_{i+g-1}.

    g = max(1, m - k + 1) for k student and m teacher layers; the window start is clipped to m - g.
    24-layer student, 28-layer teacher, range 0..-2: k = 23, m = 27, g = 5.
    """
    k, m = len(student), len(teacher)
    g = max(1, m - k + 1)
    out = []
    for i, s in enumerate(student):
        start = min(i, m - g)
        out.append((s, teacher[start : start + g]))
    return out


@dataclass
class Positions:
    """What the losses need to know about each position of a batch."""

    valid: torch.Tensor  # (B, T) bool: real tokens (not padding)
    visual: torch.Tensor  # (B, T) bool: visual-token positions
    answer: torch.Tensor  # (B, T) bool: positions whose next token is an answer token (for logits)
    row_valid: torch.Tensor | None = None  # (B, R) bool: which text rows (`text_rows`) are real
    # a batch's masks are alike for every signal and layer that reads them, and each is a (B, T, T)
    # tensor (its float weights another): made once per batch
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def text_row_mask(self) -> torch.Tensor:
        """(B, R, T): a real text row against a real visual key, the entries a text->vision loss reads."""
        assert self.row_valid is not None, "text rows need the batch's row_valid"
        row_valid = self.row_valid
        return self._memoized("text_rows", lambda: row_valid[:, :, None] & (self.valid & self.visual)[:, None, :])

    def pair_mask(self, block: str) -> torch.Tensor:
        def build() -> torch.Tensor:
            rows = self.valid
            cols = self.valid
            if block == "tv":
                rows = rows & ~self.visual
                cols = cols & self.visual
            return rows[:, :, None] & cols[:, None, :]

        return self._memoized(("pair", block), build)

    def weights(self, mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`mask` as `dtype` weights and each sample's number of entries (at least 1), `map_distance`'s
        `mask` and `count`. Keyed by the mask's identity: the entry holds the mask, so no other tensor
        can take its id meanwhile."""

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            m = mask.to(dtype)
            return mask, m, m.flatten(1).sum(1).clamp_min(1.0)

        _, m, count = self._memoized(("weights", id(mask), dtype), build)
        return m, count

    def _memoized(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def map_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    distance: str,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample distance between two `(B, T, T)` maps over the `mask` entries (boolean, or weights of
    the student's dtype: `Positions.weights`, which also gives `count`, the entries per sample)."""
    m = mask.to(student.dtype)
    if distance == "mse":
        if count is None:
            count = m.flatten(1).sum(1).clamp_min(1.0)
        # in place: the square is no saved tensor (pow keeps its input), one (B, T, T) buffer fewer
        return ((student - teacher.to(student.dtype)) ** 2).mul_(m).flatten(1).sum(1) / count
    s = (student * m).flatten(1)
    t = (teacher.to(student.dtype) * m).flatten(1)
    return 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)


def hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    positions: Positions,
    projection: torch.nn.Module | None,
    distance: str,
) -> torch.Tensor:
    """Per-sample distance of hidden states `(B, T, D)` over valid positions (projected if widths differ)."""
    s = projection(student) if projection is not None else student
    t = teacher.to(s.dtype)
    m = positions.valid.to(s.dtype)
    if distance == "mse":
        return (((s - t) ** 2).mean(-1) * m).sum(1) / m.sum(1).clamp_min(1.0)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
    return ((1.0 - cos) * m).sum(1) / m.sum(1).clamp_min(1.0)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, positions: Positions, temperature: float) -> torch.Tensor:
    """Per-sample KL(teacher || student) at temperature τ, times τ², on answer-predicting positions."""
    tau = temperature
    log_s = torch.log_softmax(student.float() / tau, dim=-1)
    log_t = torch.log_softmax(teacher.float() / tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * tau * tau
    m = positions.answer.to(kl.dtype)
    return (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
