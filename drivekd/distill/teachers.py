"""Where the teacher targets of a batch come from: teachers run live, or a cache of their targets.

Both answer `targets(batch)` (per signal, one batch tensor per matched student layer, padded to the
batch) and say each signal's teacher depth and width, so the distiller never asks which one it has.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from drivekd.data.sample import Sample
from drivekd.distill.cache import TeacherCache, fingerprint
from drivekd.distill.signals import BoundSignal, Internals, Signal, captured_layers
from drivekd.errors import DriveKDError
from drivekd.models.backend import Batch, VLMBackend
from drivekd.models.capture import capture, text_rows
from drivekd.models.loading import LoadOptions, load_backend


class TeacherSource(Protocol):
    bound: dict[str, BoundSignal]  # the recipe's signals bound to the student's and their teacher's depths

    def depth(self, name: str) -> int: ...  # the LM layers of the signal's teacher

    def width(self, name: str) -> int: ...

    def targets(self, batch: Batch) -> dict[str, list[torch.Tensor]]: ...

    # the samples of a batch `targets` will be asked for next (read ahead where there is anything to read)
    def prefetch(self, sample_ids: Sequence[str]) -> None: ...


@dataclass
class SharedPrefix:
    """The first tokens several samples share (a frame's preamble and images), run once by
    `LiveTeachers.run_prefix`: per teacher checkpoint, what its signals read of these rows and its
    KV cache."""

    ids: torch.Tensor  # (P,) the prefix's token ids
    internals: dict[str, Internals]
    caches: dict[str, Any]  # per checkpoint, its KV cache of the prefix (a transformers Cache)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class LiveTeachers:
    """Each distinct teacher checkpoint loaded once, frozen, run only as deep as its signals need."""

    def __init__(
        self,
        signals: dict[str, Signal],
        teacher_of: dict[str, str],
        student: VLMBackend,
        *,
        dtype: str = "float32",
        probe: Sequence[Sample] = (),
        placement: dict[str, Any] | None = None,
    ) -> None:
        """`placement`: `LoadOptions` fields spreading each teacher over devices (`TeacherConfig.placement`);
        None: each teacher on the student's device."""
        self.signals = signals
        self.teacher_of = teacher_of
        self.student = student
        self.dtype = dtype
        self.models: dict[str, VLMBackend] = {}
        spread = {k: v for k, v in (placement or {}).items() if v is not None}
        for ckpt in dict.fromkeys(teacher_of.values()):
            teacher = load_backend(ckpt, LoadOptions(dtype=dtype, device=str(student.device), **spread))
            teacher.model.eval().requires_grad_(False)
            check_same_layout(student, teacher, probe[:4], ckpt)
            self.models[ckpt] = teacher
        self.bound = {n: sig.bind(n, student.num_layers, self.depth(n)) for n, sig in signals.items()}

    def depth(self, name: str) -> int:
        return self.models[self.teacher_of[name]].num_layers

    def width(self, name: str) -> int:
        return self.models[self.teacher_of[name]].hidden_size

    def _needs(self, ckpt: str) -> tuple[set[int], set[int], bool, bool, int | None]:
        """What a checkpoint's signals read: layers captured whole, layers captured for their text rows,
        hidden states, logits, and how many layers must run (None: all, for the logits)."""
        mine = [b for n, b in self.bound.items() if self.teacher_of[n] == ckpt]
        full, rows = captured_layers(mine, "teacher")
        hidden = any(b.reads == "hidden" for b in mine)
        logits = any(b.reads == "logits" for b in mine)
        deepest = max([0, *(t for b in mine for t in b.teacher_layers)])
        # hidden_states[k + 1] is layer k's raw output only while a later layer runs (the last is
        # normed), so hidden signals keep one layer more
        keep = None if logits else deepest + (2 if hidden else 1)
        return full, rows, hidden, logits, keep

    @torch.no_grad()
    def internals(self, batch: Batch, prefix: SharedPrefix | None = None) -> dict[str, Internals]:
        """Per checkpoint, what its signals read from one forward pass. With `prefix` (the batch's
        samples' common first tokens, run once by `run_prefix`), only the tokens after it run, against
        its KV cache, and its rows are copied in: the same internals as the whole forward's, to
        rounding (the matrix products have other shapes)."""
        if prefix is not None:
            return {ckpt: self._after_prefix(ckpt, batch, prefix) for ckpt in self.models}
        out = {}
        row_index, _ = text_rows(batch.inputs["attention_mask"], batch.visual_mask)
        for ckpt, teacher in self.models.items():
            full, rows, hidden, logits, keep = self._needs(ckpt)
            with capture(teacher, full, row_layers=rows, row_index=row_index) as maps:
                result = teacher.forward(batch, logits=logits, hidden_states=hidden, layers=keep)
            out[ckpt] = _internals(maps, result, hidden, logits, row_index)
        return out

    @torch.no_grad()
    def run_prefix(self, batch: Batch, length: int) -> SharedPrefix:
        """Run every teacher once on the first `length` tokens of a one-sample batch (a frame's
        preamble and images, alike for each question about it), keeping what its signals read of
        those rows and its KV cache, for `internals(..., prefix=)` to continue from."""
        internals, caches = {}, {}
        valid = batch.inputs["attention_mask"][:, :length]
        row_index, _ = text_rows(valid, batch.visual_mask[:, :length])
        for ckpt, teacher in self.models.items():
            full, rows, hidden, logits, keep = self._needs(ckpt)
            with capture(teacher, full, row_layers=rows, row_index=row_index) as maps:
                result = teacher.run(
                    teacher.prefix_inputs(batch, length),
                    logits=logits,
                    hidden_states=hidden,
                    layers=keep,
                    past_key_values=DynamicCache(),
                )
            internals[ckpt] = _internals(maps, result, hidden, logits, row_index)
            caches[ckpt] = result.past_key_values
        return SharedPrefix(batch.inputs["input_ids"][0, :length].clone(), internals, caches)

    def _after_prefix(self, ckpt: str, batch: Batch, prefix: SharedPrefix) -> Internals:
        """One checkpoint's internals of a right-padded batch whose samples all start with `prefix`:
        the tokens after it run against a per-sample copy of its KV cache, and its rows are joined in."""
        teacher, head = self.models[ckpt], prefix.internals[ckpt]
        full, rows, hidden, logits, keep = self._needs(ckpt)
        p, (size, width) = prefix.length, batch.inputs["input_ids"].shape
        if width <= p or not torch.equal(
            batch.inputs["input_ids"][:, :p].cpu(), prefix.ids[None].expand(size, -1).cpu()
        ):
            raise ValueError("every sample of the batch must start with the prefix and go on after it")
        cache = copy.deepcopy(prefix.caches[ckpt])
        for layer in cache.layers:  # one copy of the prefix's keys and values per sample
            layer.batch_repeat_interleave(size)
        valid = batch.inputs["attention_mask"][:, p:]
        tail_index, _ = text_rows(valid, batch.visual_mask[:, p:])
        with capture(teacher, full, row_layers=rows, row_index=tail_index) as maps:
            result = teacher.run(
                teacher.suffix_inputs(batch, p), logits=logits, hidden_states=hidden, layers=keep, past_key_values=cache
            )
        # The whole forward's layout: a prefix row's keys are the prefix (zero after it, causal); a
        # later row's are the prefix and the tokens up to it, which the run after the cache computed.
        joined_maps = {}
        for layer, tail in maps.items():
            m = tail.new_zeros(size, width, width)
            m[:, :p, :p] = head.maps[layer]
            m[:, p:] = tail
            joined_maps[layer] = m
        joined_rows = {}
        for layer, tail in maps.rows.items():
            r = head.rows[layer].shape[1]
            m = tail.new_zeros(size, r + tail.shape[1], width)
            m[:, :r, :p] = head.rows[layer]
            m[:, r:] = tail
            joined_rows[layer] = m
        assert head.row_index is not None
        row_index = torch.cat([head.row_index.expand(size, -1).to(tail_index.device), p + tail_index], 1)

        def along_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a.expand(size, *a.shape[1:]).to(b.device), b], 1)

        return Internals(
            joined_maps,
            tuple(along_tokens(a, b) for a, b in zip(head.hidden, result.hidden_states, strict=True))
            if hidden and head.hidden is not None
            else None,
            along_tokens(head.logits, result.logits) if logits and head.logits is not None else None,
            joined_rows,
            row_index,
        )

    def targets(self, batch: Batch, prefix: SharedPrefix | None = None) -> dict[str, list[torch.Tensor]]:
        internals = self.internals(batch, prefix)
        device = batch.inputs["input_ids"].device  # a teacher spread over devices ends on its last one
        return {
            name: [t.to(device) for t in b.targets(internals[self.teacher_of[name]])] for name, b in self.bound.items()
        }

    def prefetch(self, sample_ids: Sequence[str]) -> None:
        """Nothing to read ahead: a live teacher computes its targets from the batch."""


class CachedTeachers:
    """Targets read from a `drivekd cache-teacher` folder: no teacher is loaded at all."""

    def __init__(
        self,
        folder: str,
        signals: dict[str, Signal],
        teacher_of: dict[str, str],
        student: VLMBackend,
        samples: Sequence[Sample],
        dtype: str,
    ) -> None:
        self.signals = signals
        self.student = student
        self.cache = TeacherCache(folder)
        for name in signals:
            if name not in self.cache.manifest["teacher_depths"]:
                raise DriveKDError(
                    f"{folder}: the cache holds no signal {name!r}; rebuild it with `drivekd cache-teacher`"
                )
        self.bound = {n: sig.bind(n, student.num_layers, self.cache.teacher_depth(n)) for n, sig in signals.items()}
        self.cache.check(fingerprint(self.bound, teacher_of, student, samples, dtype), student.num_layers)
        if self.cache.storage != "fp16":
            print(
                f"warning: {folder} stores the targets in {self.cache.storage} (lossy): the losses read them "
                "with its rounding (docs/results.md gives its measured error)",
                file=sys.stderr,
            )
        self._keys = [f"{name}/{k}" for name, b in self.bound.items() for k in range(len(b.pairs))]
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future[dict[str, torch.Tensor]]] = {}
        self.waited_s = 0.0  # time `targets` spent waiting on reads (the step's wait on the disk)
        self.read_ahead = 0  # samples whose targets were read ahead of their step

    def prefetch(self, sample_ids: Sequence[str]) -> None:
        """Read these samples' targets in a background thread while the current step computes."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="teacher-cache")
        for sample_id in sample_ids:
            if sample_id not in self._ahead:
                self._ahead[sample_id] = self._reader.submit(self._read, sample_id)
        while len(self._ahead) > 4 * max(1, len(sample_ids)):  # reads never asked for (a batch skipped)
            self._ahead.pop(next(iter(self._ahead)))

    def _read(self, sample_id: str) -> dict[str, torch.Tensor]:
        return {key: self.cache.tensors(sample_id, key) for key in self._keys}

    def _stored(self, sample_id: str) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        ahead = self._ahead.pop(sample_id, None)
        self.read_ahead += ahead is not None
        stored = ahead.result() if ahead is not None else self._read(sample_id)
        self.waited_s += time.perf_counter() - start
        return stored

    def depth(self, name: str) -> int:
        return self.cache.teacher_depth(name)

    def width(self, name: str) -> int:
        return int(self.cache.manifest["teacher_widths"][name])

    def targets(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        lengths = [int(n) for n in batch.inputs["attention_mask"].sum(1).tolist()]
        width = batch.inputs["input_ids"].shape[1]
        text_width = text_rows(batch.inputs["attention_mask"], batch.visual_mask)[0].shape[1]
        device = batch.inputs["input_ids"].device
        for b, sample_id in enumerate(batch.sample_ids):
            self.cache.check_length(sample_id, lengths[b])
        stored = [self._stored(sample_id) for sample_id in batch.sample_ids]
        out: dict[str, list[torch.Tensor]] = {}
        for name, bound in self.bound.items():
            sig, matched = bound.signal, len(bound.pairs)
            out[name] = []
            for k in range(matched):
                per_sample = [
                    sig.restored(stored[b][f"{name}/{k}"], batch.visual_mask[b, : lengths[b]].cpu())
                    for b in range(len(batch.sample_ids))
                ]
                if sig.square:
                    shape = (width, width)
                elif sig.text_rows_only:
                    shape = (text_width, width)
                else:
                    shape = (width, *per_sample[0].shape[1:])
                out[name].append(_pad(per_sample, shape).to(device))
        return out


def _internals(maps: Any, result: Any, hidden: bool, logits: bool, row_index: torch.Tensor) -> Internals:
    """What one teacher forward captured, as the signals read it."""
    return Internals(
        dict(maps),
        result.hidden_states if hidden else None,
        result.logits if logits else None,
        dict(maps.rows),
        row_index,
    )


def _pad(items: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Place per-sample tensors, trimmed to their length, in the top-left corner of a zero batch tensor
    of their stored dtype (fp16 targets stay fp16, half an fp32 copy, kept through the step; the
    losses convert exactly, one layer at a time)."""
    dtypes = {t.dtype for t in items}
    out = torch.zeros((len(items), *shape), dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    for b, t in enumerate(items):
        out[(b, *(slice(0, n) for n in t.shape))].copy_(t)  # converts while copying: no fp32 copy of t first
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
