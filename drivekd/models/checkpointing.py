"""Activation checkpointing of a trained model (`train.activation_checkpointing`).

Each decoder layer, of the language model and of the vision tower, keeps only its inputs for the
backward pass and runs its forward again there (transformers' own layer checkpointing over
non-reentrant `torch.utils.checkpoint`): the activations held between forward and backward are one
hidden state per layer instead of everything each layer saves.

The second forward refills the first one's saved tensors in the order they were saved, so it must do
exactly what the first did. Two things change a forward from outside the layer: attention capture
(which layers compute a map, or their map losses, beside their output) and the Gram pass's taps
(parameters replaced by identity nodes). Capture is armed again around the recompute as it was when
the layer first ran, writing into a scratch sink (the recomputed losses are not the ones the graph
holds), and `recomputing()` is true there, so the taps are not made, or counted, a second time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from transformers import PreTrainedModel

from drivekd.models import capture

_depth = 0  # recomputations running (one, unless a checkpoint nests in another)


def recomputing() -> bool:
    """True while a checkpointed layer runs its forward again in the backward pass."""
    return _depth > 0


class _Recompute:
    """Around one layer's recompute: capture armed as at the layer's first forward. Entered once per
    backward pass through the layer (several with a retained graph), so it is not a generator."""

    def __init__(self) -> None:
        self._captured = capture.armed_now()
        self._replay: AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        global _depth
        replay = capture.replay(self._captured)
        replay.__enter__()
        self._replay = replay
        _depth += 1  # last: nothing above can leave the flag set

    def __exit__(self, *exc: Any) -> None:
        global _depth
        _depth -= 1
        replay, self._replay = self._replay, None  # drops the scratch sink and what the recompute put there
        assert replay is not None
        replay.__exit__(*exc)


def _contexts() -> tuple[AbstractContextManager[None], _Recompute]:
    # called by torch.utils.checkpoint at each checkpointed layer's first forward
    return nullcontext(), _Recompute()


def enable(model: PreTrainedModel) -> None:
    """Checkpoint every decoder layer of `model` (in training mode; evaluation is unchanged)."""
    model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": _contexts})
    # transformers also makes every sub-model's input embeddings require gradients (what reentrant
    # checkpointing needs): a frozen vision tower would then build its graph, keep its activations and
    # run its backward for nothing (measured: InternVL3-1B, 2 cameras, backward 8 s -> 29 s)
    model.disable_input_require_grads()
