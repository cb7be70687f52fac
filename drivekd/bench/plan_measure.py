"""`drivekd plan --measure`: one real training step of a config, in a fresh process, against the plan.

How the formulas of `drivekd/bench/plan.py` are calibrated (docs/configuration.md, "Memory
planning"): the step's peak RSS and the peak of the tensors it creates, beside the plan for that
exact batch on this CPU.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel

from drivekd.bench.memory import peak_rss_bytes, release_freed, reset_peak_rss, rss_bytes
from drivekd.bench.plan import RESIDENT, Inputs, plan
from drivekd.errors import DriveKDError


# ---- calibration: one real step, measured ------------------------------------------------------------
class LiveTensors:
    """A dispatch mode that counts the bytes of tensor storages created inside it and still alive, and
    their peak: on a CPU, what `torch.cuda.max_memory_allocated` reports on a GPU (no allocator slack)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(
                self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
            ) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker._created(args, kwargs, out)
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self._ids: set[int] = set()

    def _created(self, args: Any, kwargs: Any, out: Any) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()  # one Python object per storage while it lives
            key = id(storage)
            if key in inputs or key in self._ids:  # a view or an in-place result
                continue
            self._ids.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())

    def _freed(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes

    def __enter__(self) -> LiveTensors:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def measure_worker(config_json: str, kind: str, steps: int = 1) -> dict[str, Any]:
    """In this process: the config's model and the micro batch of its longest training samples, AdamW's
    state allocated as after a first step; then `steps` real training steps and the peak RSS they add."""
    from accelerate import Accelerator

    from drivekd.models.backend import answer_positions
    from drivekd.train.config import DistillConfig, SFTConfig
    from drivekd.train.sft import cross_entropy, load_model, load_training_data

    torch.manual_seed(0)
    config = (DistillConfig if kind == "distill" else SFTConfig).model_validate(json.loads(config_json))
    student = load_model(config.model)
    if config.train.activation_checkpointing:  # as the trainer does
        from drivekd.models import checkpointing

        checkpointing.enable(student.model)
    train, val, _ = load_training_data(config.data, student)
    samples = sorted(train, key=lambda s: -student.token_lengths(s))[: config.train.micro_batch_size]
    batch = student.build_batch(samples, max_length=config.data.max_length)
    accelerator = Accelerator(cpu=True, mixed_precision=config.train.mixed_precision)
    params = [p for p in student.model.parameters() if p.requires_grad]
    if kind == "distill":
        from drivekd.distill.engine import Distiller

        distiller = Distiller(config, student, train + val)
        distiller.set_weights(dict.fromkeys(distiller.names, 1.0))  # a step's memory does not depend on them
        params += [p for p in distiller.projections.parameters() if p.requires_grad]
        objective, backward = distiller.objective, distiller.backward
        with torch.no_grad():
            distiller.teachers.targets(batch)  # loads the cache shards into host memory before the baseline
    else:
        objective = cross_entropy

        def backward(losses: dict[str, torch.Tensor], acc: Any, step: int) -> dict[str, float]:
            acc.backward(sum(losses.values()))
            return {}

    optimizer = torch.optim.AdamW(params, lr=1e-6)
    for p in params:  # AdamW's state, as every step after the first has it
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    student.model.train()
    release_freed()
    baseline = rss_bytes()
    reset = reset_peak_rss()

    pass_peak = 0

    def train_step(i: int) -> None:
        nonlocal pass_peak
        with accelerator.autocast():
            backward(objective(student.model, batch), accelerator, i)
        pass_peak = max(pass_peak, live.peak)  # the forward/backward pass, before the optimiser step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with LiveTensors() as live:  # the same steps' tensors counted
        for i in range(steps):
            train_step(i)
    peak = peak_rss_bytes()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    model_bytes = sum(p.numel() * p.element_size() for p in student.model.parameters())
    return {
        "tokens": int(batch.inputs["input_ids"].shape[1]),
        "answer_tokens": int(answer_positions(batch.labels).sum(1).max()),
        "images": max(len(s.images) for s in samples),
        "padded": bool((batch.inputs["attention_mask"] == 0).any()),
        "micro_batch": len(samples),
        "weights": model_bytes,
        "optimiser_state": state,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_reset": reset,
        "growth": peak - baseline,
        "tensor_growth": live.peak,
        "tensor_growth_pass": pass_peak,
    }


def measure_step(config: BaseModel, steps: int = 1, *, pin_malloc: bool = True) -> dict[str, Any]:
    """`measure_worker` in a fresh process (its peak RSS is its own), against the plan for this CPU at
    the batch's real length and images. On a CPU the baseline RSS holds the weights and AdamW's state
    (and the Python runtime), so the step's growth is compared with the plan's peak less its resident part."""
    from drivekd.bench.isolated import IsolatedFailure, run_isolated
    from drivekd.train.config import DistillConfig

    kind = "distill" if isinstance(config, DistillConfig) else "sft"
    # glibc's mmap threshold grows with the largest freed block, after which freed tensors stay in a
    # fragmented heap and count in RSS; a fixed threshold hands them back at once, as a GPU allocator
    # reuses its blocks (`pin_malloc=False` measures glibc's default)
    malloc = {"MALLOC_MMAP_THRESHOLD_": "65536"} if pin_malloc else {}
    try:
        measured = run_isolated(
            "drivekd.bench.plan_measure:measure_worker",
            config.model_dump_json(),
            kind,
            steps,
            env={"TOKENIZERS_PARALLELISM": "false", **malloc},
        )
    except IsolatedFailure as e:
        raise DriveKDError(f"the measured step failed: {e}") from e
    at = Inputs(
        tokens=measured["tokens"],
        answer_tokens=measured["answer_tokens"],
        images=measured["images"],
        device="cpu",
        padded=measured["padded"],
    )
    predicted = plan(config, at, advise=False)
    # weights, optimiser state (and a live teacher) are in the baseline: the step adds the rest
    resident = measured["weights"] + measured["optimiser_state"] + predicted.parts.get("teacher weights", 0)
    growth = predicted.peak - predicted.phases[RESIDENT]
    return {
        "measured": measured,
        "predicted_total": predicted.peak,
        "predicted_growth": growth,
        "rss_total": resident + measured["growth"],
        "tensor_total": resident + measured["tensor_growth"],
        "ratio_rss": predicted.peak / (resident + measured["growth"]),
        "ratio_tensors": predicted.peak / (resident + measured["tensor_growth"]),
        "plan": predicted,
    }
