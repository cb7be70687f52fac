"""`drivekd plan`: the predicted peak memory per device of an SFT or distillation config, by part.

Nothing is loaded: the student and the teachers are built on the meta device from their configs (a
preset, a shipped base, a checkpoint folder, a published architecture of `drivekd models shapes` or
its hub id), so parameter counts and shapes are those of the real architecture (`model`). Each part
is one small function of `formulas` with a one-line reason for its formula; sizes are bytes.

The peak is `resident + max(phases)`. Weights, teacher weights and optimiser state stay for the whole
run; on top of them comes the largest of these phases:

- forward/backward: what the student's forward saves for backward (activations, captured maps, and
  the gradients accumulation keeps), plus the largest of three moments that never coexist: the
  teacher's forward (a live teacher's working set and the targets it makes, or the cache's targets),
  the losses (targets and what the signal losses save), and the backward (what the losses saved, a
  projection strategy's (k, P) buffer and one `autograd.grad` result, and the largest transient:
  CE's backward, the LM-head gradient or a captured map's recompute);
- backward end (a plain backward): every gradient, beside the activations freed last;
- combination (projection strategies): the buffer and the gradients written from it;
- optimiser step: gradients and AdamW's temporary;
- vision forward (a frozen tower): one block's working set, before the language model runs.

`plan_measure.measure_step` runs a real step of a config on this machine's CPU, in a fresh process, and
reads its peak RSS: that is how these formulas are calibrated (docs/configuration.md, "Memory planning").
"""

from __future__ import annotations

from drivekd.bench.plan.advice import LORA_ADVICE, advice
from drivekd.bench.plan.formulas import Step, lm_layers, vision_tower
from drivekd.bench.plan.inputs import Inputs, load_any_config, peek_data
from drivekd.bench.plan.model import DEFAULT_IMAGE, PARTS, Arch, arch, meta_backend
from drivekd.bench.plan.phases import (
    BACKWARD,
    LOSSES,
    RESIDENT,
    SAVED,
    TARGETS,
    TEACHER,
    TRANSIENT,
    Plan,
    phases_of,
)
from drivekd.bench.plan.planner import ALLOCATOR_SHARE, CUDA_CONTEXT, device_budget, plan
from drivekd.bench.plan.units import DTYPE_BYTES, GiB, format_bytes

__all__ = [
    "ALLOCATOR_SHARE",
    "BACKWARD",
    "CUDA_CONTEXT",
    "DEFAULT_IMAGE",
    "DTYPE_BYTES",
    "LORA_ADVICE",
    "LOSSES",
    "PARTS",
    "RESIDENT",
    "SAVED",
    "TARGETS",
    "TEACHER",
    "TRANSIENT",
    "Arch",
    "GiB",
    "Inputs",
    "Plan",
    "Step",
    "advice",
    "arch",
    "device_budget",
    "format_bytes",
    "lm_layers",
    "load_any_config",
    "meta_backend",
    "peek_data",
    "phases_of",
    "plan",
    "vision_tower",
]
