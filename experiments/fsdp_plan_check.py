"""Does `drivekd plan`'s per-process FSDP figure hold? One measured distillation step on 2 CPU processes.

    python experiments/fsdp_plan_check.py --make-config runs/fsdp-check      # data, teacher, config
    torchrun --nproc-per-node N experiments/fsdp_plan_check.py --config runs/fsdp-check/distill.yaml

Each process shards the config's student as `train.distributed: fsdp` does, takes its share of the
global micro-batch (the longest training samples), and runs real steps of the config's objective and
gradient strategy with every tensor it creates counted (`LiveTensors`, what a GPU's
max_memory_allocated reports). Its total is what it keeps between steps (its shards of the weights
and of AdamW's state) plus the step's peak of live tensors. Process 0 prints one JSON line per
process beside the plan's FSDP figure for 2 processes, at the batch's measured length, and the same
plan at 8 processes: the rule that divides the sharded parts by 2 divides them by 8.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch


def make_config(folder: Path) -> Path:
    """The checked setting: a DriveSim-QA set of 8 scenes, the tiny InternVL student and a saved tiny
    teacher (live), `drive-kd`, AGP projected per step, micro-batch 2 a process."""
    import yaml

    from drivekd.data.drivesim.generate import GenerateConfig, generate
    from drivekd.models.loading import LoadOptions, load_backend

    generate(folder / "data", GenerateConfig(scenes=8, seed=21))
    load_backend("tiny-internvl-teacher", LoadOptions(seed=7)).save(folder / "teacher")
    raw = {
        "model": {"name": "tiny-internvl-student"},
        "teacher": str(folder / "teacher"),
        "recipe": "drive-kd",
        "combine": {"strategy": "agp", "project_per": "step"},
        "data": {"path": str(folder / "data")},
        "train": {"output_dir": str(folder / "run"), "micro_batch_size": 2, "distributed": "fsdp"},
    }
    (folder / "distill.yaml").write_text(yaml.safe_dump(raw))
    return folder / "distill.yaml"


@click.command()
@click.option("--config", "config_path", help="A distill config (its train.distributed is set to fsdp).")
@click.option("--make-config", "make", type=click.Path(path_type=Path), help="Write the checked setting here; stop.")
@click.option("--steps", default=2, show_default=True, help="Measured steps (the first allocates nothing more).")
def main(config_path: str | None, make: Path | None, steps: int) -> None:
    if make is not None:
        print(make_config(make))
        return
    if config_path is None:
        raise click.UsageError("--config or --make-config")
    from accelerate import Accelerator

    from drivekd.bench.plan import Inputs, plan
    from drivekd.bench.plan_measure import LiveTensors
    from drivekd.distill.engine import Distiller
    from drivekd.models.backend import answer_positions
    from drivekd.train import fsdp
    from drivekd.train.config import DistillConfig, load_config
    from drivekd.train.sft import load_model, load_training_data

    config = load_config(DistillConfig, config_path, ["train.distributed=fsdp"])
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    student = load_model(config.model)
    train, val, _ = load_training_data(config.data, student)
    micro = config.train.micro_batch_size
    longest = sorted(train, key=lambda s: -student.token_lengths(s))[: micro * world]
    batch = student.build_batch(longest[rank::world], max_length=config.data.max_length)
    distiller = Distiller(config, student, train + val)
    distiller.set_weights(dict.fromkeys(distiller.names, 1.0))
    fsdp.shard(student.model, student.fsdp_units(), accelerator.device, "no")
    params = [p for p in [*student.model.parameters(), *distiller.projections.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    with torch.no_grad():
        distiller.teachers.targets(batch)  # cache shards read before counting
    with LiveTensors() as live:
        for i in range(steps):
            distiller.backward(distiller.objective(student.model, batch), accelerator, i)
            distiller.before_step(accelerator, i)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    kept = sum(fsdp.local(p).numel() * p.element_size() for p in student.model.parameters())
    kept += sum(p.numel() * p.element_size() for p in distiller.projections.parameters())
    teachers = getattr(distiller.teachers, "models", {})  # a live teacher's weights, loaded before counting
    kept += sum(
        p.numel() * p.element_size()
        for t in {id(m): m for m in teachers.values()}.values()
        for p in t.model.parameters()
    )
    state = sum(
        fsdp.local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim()
    )
    # the first step's AdamW state is created inside the counted region: it is kept, not a peak's part
    measured = {"rank": rank, "weights": kept, "optimiser_state": state, "step_peak": live.peak - state}
    measured["total"] = kept + state + measured["step_peak"]
    rows = [None] * world
    torch.distributed.all_gather_object(rows, measured)
    if rank == 0:
        at = {
            "tokens": int(batch.inputs["input_ids"].shape[1]),
            "answer_tokens": int(answer_positions(batch.labels).sum(1).max()),
            "images": max(len(s.images) for s in longest),
        }
        print(json.dumps(at))
        for row in rows:
            print(json.dumps(row))
        here = plan(config, Inputs(gpus=world, device="cpu", padded=True, **at), advise=False)
        assert here.fsdp is not None
        worst = max(r["total"] for r in rows)
        verdict = {"processes": world, "plan": here.fsdp["peak"], "measured": worst}
        print(json.dumps({**verdict, "plan_over_measured": here.fsdp["peak"] / worst}))
    torch.distributed.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
