"""The order samples are trained in: each epoch's seeded permutation (optionally grouped by length),
and the random sample a run measures its loss shares on. Alike on every process and on resume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from drivekd.data.sample import Sample
from drivekd.train.config import TrainConfig


def epoch_order(
    n_samples: int,
    seed: int,
    epoch: int,
    global_batch: int,
    lengths: Sequence[int] | None = None,
    left_out: int = 0,
) -> list[int]:
    """The sample order of one epoch: a permutation seeded by (seed, epoch); with `lengths` (group by
    length), as HF Trainer's group_by_length: sorted within windows of 50 batches so a batch pads
    little, then whole batches shuffled, the short last batch last (batches are cut at fixed offsets).
    `left_out` samples are drawn out of the epoch at random before any grouping (not the longest, as
    the short last batch of a length-sorted order would be), a different few each epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_samples, generator=g).tolist()
    order = order[: n_samples - left_out]
    if lengths is None:
        return order
    gb, window = global_batch, global_batch * 50
    grouped = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lengths.__getitem__)]
    full = len(grouped) // gb
    batches = [grouped[b * gb : (b + 1) * gb] for b in torch.randperm(full, generator=g).tolist()]
    return [i for batch in batches for i in batch] + grouped[full * gb :]


def batches_in_epoch(n_samples: int, global_batch: int, processes: int) -> tuple[int, int]:
    """(global batches an epoch is cut into, samples an epoch leaves out). One process trains the short
    last batch. Several drop it: split across them, its samples would not weigh as one process weighs
    them (each process's loss is the mean over its own share, and the shares are averaged), and a
    process could be left with no sample at all, stalling the others at the next collective."""
    if processes == 1:
        return math.ceil(n_samples / global_batch), 0
    return n_samples // global_batch, n_samples % global_batch


def micro_batches_in_step(batch_in_epoch: int, batches_per_epoch: int, grad_accum: int) -> int:
    """Micro-batches the optimiser step starting at `batch_in_epoch` accumulates: `grad_accum`, or what
    is left of the epoch. A step's gradient is the mean over them, so a short last step is not a
    smaller one (dividing its few micro-batches by `grad_accum` would scale its gradient down)."""
    return min(grad_accum, batches_per_epoch - batch_in_epoch)


def steps_for_epochs(epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimiser steps that train `epochs` passes: an epoch is ceil(batches / grad_accum) steps (its
    last one short when grad_accum does not divide it). A fraction of an epoch is its micro-batches
    (rounded up) in steps of grad_accum: the last of those steps is a whole one, so it may train a
    few micro-batches past the fraction, never past the epoch's end."""
    micro = math.ceil(Fraction(str(epochs)) * batches_per_epoch)  # 1.6 x 5 is 8, not 8.000000000000002
    whole, rest = divmod(micro, batches_per_epoch)
    return max(1, whole * math.ceil(batches_per_epoch / grad_accum) + math.ceil(rest / grad_accum))


def calibration_sample(samples: Sequence[Sample], config: TrainConfig, batches: int) -> list[Sample]:
    """`batches` micro-batches' worth of training samples drawn at random by the run's seeded
    permutation, alike on every rank: a representative sample (a file sorted by capability, or the
    length-uniform batches of group_by_length, would not be) on which loss shares are measured."""
    order = epoch_order(len(samples), config.seed, 0, config.micro_batch_size)
    return [samples[i] for i in order[: batches * config.micro_batch_size]]
