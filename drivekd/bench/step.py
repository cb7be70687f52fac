"""`drivekd bench step`: one optimiser step of SFT against three-signal distillation strategies.

Tiny InternVL student, a batch of >= 8 samples padded to >= 256 tokens, cached teacher targets
(and the live teacher for comparison). Median of several timed steps after a warm-up; the ratios
divide by the SFT step measured in the same run. Projection strategies are timed on both Gram paths
(`combine.gram`): the default path (`CombineConfig`'s) under their own name, the other with its name as
a suffix (`agp[modules]`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

STRATEGIES = ("sum", "pcgrad", "agp")


def gram_paths() -> tuple[str, ...]:
    """The Gram paths, the default first (the unsuffixed figures are what a config gets by default)."""
    from drivekd.train.config import CombineConfig

    default = CombineConfig().gram
    return (default, *(p for p in ("buffer", "modules") if p != default))


def figure_name(strategy: str, gram: str) -> str:
    """`agp` for the default Gram path, `agp[modules]` for the other."""
    return strategy if gram == gram_paths()[0] else f"{strategy}[{gram}]"


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

        def measured(distiller: Distiller, fn: Any) -> float:
            try:
                return fn(distiller)
            finally:  # the modules path's taps stay on the shared student otherwise
                if distiller.aggregator.gramian is not None:
                    distiller.aggregator.gramian.remove()

        def amortized(distiller: Distiller) -> float:
            step = distill_step(distiller)
            step()
            start = time.perf_counter()
            for _ in range(amortize_every):  # one exact AGP step and N-1 cheap ones
                step()
            return (time.perf_counter() - start) / amortize_every

        sft_s = timed(sft)
        figures: dict[str, float] = {}
        paths = gram_paths()
        for s in STRATEGIES:
            for gram in paths if s != "sum" else paths[:1]:
                figures[figure_name(s, gram)] = measured(make(s, gram=gram), lambda d: timed(distill_step(d)))
        for gram in paths:
            name = figure_name("agp-amortized", gram)
            figures[name] = measured(make("agp", amortize=amortize_every, gram=gram), amortized)
        live_s = measured(make("agp", cached=False), lambda d: timed(distill_step(d)))
    return {
        "batch": batch_size,
        "tokens": tokens,
        "sft_step_s": sft_s,
        "step_s": figures,
        "ratios": {k: v / sft_s for k, v in figures.items()},
        "live_teacher_step_s": live_s,
        "live_teacher_ratio": live_s / sft_s,
    }
