"""`drivekd distill`: the SFT loop with a Distiller as objective and backward."""

from __future__ import annotations

from pathlib import Path

import torch

from drivekd.distill.engine import Distiller
from drivekd.errors import DriveKDError
from drivekd.train.config import DistillConfig, dump_config
from drivekd.train.sft import load_model, load_training_data
from drivekd.train.trainer import Trainer


def run_distill(config: DistillConfig, *, resume: bool = False) -> Path:
    run_dir = Path(config.train.output_dir)
    torch.manual_seed(config.train.seed)
    student = load_model(config.model)
    train, val, stats = load_training_data(config.data, student)
    distiller = Distiller(config, student, train[:4])
    trainer = Trainer(
        config.train,
        student,
        train,
        val,
        distiller.objective,
        backward=distiller.backward,
        max_length=config.data.max_length,
        extra_modules=distiller.projections,
    )
    distiller.step_of = lambda: trainer.position.step
    if trainer.checkpoints() and not resume:
        raise DriveKDError(
            f"{run_dir}: holds checkpoints of an earlier run; pass --resume, or choose another train.output_dir"
        )
    if resume and not trainer.resume():
        raise DriveKDError(f"{run_dir}: --resume given but there is no checkpoint to resume from")
    if trainer.accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        trainer._log({"step": trainer.position.step, **{f"data_{k}": v for k, v in stats.items()}})
    trainer.train()
    return trainer.save_final()
