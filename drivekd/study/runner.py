"""`drivekd reproduce`: the whole Drive-KD study on DriveSim-QA, resumable step by step.

A study directory holds `study.json` (the profile's settings; another profile's directory is
refused), then one folder per step. A step is done when its output exists, so a killed study picks
up where it stopped; a student run that fails is recorded in `failed.json` beside its checkpoints,
reported with its error, and retried by the next invocation. Every student run goes through the same
`run_sft` / `run_distill` a user calls; nothing here knows a capability's layers or a model family.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from drivekd.atomic import atomic_file
from drivekd.data.sample import CAPABILITIES
from drivekd.errors import DriveKDError
from drivekd.extras import PLOTTING, SIMULATOR, require
from drivekd.study.profiles import STUDENT, Profile, Variant, load_variants
from drivekd.train.config import (
    CombineConfig,
    DataConfig,
    DistillConfig,
    ModelConfig,
    SFTConfig,
    TeacherConfig,
    TrainConfig,
)
from drivekd.train.run_folder import RunFolder
from drivekd.yamlfile import read_yaml

SPLITS = ("val", "test")
# The image-blind control: the test split with every sample shown another scene's cameras.
CONTROL = "test-other-images"
HEARTBEAT_S = 60.0  # how often a study running parallel jobs says what is running


def _write_json(path: Path, value: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _done(run_dir: Path) -> bool:
    return RunFolder(run_dir).finished


def _current_cache(folder: Path) -> bool:
    from drivekd.distill.cache import FORMAT, cache_format

    return cache_format(folder) == FORMAT


def _has_checkpoints(run_dir: Path) -> bool:
    return RunFolder(run_dir).has_checkpoint()


@dataclass(frozen=True)
class Step:
    """One resumable piece of a study: a `Study` method and its arguments.

    `needs` names the steps whose outputs it reads; `row` ("variant/seed-N") marks a student step,
    whose failure is recorded for that row while the study goes on; an `inline` step runs in the
    study's own process when nothing else runs (data generation starts its own processes; the
    deployment benchmark times models and must not share the cores)."""

    name: str
    method: str
    args: tuple[Any, ...] = ()
    needs: tuple[str, ...] = ()
    row: str | None = None
    inline: bool = False


@dataclass(frozen=True)
class StudentRun:
    """One trained student: a variant at a seed, on all data or on one capability's split."""

    variant: Variant
    seed: int
    capability: str | None

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed-{self.seed}" + (f"/{self.capability}" if self.capability else "")


def _card(model: str) -> dict[str, Any]:
    """A model folder's card (shipped bases have one), or {}."""
    card = Path(model) / "card.json"
    return json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}


class Study:
    def __init__(self, out: Path, profile: Profile, *, workers: int = 2, jobs: int = 1, echo: Any = click.echo) -> None:
        self.out = out
        self.profile = profile
        self.workers = workers
        self.jobs = jobs
        self.echo = echo
        self.variants = load_variants()
        self.data = out / "data"
        from drivekd.models.loading import resolve_model

        self.teacher = resolve_model(profile.teacher)  # a shipped model's folder, a checkpoint or a preset
        self.student = resolve_model(profile.student)

    # ---- bookkeeping -----------------------------------------------------------------------
    def check_disjoint(self) -> None:
        """Refuse data on scenes a pretrained teacher or student was trained or scored on."""
        from drivekd.study.bases import BASE_SEEDS

        seed = self.profile.data_seed
        for role, spec in (("teacher", self.teacher), ("student", self.student)):
            seeds = _card(spec).get("seeds", [])
            if seed in seeds:
                raise DriveKDError(
                    f"profile {self.profile.name!r}: data seed {seed} is one the {role} {spec} was trained on "
                    f"(its card lists seeds {seeds}); its test scores would be on seen scenes"
                )
        if seed in BASE_SEEDS:
            raise DriveKDError(
                f"profile {self.profile.name!r}: data seed {seed} is in {BASE_SEEDS}, reserved for the shipped bases"
            )

    def claim(self) -> None:
        """Write study.json, or refuse a directory that holds another configuration's study."""
        self.check_disjoint()
        settings = self.profile.settings()
        # a model's name is not its weights: a reinstalled base must not resume a study begun with
        # the one it replaced
        for role, spec in (("teacher", self.teacher), ("student", self.student)):
            sha = _card(spec).get("weights_sha256")
            if sha is not None:
                settings[f"{role}_weights_sha256"] = sha
        file = self.out / "study.json"
        if file.is_file():
            existing = json.loads(file.read_text(encoding="utf-8")).get("settings")
            if existing != settings:
                diff = sorted(
                    k for k in set(settings) | set(existing or {}) if (existing or {}).get(k) != settings.get(k)
                )
                raise DriveKDError(
                    f"{self.out}: holds a study with other settings (differs in: {', '.join(diff)}); "
                    "choose another --out, or delete it"
                )
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise DriveKDError(f"{self.out}: exists and is not a drivekd study (no study.json); choose another --out")
        _write_json(file, {"settings": settings, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def log_time(self, step: str, seconds: float) -> None:
        with open(self.out / "timings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "seconds": round(seconds, 1), "end": round(time.time(), 1)}) + "\n")

    def timed(self, step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.echo(f"[reproduce] {step} ...")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.log_time(step, elapsed)
        self.echo(f"[reproduce] {step}: {elapsed:.0f} s")
        return result

    # ---- the study ---------------------------------------------------------------------------
    def run(self, seeds: Sequence[int] | None = None) -> Path:
        """Every step not yet done. `seeds` restricts the student runs to those seeds (so seeds can
        run side by side in separate processes); the deployment table waits for a run without it."""
        require(SIMULATOR + PLOTTING, "drivekd reproduce (DriveSim-QA data and the report's plots)")
        self.claim()
        unknown = sorted(set(seeds or ()) - set(self.profile.seeds))
        if unknown:
            raise DriveKDError(
                f"seed(s) {unknown} are not in profile {self.profile.name!r} (seeds {list(self.profile.seeds)})"
            )
        self.execute(self.plan(seeds))
        from drivekd.study.report import write_report

        return self.timed("report", write_report, self.out)

    def plan(self, seeds: Sequence[int] | None) -> list[Step]:
        """The steps not yet done, in the order a free job takes them when several are ready: teacher
        targets first (the distilled students wait on them), then each student row (training, then
        its evaluations, so a partial study has whole rows), then the teacher's evaluations."""
        candidates: list[tuple[bool, Step]] = []  # (done, step)

        def add(done: bool, name: str, method: str, *args: Any, needs: Sequence[str] = (), **kw: Any) -> None:
            candidates.append((done, Step(name, method, args, tuple(needs), **kw)))

        add((self.data / "card.json").is_file(), "data", "generate_data", inline=True)
        add((self.out / "prestudy" / "recipe.yaml").is_file(), "prestudy", "prestudy", needs=["data"])
        add((self.out / "recipes" / "calibration.json").is_file(), "calibrate", "calibrate", needs=["prestudy"])
        for recipe, cap in self.recipe_keys():
            done = _current_cache(self.cache_dir(recipe, cap))
            add(done, self.cache_step(recipe, cap), "make_cache", recipe, cap, needs=["calibrate"])
        for seed in seeds if seeds is not None else self.profile.seeds:  # seed-major: partial studies have whole rows
            for name in self.profile.variants:
                variant, row = self.variants[name], f"{name}/seed-{seed}"
                if all(self.pred_file(name, seed, s).is_file() for s in (*SPLITS, CONTROL)):
                    continue
                caps = CAPABILITIES if variant.per_capability else (None,)
                runs = [StudentRun(variant, seed, cap) for cap in caps]
                for run in runs:
                    needs = ["data", self.cache_step(variant.recipe, run.capability)] if variant.distills else ["data"]
                    add(_done(self.run_dir(run)), f"train {run.key}", "train_student", run, needs=needs, row=row)
                trained = [f"train {run.key}" for run in runs]
                for split in (*SPLITS, CONTROL):
                    done = self.pred_file(name, seed, split).is_file()
                    add(done, f"eval {row} {split}", "evaluate_students", runs, split, needs=trained, row=row)
        for split in ("test", CONTROL):  # no choice is made on the teacher's val score
            done = self.pred_file("teacher", None, split).is_file()
            add(done, f"eval teacher {split}", "evaluate_teacher", split, needs=["data"])
        for split in SPLITS:
            done = self.pred_file("majority", None, split).is_file()
            add(done, f"eval majority {split}", "majority", split, needs=["data"])
        if seeds is None:
            trained = [step.name for _, step in candidates if step.method == "train_student"]
            add((self.out / "mechanism.json").is_file(), "mechanism", "mechanism", needs=["data", *trained])
            # timed figures: measured alone, with no other job sharing the cores
            done = (self.out / "bench" / "infer.json").is_file()
            add(done, "bench infer", "bench", needs=["data", *trained], inline=True)
        todo = {step.name for done, step in candidates if not done}
        by_name = {step.name: step for _, step in candidates}

        def waits_for(step: Step) -> list[str]:
            # a need already done is looked through: what it read may be redone now (a deleted
            # calibration.json is redone while the caches made from it stay), and the step waits for that
            out: list[str] = []
            for need in step.needs:
                for name in [need] if need in todo else waits_for(by_name[need]) if need in by_name else []:
                    if name not in out:
                        out.append(name)
            return out

        return [dataclasses.replace(step, needs=tuple(waits_for(step))) for done, step in candidates if not done]

    def execute(self, steps: Sequence[Step]) -> None:
        """Run the steps, up to `jobs` at once in worker processes (each with its share of the CPU
        threads), every step as soon as the steps it needs are done. A student step that fails is
        recorded in its row's `failed.json` and skips that row's later steps (the mechanism and the
        deployment table use the students that trained); any other failure starts nothing more, lets
        the running steps finish (recorded as done, so the next run skips them) and is then raised."""
        for row in {s.row for s in steps if s.row}:  # a failed student row is tried again now
            (self.out / "runs" / row / "failed.json").unlink(missing_ok=True)
        pending = list(steps)
        finished: set[str] = set()
        failed: set[str] = set()
        running: dict[Future[float], Step] = {}
        started: dict[str, float] = {}
        stopped_by: Exception | None = None  # a failure that is not a student's
        pool = None
        if self.jobs > 1 and any(not s.inline for s in steps):
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, cores // self.jobs)
            pool = ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(threads,),
            )
        try:
            while pending or running:
                if stopped_by is not None:
                    pending.clear()
                for step in [s for s in pending if s.row and any(n in failed for n in s.needs)]:
                    pending.remove(step)  # a failed student's evaluations
                    failed.add(step.name)
                ready = [s for s in pending if all(n in finished or n in failed for n in s.needs)]
                if not ready and not running:
                    if pending:
                        raise RuntimeError(f"study steps wait on each other: {[s.name for s in pending]}")
                    break  # the last steps were a failed student's evaluations
                step = ready[0] if ready else None
                if step is not None and (pool is None or step.inline) and not running:
                    pending.remove(step)
                    self.echo(f"[reproduce] {step.name} ...")
                    start = time.perf_counter()
                    try:
                        getattr(self, step.method)(*step.args)
                    except Exception as e:  # recorded for its row, or raised
                        self._step_failed(step, e, failed)
                    else:
                        self._step_done(step, time.perf_counter() - start, finished)
                    continue
                for step in ready:
                    if pool is None or step.inline or len(running) >= self.jobs:
                        break
                    pending.remove(step)
                    self.echo(f"[reproduce] {step.name} ... ({len(running) + 1} of {self.jobs} jobs busy)")
                    running[pool.submit(_step_in_worker, self.out, self.profile, self.workers, step)] = step
                    started[step.name] = time.perf_counter()
                if not running:
                    continue
                done, _ = wait(running, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                if not done:  # jobs show no progress bars: say what is running, and for how long
                    now = time.perf_counter()
                    busy = ", ".join(f"{s.name} ({now - started[s.name]:.0f} s)" for s in running.values())
                    self.echo(f"[reproduce] running: {busy}")
                for future in done:
                    step = running.pop(future)
                    try:
                        seconds = future.result()
                    except BrokenProcessPool as e:  # a job's process died: no step result to trust
                        raise DriveKDError(
                            f"a study job's process died (killed, or out of memory) while running {step.name}; "
                            "run the command again to resume (or with --jobs 1)"
                        ) from e
                    except Exception as e:
                        try:
                            self._step_failed(step, e, failed)
                        except Exception as fatal:
                            stopped_by = stopped_by or fatal
                    else:
                        self._step_done(step, seconds, finished)
            if stopped_by is not None:
                raise stopped_by
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _step_done(self, step: Step, seconds: float, finished: set[str]) -> None:
        finished.add(step.name)
        self.log_time(step.name, seconds)
        self.echo(f"[reproduce] {step.name}: {seconds:.0f} s")

    def _step_failed(self, step: Step, error: Exception, failed: set[str]) -> None:
        if step.row is None:
            raise error
        failed.add(step.name)
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        _write_json(
            self.out / "runs" / step.row / "failed.json",
            {"error": message, "traceback": "".join(traceback.format_exception(error))},
        )
        self.echo(f"[reproduce] {step.row} FAILED: {message}")

    def report(self) -> Path:
        """Rebuild report.md / results.json from whatever the study holds, running nothing else."""
        from drivekd.study.report import write_report

        if not (self.out / "study.json").is_file():
            raise DriveKDError(f"{self.out}: not a drivekd study (no study.json)")
        self.claim()
        return write_report(self.out)

    def generate_data(self) -> None:
        from drivekd.data.drivesim.generate import GenerateConfig, generate

        p = self.profile
        config = GenerateConfig(scenes=p.scenes, seed=p.data_seed, split_fractions=p.split)
        generate(self.data, config, workers=self.workers, overwrite=True)

    # ---- configs -----------------------------------------------------------------------------
    def train_config(
        self, output_dir: Path, *, epochs: float, lr: float, seed: int, eval_every: int | None
    ) -> TrainConfig:
        return TrainConfig(
            output_dir=str(output_dir), epochs=epochs, lr=lr, seed=seed, eval_every=eval_every, **STUDENT["train"]
        )

    def data_config(self, capability: str | None) -> DataConfig:
        return DataConfig(path=str(self.data), capability=capability, **STUDENT["data"])

    def student_config(self, run: StudentRun) -> SFTConfig | DistillConfig:
        p = self.profile
        common = {
            "model": ModelConfig(name=self.student, seed=run.seed),
            "data": self.data_config(run.capability),
            "train": self.train_config(
                self.run_dir(run), epochs=p.student_epochs, lr=p.student_lr, seed=run.seed, eval_every=None
            ),
        }
        v = run.variant
        if not v.distills:
            return SFTConfig(**common)
        return DistillConfig(
            **common,
            teacher=TeacherConfig(name=str(self.teacher), cache=str(self.cache_dir(v.recipe, run.capability))),
            recipe=str(self.recipe_file(v.recipe, run.capability, v.kd_share)),
            mixing=v.mixing,
            combine=CombineConfig(strategy=v.strategy, amortize_every=v.amortize_every),
        )

    # ---- pre-study, calibration ------------------------------------------------------------------
    def prestudy(self) -> None:
        from drivekd.data.general import generate_general
        from drivekd.eval.prestudy import run_prestudy

        general = self.out / "general"
        if not (general / "test.jsonl").is_file():
            generate_general(general, samples=self.profile.prestudy_samples, seed=self.profile.data_seed)
        run_prestudy(
            str(self.teacher),
            self.data,
            self.out / "prestudy",
            general_dir=general,
            split="val",
            max_samples=self.profile.prestudy_samples,
        )

    def source_recipe(self, recipe: str, capability: str | None) -> dict[str, dict[str, Any]]:
        """The recipe's signals as YAML data; `prestudy` is the pre-study's recommendation."""
        from drivekd.distill.engine import RECIPES

        path = self.out / "prestudy" / "recipe.yaml" if recipe == "prestudy" else RECIPES / f"{recipe}.yaml"
        signals = read_yaml(path) or {}
        if capability is not None:
            if capability not in signals:
                raise DriveKDError(f"{path}: no {capability!r} signal for the single-capability protocol")
            signals = {capability: signals[capability]}
        return signals

    def recipe_keys(self) -> list[tuple[str, str | None]]:
        keys = []
        for name in self.profile.variants:
            v = self.variants[name]
            if v.distills:
                for cap in CAPABILITIES if v.per_capability else (None,):
                    keys.append((v.recipe, cap))
        return list(dict.fromkeys(keys))

    @staticmethod
    def _key(recipe: str, capability: str | None) -> str:
        return recipe + (f"-{capability}" if capability else "")

    def calibrate(self) -> None:
        """Per recipe, weights making each signal's loss `kd_share` x CE on the untrained student.

        Measured with the live teacher on the first batches of the recipe's own training data, so
        the weights are a property of (teacher, student preset, recipe, data), not guessed.
        """
        from drivekd.distill.calibrate import initial_losses, weights_for_shares
        from drivekd.train.sft import load_model, load_training_data
        from drivekd.train.trainer import calibration_sample

        p = self.profile
        calibration: dict[str, Any] = {"kd_share": p.kd_share, "recipes": {}}
        student = load_model(ModelConfig(name=self.student, seed=0))  # forward passes only: loaded once
        for recipe, cap in self.recipe_keys():
            signals = self.source_recipe(recipe, cap)
            raw_file = self.out / "recipes" / f"{self._key(recipe, cap)}.source.yaml"
            with atomic_file(raw_file) as tmp:
                tmp.write_text(yaml.safe_dump({n: {**f, "weight": 1.0} for n, f in signals.items()}), encoding="utf-8")
            data = self.data_config(cap)
            train, _, _ = load_training_data(data, student)
            config = DistillConfig(
                model=ModelConfig(name=self.student),
                data=data,
                train=TrainConfig(output_dir=str(self.out / "recipes")),
                teacher=TeacherConfig(name=str(self.teacher)),
                recipe=str(raw_file),
            )
            # the random sample the first seed's `drivekd distill` run would measure on
            train_config = self.train_config(
                self.out / "recipes", epochs=p.student_epochs, lr=p.student_lr, seed=p.seeds[0], eval_every=None
            )
            batches = config.calibration_batches
            first = calibration_sample(train, train_config, batches)
            totals = initial_losses(config, student, first, batches=batches, batch_size=train_config.micro_batch_size)
            weights = weights_for_shares(totals, dict.fromkeys(signals, p.kd_share))
            calibration["recipes"][self._key(recipe, cap)] = {"initial_losses": totals, "weights": weights}
        _write_json(self.out / "recipes" / "calibration.json", calibration)

    def recipe_file(self, recipe: str, capability: str | None, share: float | None) -> Path:
        """The calibrated recipe YAML for a loss share (written on first use)."""
        share = self.profile.kd_share if share is None else share
        key = self._key(recipe, capability)
        path = self.out / "recipes" / f"{key}@{share:g}.yaml"
        if not path.is_file():
            weights = json.loads((self.out / "recipes" / "calibration.json").read_text())["recipes"][key]["weights"]
            scale = share / self.profile.kd_share
            signals = self.source_recipe(recipe, capability)
            body = {n: {**f, "weight": float(f"{weights[n] * scale:.6g}")} for n, f in signals.items()}
            with atomic_file(path) as tmp:
                tmp.write_text(
                    f"# {key}: weights calibrated so each loss starts at {share:g} x CE (recipes/calibration.json)\n"
                    + yaml.safe_dump(body, sort_keys=False),
                    encoding="utf-8",
                )
        return path

    def cache_dir(self, recipe: str, capability: str | None) -> Path:
        return self.out / "caches" / self._key(recipe, capability)

    def cache_step(self, recipe: str, capability: str | None) -> str:
        return f"teacher cache {self._key(recipe, capability)}"

    def make_cache(self, recipe: str, capability: str | None) -> None:
        """Teacher targets of a recipe over its data subset, computed once for every seed and weighting."""
        from drivekd.distill.run import run_cache_teacher

        folder = self.cache_dir(recipe, capability)
        if _current_cache(folder):
            return
        if folder.exists():  # written by an earlier drivekd: its targets are made again
            shutil.rmtree(folder)
        variant = Variant(name="cache", recipe=recipe, per_capability=capability is not None)
        config = self.student_config(StudentRun(variant, self.profile.seeds[0], capability))
        assert isinstance(config, DistillConfig)
        run_cache_teacher(config, folder)

    # ---- students ------------------------------------------------------------------------------
    def run_dir(self, run: StudentRun) -> Path:
        return self.out / "runs" / run.key

    def pred_file(self, name: str, seed: int | None, split: str) -> Path:
        return self.out / "preds" / name / (f"seed-{seed}" if seed is not None else "") / f"{split}.jsonl"

    def train_student(self, run: StudentRun) -> None:
        from drivekd.distill.run import run_distill
        from drivekd.train.sft import run_sft

        config = self.student_config(run)
        clean_partial(self.run_dir(run))
        resume = _has_checkpoints(self.run_dir(run))
        if isinstance(config, DistillConfig):
            self.make_cache(run.variant.recipe, run.capability)
            run_distill(config, resume=resume)
        else:
            run_sft(config, resume=resume)

    def split_samples(self, split: str) -> list[Any]:
        from drivekd.data.formats import load_split
        from drivekd.data.sample import image_blind_control

        if split == CONTROL:
            # other scenes' images from any split (the test split of a small study may hold one scene);
            # test first, so its scenes lend to each other as far as they can
            test = load_split(self.data, "test")
            pool = [*test, *load_split(self.data, "val"), *load_split(self.data, "train")]
            swapped, kept_own = image_blind_control(test, source=f"{self.data} (test)", pool=pool)
            if kept_own:
                print(
                    f"warning: {kept_own} test samples have no other scene and keep their own images", file=sys.stderr
                )
            return swapped
        return load_split(self.data, split)

    def evaluate_students(self, runs: list[StudentRun], split: str) -> None:
        from drivekd.eval.predict import write_records

        samples = self.split_samples(split)
        parts = []
        for run in runs:
            mine = [s for s in samples if run.capability in (None, s.capability)]
            parts.append(self._predict(self.run_dir(run) / "final", mine))
        first = runs[0]
        write_records([r for p in parts for r in p], self.pred_file(first.variant.name, first.seed, split))

    def _predict(self, model: Path, samples: list[Any]) -> list[dict[str, Any]]:
        from drivekd.eval.predict import generate_records
        from drivekd.models.loading import load_backend

        backend = load_backend(str(model))
        p = self.profile
        return generate_records(backend, samples, batch_size=p.eval_batch_size, max_new_tokens=p.eval_max_new_tokens)[0]

    def evaluate_teacher(self, split: str) -> None:
        from drivekd.eval.predict import write_records

        records = self._predict(self.teacher, self.split_samples(split))
        write_records(records, self.pred_file("teacher", None, split))

    def majority(self, split: str) -> None:
        from drivekd.data.formats import load_split
        from drivekd.eval.baselines import majority_records
        from drivekd.eval.predict import write_records

        records = majority_records(load_split(self.data, "train"), load_split(self.data, split))
        write_records(records, self.pred_file("majority", None, split))

    def mechanism(self) -> None:
        """Attention mass on the asked-about object's visual token: teacher, each all-data student."""
        from drivekd.data.formats import load_split
        from drivekd.eval.attention import tagged_attention
        from drivekd.models.loading import load_backend

        samples = load_split(self.data, "test")[: self.profile.mechanism_samples]
        models = {"teacher": str(self.teacher), "student base": str(self.student)}
        for name in self.profile.variants:
            if not self.variants[name].per_capability:
                for seed in self.profile.seeds:
                    run = self.out / "runs" / name / f"seed-{seed}"
                    if _done(run):
                        models[f"{name}/seed-{seed}"] = str(run / "final")
        _write_json(
            self.out / "mechanism.json", {k: tagged_attention(load_backend(v), samples) for k, v in models.items()}
        )

    # ---- deployment --------------------------------------------------------------------------
    def deployed_student(self) -> Path | None:
        """The student the deployment table shows: multi-teacher AGP if it trained, else CE."""
        for name in ("multi-agp", "ce", *self.profile.variants):
            run_dir = self.out / "runs" / name / f"seed-{self.profile.seeds[0]}"
            if _done(run_dir):
                return run_dir / "final"
        return None

    def bench(self) -> None:
        from drivekd.bench.infer import bench_infer

        student = self.deployed_student()
        models = [str(self.teacher)] + ([str(student)] if student else [])
        result = bench_infer(
            models,
            data_dir=self.data,
            split="test",
            batch=1,
            new_tokens=32,
            repeats=self.profile.bench_repeats,
            int8=student is not None,
            score=self.profile.bench_score,
        )
        _write_json(self.out / "bench" / "infer.json", result)


def _worker_init(threads: int) -> None:
    if sys.platform.startswith("linux"):  # a job ends with the study: no orphan writing into a rerun's folders
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    # the study's parallel jobs share the machine's cores; progress bars of several jobs would
    # interleave, so a job reports through the study's start and end lines only
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    import tqdm

    torch.set_num_threads(threads)
    # tqdm reads TQDM_* variables at import, which the worker already did, and callers pass their
    # own `disable` (the trainer's main-process check): force it
    shown = tqdm.tqdm.__init__

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        shown(self, *args, **{**kwargs, "disable": True})

    tqdm.tqdm.__init__ = quiet  # type: ignore[method-assign]


def _step_in_worker(out: Path, profile: Profile, workers: int, step: Step) -> float:
    study = Study(out, profile, workers=workers, echo=lambda _: None)
    start = time.perf_counter()
    getattr(study, step.method)(*step.args)
    return time.perf_counter() - start


def clean_partial(run_dir: Path) -> None:
    """A run killed before its first checkpoint starts again from scratch (its old metrics would mix in)."""
    if run_dir.is_dir() and not _has_checkpoints(run_dir) and not _done(run_dir):
        shutil.rmtree(run_dir)
