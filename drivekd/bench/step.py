"""`drivekd bench step`: one optimiser step of SFT against three-signal distillation strategies.

Tiny InternVL student, a batch of >= 8 samples padded to >= 256 tokens, cached teacher targets
(and the live teacher for comparison). Median of several timed steps after a warm-up (amortised AGP:
of several windows of N steps, one exact step in each); each ratio divides by an SFT step timed
just before its figure. Projection strategies are timed on both Gram paths (`combine.gram`): the
default path (`CombineConfig`'s) under their own name, the other with its name as a suffix
(`agp[modules]`).

Beside each time, the step's matrix FLOPs (`matrix_flops`): deterministic where the times are noisy,
and, while matrix products are most of a step, what its time ratio stays near (element-wise work and
dispatch add more to the distillation steps than to SFT's). Exact AGP on the buffer path is one
forward and each loss's own backward, so its FLOP ratio is what the task gradients cost, whatever the
implementation.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from drivekd.distill.engine import Distiller
    from drivekd.models.backend import Batch

STRATEGIES = ("sum", "pcgrad", "agp")


def matrix_flops(fn: Callable[[], object]) -> int:
    """The matrix FLOPs of one call of `fn` (products, convolutions and attention, as torch's flop
    counter counts them), with CPU SDPA's fused kernels counted like the GPU ones (torch leaves them
    out, which would count a distillation step's attention maps and not the layers' own attention)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:  # shapes
        return sdpa_flop_count(query, key, value)

    def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def gram_paths() -> tuple[str, ...]:
    """The Gram paths, the default first (the unsuffixed figures are what a config gets by default)."""
    from drivekd.train.config import CombineConfig

    default = CombineConfig().gram
    return (default, *(p for p in ("buffer", "modules") if p != default))


def figure_name(strategy: str, gram: str) -> str:
    """`agp` for the default Gram path, `agp[modules]` for the other."""
    return strategy if gram == gram_paths()[0] else f"{strategy}[{gram}]"


def own_backward_flops(distiller: Distiller, model: torch.nn.Module, batch: Batch) -> dict[str, int]:
    """The matrix FLOPs exact AGP's step is made of: the distillation forward (`forward`) and each
    loss's backward pass on its own (by loss name)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> dict[str, torch.Tensor]:
        return distiller.objective(model, batch)

    figures = {"forward": matrix_flops(forward)}
    for name in list(forward()):
        total = matrix_flops(lambda name=name: torch.autograd.grad(forward()[name], params, allow_unused=True))
        figures[name] = total - figures["forward"]
    return figures


def bench_step(batch_size: int = 8, min_tokens: int = 256, repeats: int = 5, amortize_every: int = 8) -> dict[str, Any]:
    from drivekd.data.drivesim.generate import GenerateConfig, generate
    from drivekd.data.formats import load_split
    from drivekd.distill.engine import Distiller
    from drivekd.distill.run import run_cache_teacher
    from drivekd.models.loading import LoadOptions, load_backend
    from drivekd.train.config import CombineConfig, DataConfig, DistillConfig, ModelConfig, TrainConfig
    from drivekd.train.sft import cross_entropy

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", GenerateConfig(scenes=4, seed=0))
        load_backend("tiny-internvl-teacher", LoadOptions(seed=1)).save(tmp / "teacher")
        student = load_backend("tiny-internvl-student")
        train = load_split(tmp / "data", "train")
        samples = sorted(train, key=lambda s: -student.token_lengths(s))[:batch_size]
        batch = student.build_batch(samples)
        tokens = int(batch.inputs["input_ids"].shape[1])
        if tokens < min_tokens:
            raise RuntimeError(f"batch has only {tokens} tokens")
        config = DistillConfig(
            model=ModelConfig(name="tiny-internvl-student"),
            teacher=str(tmp / "teacher"),
            recipe="drive-kd",
            data=DataConfig(path=str(tmp / "data"), val_split=None),
            train=TrainConfig(output_dir=str(tmp / "run"), micro_batch_size=batch_size),
        )
        cache = run_cache_teacher(config, tmp / "cache")
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(student.model.parameters(), lr=1e-5)

        def timed(step_fn: Any, n: int = repeats) -> float:
            step_fn()  # warm-up
            times = []
            for _ in range(n):
                start = time.perf_counter()
                step_fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        def sft() -> None:
            accelerator.backward(cross_entropy(student.model, batch)["ce"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def distill_step(distiller: Distiller) -> Any:
            steps = [0]  # the optimiser step the aggregator is told (amortisation counts it)

            def step() -> None:
                distiller.backward(distiller.objective(student.model, batch), accelerator, steps[0])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps[0] += 1

            return step

        def make(
            strategy: str, *, cached: bool = True, amortize: int | None = None, gram: str | None = None
        ) -> Distiller:
            cfg = config.model_copy(
                update={
                    "teacher": config.teacher.model_copy(update={"cache": str(cache) if cached else None}),
                    "combine": CombineConfig(
                        strategy=strategy, amortize_every=amortize, **({"gram": gram} if gram else {})
                    ),
                }
            )
            distiller = Distiller(cfg, student, train)
            distiller.set_weights(dict.fromkeys(distiller.names, 1.0))  # a step's cost does not depend on them
            return distiller

        def measured(distiller: Distiller, fn: Any) -> Any:
            try:
                return fn(distiller)
            finally:  # the modules path's taps stay on the shared student otherwise
                if distiller.aggregator.gramian is not None:
                    distiller.aggregator.gramian.remove()

        def every_step(distiller: Distiller) -> tuple[float, float]:
            step = distill_step(distiller)
            return timed(step), matrix_flops(step)

        def amortized(distiller: Distiller) -> tuple[float, float]:
            step = distill_step(distiller)
            step()

            def window() -> None:  # one exact AGP step and N-1 cheap ones
                for _ in range(amortize_every):
                    step()

            times = []
            for _ in range(repeats):  # each window starts after an exact step: one in each
                start = time.perf_counter()
                window()
                times.append(time.perf_counter() - start)
            return statistics.median(times) / amortize_every, matrix_flops(window) / amortize_every

        # each figure against an SFT step timed just before it: a shared machine's load drifts over
        # the minutes a run takes, so a ratio to one SFT time taken at the start drifts with it
        sft_flops = matrix_flops(sft)
        sft_times: dict[str, float] = {}
        figures: dict[str, tuple[float, float]] = {}
        paths = gram_paths()

        def figure(name: str, distiller_of: Any, fn: Any) -> None:
            sft_times[name] = timed(sft)
            figures[name] = measured(distiller_of(), fn)

        for s in STRATEGIES:
            for gram in paths if s != "sum" else paths[:1]:
                figure(figure_name(s, gram), lambda s=s, gram=gram: make(s, gram=gram), every_step)
        for gram in paths:
            name = figure_name("agp-amortized", gram)
            figure(name, lambda gram=gram: make("agp", amortize=amortize_every, gram=gram), amortized)
        live_sft = timed(sft)
        live_s = measured(make("agp", cached=False), lambda d: timed(distill_step(d)))
        parts = measured(make("agp"), lambda d: own_backward_flops(d, student.model, batch))
        sft_forward = matrix_flops(lambda: cross_entropy(student.model, batch))
    return {
        "batch": batch_size,
        "tokens": tokens,
        "sft_step_s": statistics.median([*sft_times.values(), live_sft]),
        "sft_step_s_before": sft_times,  # the SFT time each figure is divided by
        "sft_flops": sft_flops,
        "step_s": {k: v[0] for k, v in figures.items()},
        "ratios": {k: v[0] / sft_times[k] for k, v in figures.items()},
        "flops": {k: v[1] for k, v in figures.items()},
        "flop_ratios": {k: v[1] / sft_flops for k, v in figures.items()},
        "sft_forward_flops": sft_forward,
        "exact_agp_flops": parts,  # the forward and each loss's own backward pass
        "live_teacher_step_s": live_s,
        "live_teacher_sft_step_s_before": live_sft,
        "live_teacher_ratio": live_s / live_sft,
    }
