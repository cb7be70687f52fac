"""One training loop for SFT and distillation, on HF accelerate.

The loop knows batches, an objective and an optimiser; it knows neither capabilities nor model
families. An objective maps a batch to named scalar losses; `backward` turns them into gradients
(the default sums them; distillation plugs in its gradient combiner).

Determinism and resume: the data order of epoch e is a permutation seeded by (seed, e); a
checkpoint stores model, optimiser, scheduler, RNG and the position in that order, so a run killed
and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_model, save_model
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from drivekd import progress
from drivekd.atomic import atomic_dir
from drivekd.data.sample import Sample, image_blind_control
from drivekd.errors import DataError, DriveKDError
from drivekd.models import checkpointing
from drivekd.models.backend import Batch, VLMBackend, answer_positions
from drivekd.train import fsdp
from drivekd.train.config import TrainConfig
from drivekd.train.order import batches_in_epoch, epoch_order, micro_batches_in_step, steps_for_epochs
from drivekd.train.run_folder import RunFolder

# An objective calls the (possibly DDP-wrapped) model it is given, so gradients synchronise.
Objective = Callable[[torch.nn.Module, Batch], dict[str, torch.Tensor]]
Backward = Callable[[dict[str, torch.Tensor], Accelerator, int], dict[str, float]]  # losses, accelerator, step


# validation metrics that are means over answer tokens; the others are means over samples, or say
# over how many as (mean, count)
TOKEN_MEAN_METRICS = frozenset({"ce"})


def sum_backward(losses: dict[str, torch.Tensor], accelerator: Accelerator, step: int) -> dict[str, float]:
    accelerator.backward(sum(losses.values()))
    return {}


@dataclass
class Position:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch already consumed


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        backend: VLMBackend,
        train: Sequence[Sample],
        val: Sequence[Sample],
        objective: Objective,
        *,
        backward: Backward = sum_backward,
        max_length: int | None = None,
        accelerator: Accelerator | None = None,
        extra_modules: torch.nn.Module | None = None,
        before_step: Callable[[Accelerator, int], dict[str, float]] | None = None,
        augment: Callable[[Sample, tuple[int, int, int]], Sample] | None = None,
        val_objective: Objective | None = None,
        stateful: Any = None,
        prefetch: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.train_samples = list(train)
        self.val_samples = list(val)[: config.val_max_samples]
        # The image-blind control: the same answers scored with another scene's images.
        self.val_other_images: list[Sample] = []
        self.val_kept_own_images = 0
        if config.val_other_images and self.val_samples:
            # images borrowed from the whole val split: the first val_max_samples may be one scene's
            try:
                self.val_other_images, self.val_kept_own_images = image_blind_control(
                    self.val_samples, source="train.val_other_images", pool=list(val)
                )
            except DataError as e:  # no val_*_other_images figures at all rather than ones equal to the real ones
                print(f"warning: {e}; no image-blind validation", file=sys.stderr)
                self.val_kept_own_images = len(self.val_samples)
            if 0 < self.val_kept_own_images < len(self.val_samples):
                print(
                    f"warning: train.val_other_images: {self.val_kept_own_images} of {len(self.val_samples)} val "
                    "samples have no other scene with their cameras and keep their own images",
                    file=sys.stderr,
                )
        self.objective = objective
        self.val_objective = val_objective or objective  # e.g. plain CE, comparable across loss weightings
        self.backward = backward
        self.max_length = max_length
        self.extra = extra_modules  # trained beside the model (e.g. hidden-state projections), checkpointed too
        self.before_step = before_step  # e.g. combine task gradients accumulated over the step
        self.augment = augment  # applied per (seed, epoch, sample index): reproducible across resumes and ranks
        # An object with state_dict()/load_state_dict() checkpointed with the run (e.g. the distiller's
        # amortised coefficients), so a resumed run continues bit-identically.
        self.stateful = stateful
        # told the sample ids of the next micro-batch while this one trains (e.g. to read cached
        # teacher targets ahead)
        self.prefetch = prefetch
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.run_dir = Path(config.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        acc = self.accelerator
        self.sharded = config.distributed == "fsdp"
        if config.activation_checkpointing:
            checkpointing.enable(backend.model)
        if self.sharded:
            fsdp.shard(backend.model, backend.fsdp_units(), acc.device, config.mixed_precision)
        params = [p for p in backend.model.parameters() if p.requires_grad]
        if extra_modules is not None:
            params += [p for p in extra_modules.parameters() if p.requires_grad]
        if not params:
            raise DriveKDError("no trainable parameters: everything is frozen")
        batches, left_out = batches_in_epoch(len(self.train_samples), self.global_batch, acc.num_processes)
        if batches == 0:
            raise DriveKDError(
                f"{len(self.train_samples)} training samples make no whole global batch of {self.global_batch} "
                f"(train.micro_batch_size {config.micro_batch_size} x {acc.num_processes} processes)"
            )
        if left_out and acc.is_main_process:
            print(
                f"warning: {left_out} of {len(self.train_samples)} training samples are left out of each epoch (a "
                f"different {left_out} each epoch): {acc.num_processes} processes train whole global batches of "
                f"{self.global_batch} only",
                file=sys.stderr,
            )
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
        self.total_steps = self._total_steps()
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, min(config.warmup_steps, self.total_steps), self.total_steps, min_lr_rate=config.min_lr_ratio
        )
        # The scheduler is not handed to accelerate: its wrapper steps a schedule once per process at
        # every optimiser step (it assumes the schedule was sized for one process's batches), which
        # would run this run's schedule (sized in optimiser steps) N times too fast under torchrun.
        self.scheduler = scheduler
        if self.sharded:  # sharded in place: the model is its own wrapper
            self.model, self.optimizer = backend.model, optimizer
        else:  # backend.model stays the plain model (generation, saving); self.model may be DDP-wrapped
            self.model, self.optimizer = acc.prepare(backend.model, optimizer)
        self.position = Position()
        self.log_window: dict = {"sums": {}, "counts": {}, "n": 0}

    # ---- data order ------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.config.micro_batch_size * self.accelerator.num_processes

    def batches_per_epoch(self) -> int:
        return batches_in_epoch(len(self.train_samples), self.global_batch, self.accelerator.num_processes)[0]

    def _total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        return steps_for_epochs(self.config.epochs, self.batches_per_epoch(), self.config.grad_accum)

    def epoch_order(self, epoch: int) -> list[int]:
        lengths = self._token_lengths() if self.config.group_by_length else None
        n, processes = len(self.train_samples), self.accelerator.num_processes
        left_out = batches_in_epoch(n, self.global_batch, processes)[1]
        return epoch_order(n, self.config.seed, epoch, self.global_batch, lengths, left_out)

    def _token_lengths(self) -> list[int]:
        return [self.backend.token_lengths(s) for s in self.train_samples]  # the backend remembers them

    def _local_indices(self, order: list[int], index: int) -> list[int]:
        """This process's share of the `index`-th global batch of an epoch, as sample indices."""
        chunk = order[index * self.global_batch : (index + 1) * self.global_batch]
        return chunk[self.accelerator.process_index :: self.accelerator.num_processes]

    def _local_batch(self, order: list[int], index: int, epoch: int) -> list[Sample]:
        mine = self._local_indices(order, index)
        if self.augment is None:
            return [self.train_samples[i] for i in mine]
        return [self.augment(self.train_samples[i], (self.config.seed, epoch, i)) for i in mine]

    def _batches(self, order: list[int], epoch: int, start: int) -> Iterator[Batch]:
        """This epoch's batches from `start` on, in order. With `loader_workers`, forked processes build
        them ahead of the training step (image decoding, processing and tokenising are CPU work a GPU
        would otherwise wait for); the batches are the same either way."""

        def build(index: int) -> Batch:
            return self.backend.build_batch(self._local_batch(order, index, epoch), max_length=self.max_length)

        indices = range(start, self.batches_per_epoch())
        if self.config.loader_workers == 0:
            return map(build, indices)
        loader = torch.utils.data.DataLoader(
            _Built(build, indices),
            batch_size=None,
            num_workers=self.config.loader_workers,
            collate_fn=_as_is,
            worker_init_fn=_one_thread,
            prefetch_factor=4,
            # fork: workers inherit the backend's processor and tokenizer instead of unpickling them
            multiprocessing_context="fork",
        )
        return iter(loader)

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        target = self.ckpt_dir / f"step-{self.position.step:07d}"
        acc.wait_for_everyone()
        # every process writes its shards of a sharded model into rank 0's temporary folder, which
        # rank 0 renames into place once all are written
        with atomic_dir(target, overwrite=True) if acc.is_main_process else contextlib.nullcontext() as tmp:
            if self.sharded:
                tmp = fsdp.broadcast_path(tmp)
                fsdp.save_sharded(self.model, self.extra, self.optimizer, tmp / "sharded")
                acc.wait_for_everyone()
            if acc.is_main_process:
                if not self.sharded:
                    save_model(self.backend.model, str(tmp / "model.safetensors"))
                    torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                if self.extra is not None and len(list(self.extra.parameters())) and not self.sharded:
                    save_model(self.extra, str(tmp / "extra.safetensors"))  # a sharded checkpoint holds them
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state_all()
                torch.save(rng, tmp / "rng.pt")
                if self.stateful is not None:
                    torch.save(self.stateful.state_dict(), tmp / "objective_state.pt")
                state = {**vars(self.position), "log_window": self.log_window}
                (tmp / "trainer_state.json").write_text(json.dumps(state))
        if acc.is_main_process:
            for old in self.checkpoints()[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.iterdir() if re.fullmatch(r"step-\d{7}", p.name))

    def resume(self) -> bool:
        found = self.checkpoints()
        if not found:
            return False
        latest = found[-1]
        if self.sharded != (latest / "sharded").is_dir():
            written, now = ("fsdp", "ddp") if (latest / "sharded").is_dir() else ("ddp", "fsdp")
            raise DriveKDError(
                f"{latest}: written with train.distributed: {written}, this run has {now}; resume it as it was written"
            )
        if self.sharded:
            fsdp.load_sharded(self.model, self.extra, self.optimizer, latest / "sharded")
        else:
            load_model(self.backend.model, str(latest / "model.safetensors"))
            self.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        if (latest / "extra.safetensors").is_file() and self.extra is not None:
            load_model(self.extra, str(latest / "extra.safetensors"))
        self.scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
        if self.stateful is not None:
            self.stateful.load_state_dict(torch.load(latest / "objective_state.pt", weights_only=True))
        rng = torch.load(latest / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_as_python_state(rng["python"]))
        state = json.loads((latest / "trainer_state.json").read_text())
        self.log_window = state.pop("log_window")
        self.position = Position(**state)
        self._trim_metrics(self.position.step)
        return True

    def run(
        self,
        resolved_config: str,
        data_stats: dict[str, int],
        *,
        resume: bool = False,
        header: dict[str, float] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Path:
        """Record the config, train (from the last checkpoint when resuming), save HF weights. Whether
        the folder may be started or resumed is the caller's `RunFolder.check`, made before any work;
        `header` is logged beside the data counts on a fresh start (e.g. calibrated loss weights)."""
        if resume and not self.resume():
            raise DriveKDError(f"{self.run_dir}: --resume given but there is no checkpoint to resume from")
        if self.position.step > self.total_steps:
            raise DriveKDError(
                f"{self.run_dir}: the checkpoint is at step {self.position.step}, past this config's "
                f"{self.total_steps} steps"
            )
        if resume and self.position.step == self.total_steps and RunFolder(self.run_dir).finished:
            return self.run_dir / "final"  # finished at this many steps: nothing to train, nothing written
        if on_start is not None and self.accelerator.is_main_process:
            on_start()  # e.g. the run folder records what run it holds
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(resolved_config, encoding="utf-8")
            if not resume:  # a fresh start replaces the log of an earlier attempt that never checkpointed
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
                stats = {
                    **data_stats,
                    **({"val_kept_own_images": self.val_kept_own_images} if self.config.val_other_images else {}),
                }
                self._log({"step": self.position.step, **{f"data_{k}": v for k, v in stats.items()}, **(header or {})})
        self.train()
        return self.save_final()

    # ---- metrics ---------------------------------------------------------------------------
    def _log(self, record: dict[str, float | int]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    writer.add_scalar(k, v, record["step"])

    def _tensorboard(self) -> object | None:
        """A TensorBoard writer when the `tensorboard` package is installed (metrics.jsonl always)."""
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._writer = None
        return self._writer

    def _trim_metrics(self, step: int) -> None:
        file = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and file.is_file():
            lines = file.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= step]
            if keep != lines:  # a log with nothing past the checkpoint is left as it is
                file.write_text("".join(k + "\n" for k in keep))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val_samples:
            return {}
        self.model.eval()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}  # per metric: a batch may not report every metric
        rank, ranks = self.accelerator.process_index, self.accelerator.num_processes
        self._accumulate(self.val_samples, rank, ranks, "", totals, counts, max_length=self.max_length)
        if self.val_other_images:
            # Another scene's images may expand to more visual tokens (dynamic resolution): no length cap.
            self._accumulate(self.val_other_images, rank, ranks, "_other_images", totals, counts, max_length=None)
        self.model.train()
        keys = sorted(totals)
        if ranks > 1:  # a rank whose batches never reported a metric still reduces it
            keys = sorted({k for rank_keys in gather_object([keys]) for k in rank_keys})
        out = torch.tensor(
            [totals.get(k, 0.0) for k in keys] + [counts.get(k, 0) for k in keys],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        out = self.accelerator.reduce(out, reduction="sum")
        metrics = {f"val_{k}": float(out[i] / max(out[len(keys) + i], 1)) for i, k in enumerate(keys)}
        if "val_ce" in metrics and "val_ce_other_images" in metrics:
            metrics["val_image_gain"] = metrics["val_ce_other_images"] - metrics["val_ce"]
        return metrics

    def _accumulate(
        self,
        every: list[Sample],
        rank: int,
        ranks: int,
        suffix: str,
        totals: dict[str, float],
        counts: dict[str, int],
        *,
        max_length: int | None,
    ) -> None:
        """Add this process's share of `every` (samples rank, rank + ranks, ...) to the sums."""
        size = self.config.micro_batch_size
        samples = every[rank::ranks]
        starts = list(range(0, len(samples), size))
        if self.sharded:
            # a sharded forward is collective: every process runs as many batches as the busiest, the
            # extra ones on a sample it then leaves out of the sums
            busiest = math.ceil(math.ceil(len(every) / ranks) / size)
            for _ in range(busiest - len(starts)):
                self.val_objective(
                    self.model, self.backend.build_batch(every[:1], max_length=max_length).to(self.accelerator.device)
                )
        for i in starts:
            batch = self.backend.build_batch(samples[i : i + size], max_length=max_length)
            # a batch's CE is its mean over answer tokens, so batches weigh by their answer tokens and the
            # set's CE is the same whatever the batch size; other metrics are per-sample means
            tokens = int(answer_positions(batch.labels).sum())
            for k, v in self.val_objective(self.model, batch.to(self.accelerator.device)).items():
                if isinstance(v, tuple):  # (mean, over how many): a metric of some samples only
                    v, weight = v
                else:
                    weight = tokens if k in TOKEN_MEAN_METRICS else len(batch)
                totals[k + suffix] = totals.get(k + suffix, 0.0) + float(v) * weight
                counts[k + suffix] = counts.get(k + suffix, 0) + weight

    @torch.no_grad()
    def ranks_identical(self) -> bool:
        """Whether every process holds the same weights (a DDP sanity check, logged at the end)."""
        params = [*self.backend.model.parameters(), *(self.extra.parameters() if self.extra is not None else [])]
        params = [p for p in params if not fsdp.is_sharded(p)]  # shards differ by design
        if not params:
            return True
        sums = torch.stack([p.double().sum() for p in params] + [p.double().abs().sum() for p in params])
        gathered = self.accelerator.gather(sums.to(self.accelerator.device)[None])
        return bool((gathered == gathered[0]).all())

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        pos = self.position
        bar = progress.bar(
            total=self.total_steps, initial=pos.step, desc="train", unit="step", disable=not acc.is_main_process
        )
        # loss sums since the last log line: restored on resume, so that line averages the same steps.
        # Each process sums its own micro-batches and a log line sums over processes; a checkpoint
        # holds those sums over all processes, so one process takes them back, not every one (a
        # checkpoint from before that, several processes' but holding the main one's sums, gives none)
        summed = acc.num_processes == 1 or bool(self.log_window.get("over_processes"))
        restored = acc.is_main_process and summed
        window: dict[str, float] = dict(self.log_window["sums"]) if restored else {}
        # each figure's mean is over the micro-batches (or steps) that reported it: an amortised AGP
        # step reports no coefficients, and is no zero in their mean
        counts: dict[str, int] = (
            dict(self.log_window.get("counts") or dict.fromkeys(window, self.log_window["n"])) if restored else {}
        )
        window_n, window_samples, window_start = int(self.log_window["n"]), 0, time.perf_counter()
        last: dict[str, float] = {}
        validated: tuple[int, dict[str, float]] = (-1, {})
        while pos.step < self.total_steps:
            order = self.epoch_order(pos.epoch)
            batches = self._batches(order, pos.epoch, pos.batch_in_epoch)
            while pos.batch_in_epoch < self.batches_per_epoch() and pos.step < self.total_steps:
                in_step = micro_batches_in_step(pos.batch_in_epoch, self.batches_per_epoch(), cfg.grad_accum)
                for micro in range(in_step):
                    index = pos.batch_in_epoch + micro
                    batch = next(batches).to(acc.device)
                    more = micro + 1 < in_step or pos.step + 1 < self.total_steps  # a next one in this run
                    if self.prefetch is not None and more and index + 1 < self.batches_per_epoch():
                        self.prefetch([self.train_samples[i].id for i in self._local_indices(order, index + 1)])
                    sync = micro == in_step - 1
                    # FSDP reduces every micro-batch: skipping it would hold whole, unsharded gradients
                    skip_sync = not sync and not self.sharded
                    ctx = acc.no_sync(self.model) if skip_sync else contextlib.nullcontext()
                    with ctx, acc.autocast():
                        losses = self.objective(self.model, batch)
                        if self.sharded:
                            fsdp.check_sharded(self.model)
                        # the step's gradient is the mean over its micro-batches, an epoch's short last step too
                        scaled = {k: v / in_step for k, v in losses.items()}
                        extra = self.backward(scaled, acc, pos.step)
                    for k, v in {**{k: float(v.detach()) for k, v in losses.items()}, **extra}.items():
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                    window_n += 1
                    window_samples += len(batch) * acc.num_processes
                pos.batch_in_epoch += in_step
                if self.before_step is not None:
                    for k, v in self.before_step(acc, pos.step).items():
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                if self.extra is not None and acc.num_processes > 1:
                    # DDP averages the wrapped model's gradients only; these are averaged here (where a
                    # gradient strategy already averaged them, averaging equal values changes nothing)
                    for p in self.extra.parameters():
                        if p.grad is not None:
                            p.grad.copy_(acc.reduce(p.grad, reduction="mean"))
                if cfg.max_grad_norm is not None:
                    trained = [p for g in self.optimizer.param_groups for p in g["params"]]
                    if self.sharded:
                        fsdp.clip_grad_norm(trained, cfg.max_grad_norm)
                    else:
                        acc.clip_grad_norm_(trained, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                bar.update(1)
                if pos.step % cfg.log_every == 0 or pos.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    sums, reported = self._over_processes(window, counts)
                    last = {k: v / reported[k] for k, v in sums.items()}
                    record = {
                        "step": pos.step,
                        "epoch": pos.epoch,
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        **last,
                    }
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{sum(v for k, v in last.items() if k in losses):.3f}",
                        lr=f"{record['lr']:.2e}",
                        sps=f"{record['samples_per_s']:.1f}",
                    )
                    window, counts, window_n, window_samples, window_start = {}, {}, 0, 0, time.perf_counter()
                if cfg.eval_every and pos.step % cfg.eval_every == 0:
                    validated = (pos.step, self.validate())
                    self._log({"step": pos.step, **validated[1]})
                if cfg.save_every and pos.step % cfg.save_every == 0:
                    sums, reported = self._over_processes(window, counts)
                    self.log_window = {"sums": sums, "counts": reported, "n": window_n, "over_processes": True}
                    self.save_checkpoint()
            if pos.batch_in_epoch >= self.batches_per_epoch():
                pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        bar.close()
        if acc.num_processes > 1:
            self._log({"step": pos.step, "ranks_identical": self.ranks_identical()})
        if validated[0] == pos.step:  # the last step was just validated: one val line, not two
            final_val = validated[1]
        else:
            final_val = self.validate()
            if final_val:
                self._log({"step": pos.step, **final_val})
        return {**last, **final_val}

    def _over_processes(self, sums: dict[str, float], counts: dict[str, int]) -> tuple[dict, dict]:
        """Logged sums and counts added up over the processes (every process calls it): a log line
        is the mean over the global batch's micro-batches, not over the main process's share."""
        if self.accelerator.num_processes == 1:
            return dict(sums), dict(counts)
        keys = sorted({k for rank_keys in gather_object([sorted(sums)]) for k in rank_keys})
        both = torch.tensor(
            [sums.get(k, 0.0) for k in keys] + [float(counts.get(k, 0)) for k in keys],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        both = self.accelerator.reduce(both, reduction="sum").cpu().tolist()
        return dict(zip(keys, both[: len(keys)], strict=True)), {
            k: int(c) for k, c in zip(keys, both[len(keys) :], strict=True)
        }

    def save_final(self) -> Path:
        target = self.run_dir / "final"
        self.accelerator.wait_for_everyone()
        whole = fsdp.full_model_state(self.model) if self.sharded else None  # every process takes part
        if self.accelerator.is_main_process:
            with atomic_dir(target, overwrite=True) as tmp:
                self.backend.save(tmp, fsdp.whole_copy(self.model, whole) if whole is not None else None)
        self.accelerator.wait_for_everyone()
        return target


class _Built(torch.utils.data.Dataset):
    """Batch number i of an epoch (from its start offset), built on demand."""

    def __init__(self, build: Callable[[int], Batch], indices: range) -> None:
        self.build, self.indices = build, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        return self.build(self.indices[i])


def _as_is(batch: Batch) -> Batch:
    return batch


def _one_thread(worker: int) -> None:
    torch.set_num_threads(1)  # several workers, each with a full thread pool, would oversubscribe the CPUs


def _as_python_state(state: object) -> tuple:
    """random.setstate wants nested tuples; torch.load may hand back lists."""
    if isinstance(state, list | tuple):
        return tuple(_as_python_state(s) for s in state)
    return state  # type: ignore[return-value]
