"""`drivekd reproduce`: the whole Drive-KD study on DriveSim-QA, resumable step by step.

A study folder holds `study.json` (the profile's settings; another profile's folder is refused), then
one folder per step. A step is done when its output exists, so a killed study picks up where it
stopped. The steps come in chains that run one after the other in one job: the teacher's side (its
pre-study, then its cached targets), each student row (training, then its evaluations), the teacher's
and the majority baseline's evaluations. With `jobs` > 1 the chains run side by side in worker
processes, a chain as soon as the chain it reads has finished. A student row that fails is recorded
in `failed.json` beside its checkpoints, reported with its error, and retried by the next invocation;
any other failure starts nothing more, lets the running chains finish, and is raised.

Every student is a config file trained by the same `run_sft` / `run_distill` a user calls
(study/students.py); nothing here knows a capability's layers or a model family.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click

from drivekd.atomic import write_json
from drivekd.errors import DriveKDError
from drivekd.extras import PLOTTING, SIMULATOR, require
from drivekd.study import students
from drivekd.study.profiles import Profile
from drivekd.study.students import StudentConfigs, StudentRun
from drivekd.train.run_folder import RunFolder, Timings, claim_folder

SPLITS = ("val", "test")
# The image-blind control: the test split with every sample shown another scene's cameras.
CONTROL = "test-other-images"
# DriveBench's robustness settings (profile `robustness`): `robust/SETTING` splits, on a subset of test
ROBUST = "robust/"
ROBUST_CLEAN = ROBUST + "clean"
HEARTBEAT_S = 60.0  # how often a study running parallel jobs says what is running
TEACHER_SIDE = "teacher side"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[], Any]


@dataclass(frozen=True)
class Chain:
    """Steps run one after the other in one job. `after`: the chain whose outputs they read (None:
    the data only). `row`: a student row ("variant/seed-N"), whose failure is recorded for the row
    while the study goes on."""

    name: str
    steps: tuple[Step, ...]
    after: str | None = None
    row: str | None = None


def _card(model: str) -> dict[str, Any]:
    """A model folder's card (shipped bases have one), or {}."""
    card = Path(model) / "card.json"
    return json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}


def _silent(_: str) -> None:
    pass


class Study:
    def __init__(
        self, out: Path, profile: Profile, *, workers: int = 2, jobs: int = 1, echo: Callable[[str], None] = click.echo
    ) -> None:
        from drivekd.models.loading import resolve_model

        self.out = Path(os.path.abspath(out))  # the run configs it writes hold absolute paths
        self.profile = profile
        self.workers = workers
        self.jobs = jobs
        self.echo = echo
        self.data = self.out / "data"
        self.teacher = resolve_model(profile.teacher)  # a shipped model's folder, a checkpoint or a preset
        self.student = resolve_model(profile.student)
        self.configs = StudentConfigs(self.out, profile, str(self.teacher), str(self.student))
        self.timings = Timings(self.out)

    def __getstate__(self) -> dict[str, Any]:
        # a worker process prints its steps' lines only where the study itself prints to the terminal
        return {**self.__dict__, "echo": click.echo if self.echo is click.echo else _silent}

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
        """Write study.json, or refuse a folder that holds another configuration's study."""
        self.check_disjoint()
        settings = self.profile.settings()
        # a model's name is not its weights: a reinstalled base must not resume a study begun with
        # the one it replaced
        for role, spec in (("teacher", self.teacher), ("student", self.student)):
            sha = _card(spec).get("weights_sha256")
            if sha is not None:
                settings[f"{role}_weights_sha256"] = sha
        claim_folder(self.out, "study.json", settings, "study")

    # ---- the study ---------------------------------------------------------------------------
    def run(self, seeds: Sequence[int] | None = None) -> Path:
        """Every step not yet done. `seeds` restricts the student runs to those seeds (so seeds can
        run side by side in separate processes); the mechanism and deployment steps wait for a run
        without it."""
        require(SIMULATOR + PLOTTING, "drivekd reproduce (DriveSim-QA data and the report's plots)")
        self.claim()
        unknown = sorted(set(seeds or ()) - set(self.profile.seeds))
        if unknown:
            raise DriveKDError(
                f"seed(s) {unknown} are not in profile {self.profile.name!r} (seeds {list(self.profile.seeds)})"
            )
        if not (self.data / "card.json").is_file():  # starts its own processes: alone, before the rest
            self.timings.timed("data", self.generate_data, self.echo, "reproduce")
        self.execute(self.plan(seeds))
        if seeds is None:  # read every student; timed figures are measured alone, with no job beside them
            if not (self.out / "mechanism.json").is_file():
                self.timings.timed("mechanism", self.mechanism, self.echo, "reproduce")
            if not (self.out / "bench" / "infer.json").is_file():
                self.timings.timed("bench infer", self.bench, self.echo, "reproduce")
        from drivekd.study.report import write_report

        return self.timings.timed("report", partial(write_report, self.out), self.echo, "reproduce")

    def plan(self, seeds: Sequence[int] | None) -> list[Chain]:
        """The chains of steps not yet done, in the order a free job takes them: the teacher's side
        first (the distilled students wait for it), then each student row, seed by seed (so a partial
        study has whole rows), then the teacher's and the majority's evaluations."""
        cfg = self.configs
        prestudy_todo = not (self.out / "prestudy" / "recipe.yaml").is_file()
        teacher_side = [Step("prestudy", self.prestudy)] if prestudy_todo else []
        for recipe, cap in cfg.recipe_keys():
            # a pre-study made again may choose other signals: its caches are made again with it
            if (prestudy_todo and recipe == "prestudy") or not _current_cache(cfg.cache_dir(recipe, cap)):
                name = f"teacher cache {cfg.key(recipe, cap)}"
                teacher_side.append(Step(name, partial(self.make_cache, recipe, cap)))
        chains = [Chain(TEACHER_SIDE, tuple(teacher_side))]
        for seed in seeds if seeds is not None else self.profile.seeds:
            for name in self.profile.variants:
                runs = cfg.runs(name, seed)
                steps = [
                    Step(f"train {run.key}", partial(students.train, cfg, run))
                    for run in runs
                    if not RunFolder(cfg.run_dir(run)).finished
                ]
                robust = self.robust_splits() if seed == self.profile.seeds[0] else []
                for split in (*SPLITS, CONTROL, *robust):
                    if not self.pred_file(name, seed, split).is_file():
                        steps.append(Step(f"eval {runs[0].row} {split}", partial(self.evaluate_students, runs, split)))
                after = TEACHER_SIDE if runs[0].variant.distills else None
                chains.append(Chain(runs[0].row, tuple(steps), after=after, row=runs[0].row))
        teacher = [  # no choice is made on the teacher's val score
            Step(f"eval teacher {split}", partial(self.evaluate_teacher, split))
            for split in ("test", CONTROL, *self.robust_splits())
            if not self.pred_file("teacher", None, split).is_file()
        ]
        majority = [
            Step(f"eval majority {split}", partial(self.majority, split))
            for split in SPLITS
            if not self.pred_file("majority", None, split).is_file()
        ]
        chains += [Chain("teacher", tuple(teacher)), Chain("majority", tuple(majority))]
        return [chain for chain in chains if chain.steps]

    def execute(self, chains: Sequence[Chain]) -> None:
        """Run the chains, up to `jobs` at once in worker processes (each with its share of the CPU
        threads), each chain once the chain it reads is finished."""
        for chain in chains:  # a failed student row is tried again now
            if chain.row:
                (self.out / "runs" / chain.row / "failed.json").unlink(missing_ok=True)
        pending = list(chains)
        finished = {TEACHER_SIDE} - {c.name for c in chains}  # nothing of the teacher's side left to do
        failed: set[str] = set()
        stopped_by: BaseException | None = None  # a failure that is not a student row's

        def ready() -> list[Chain]:
            for chain in [c for c in pending if c.after in failed]:
                pending.remove(chain)  # what it reads failed
                failed.add(chain.name)
            return [c for c in pending if c.after is None or c.after in finished]

        def settle(chain: Chain, error: BaseException | None) -> None:
            nonlocal stopped_by
            if error is None:
                finished.add(chain.name)
            elif chain.row is None:
                stopped_by = stopped_by or error
            else:
                failed.add(chain.name)
                self._row_failed(chain.row, error)

        if self.jobs == 1:
            while stopped_by is None and (todo := ready()):
                pending.remove(todo[0])
                settle(todo[0], _capture(partial(self.run_chain, todo[0])))
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            import multiprocessing

            with ProcessPoolExecutor(
                self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(max(1, cores // self.jobs),),
            ) as pool:
                running: dict[Future[None], Chain] = {}
                while True:
                    while stopped_by is None and len(running) < self.jobs and (todo := ready()):
                        pending.remove(todo[0])
                        running[pool.submit(self.run_chain, todo[0])] = todo[0]
                    if not running:
                        break
                    done, _ = wait(running, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                    if not done:  # jobs draw no progress bars: say what runs
                        self.echo(f"[reproduce] running: {', '.join(c.name for c in running.values())}")
                    for future in done:
                        chain = running.pop(future)
                        error = future.exception()
                        if isinstance(error, BrokenProcessPool):  # a job's process died: no result to trust
                            raise DriveKDError(
                                f"a study job's process died (killed, or out of memory) while running {chain.name}; "
                                "run the command again to resume (or with --jobs 1)"
                            ) from error
                        settle(chain, error)
        if stopped_by is not None:
            raise stopped_by
        if pending and not failed:
            raise RuntimeError(f"study chains wait on each other: {[c.name for c in pending]}")

    def run_chain(self, chain: Chain) -> None:
        for step in chain.steps:
            self.timings.timed(step.name, step.run, self.echo, "reproduce")

    def _row_failed(self, row: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        write_json(
            self.out / "runs" / row / "failed.json",
            {"error": message, "traceback": "".join(traceback.format_exception(error))},
        )
        self.echo(f"[reproduce] {row} FAILED: {message}")

    def report(self) -> Path:
        """Rebuild report.md / results.json from whatever the study holds, running nothing else."""
        from drivekd.study.report import write_report

        if not (self.out / "study.json").is_file():
            raise DriveKDError(f"{self.out}: not a drivekd study (no study.json)")
        self.claim()
        return write_report(self.out)

    # ---- steps -------------------------------------------------------------------------------
    def generate_data(self) -> None:
        from drivekd.data.drivesim.generate import GenerateConfig, generate

        p = self.profile
        config = GenerateConfig(scenes=p.scenes, seed=p.data_seed, split_fractions=p.split)
        generate(self.data, config, workers=self.workers, overwrite=True)

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

    def make_cache(self, recipe: str, capability: str | None) -> None:
        """Teacher targets of a recipe over its data subset, computed once for every seed and variant."""
        from drivekd.distill.run import run_cache_teacher
        from drivekd.study.profiles import Variant

        folder = self.configs.cache_dir(recipe, capability)
        if _current_cache(folder) and (self.out / "prestudy" / "recipe.yaml").stat().st_mtime < _made(folder):
            return  # made since the plan was drawn (another invocation of this study): in use, kept
        shutil.rmtree(folder, ignore_errors=True)  # made for another recipe or by another drivekd
        variant = Variant(name="cache", recipe=recipe, per_capability=capability is not None)
        config = self.configs.config(StudentRun(variant, self.profile.seeds[0], capability))
        run_cache_teacher(config, folder, echo=self.echo)

    def pred_file(self, name: str, seed: int | None, split: str) -> Path:
        return self.out / "preds" / name / (f"seed-{seed}" if seed is not None else "") / f"{split}.jsonl"

    def robust_splits(self) -> list[str]:
        """The robustness table's prediction files (none unless the profile asks for it): the clean
        subset first, which only selects the test predictions' records, then one per setting."""
        robustness = self.profile.robustness
        return [] if robustness is None else [ROBUST_CLEAN, *(ROBUST + key for key in robustness.settings())]

    def robust_samples(self) -> list[Any]:
        """The test questions the robustness settings are scored on: `samples` of them at even steps
        through the split, so they spread over its scenes (the split is written scene by scene)."""
        from drivekd.data.formats import load_split

        test = load_split(self.data, "test")
        wanted = min(self.profile.robustness.samples if self.profile.robustness else len(test), len(test))
        return [test[i * len(test) // wanted] for i in range(wanted)]

    def setting_of(self, split: str) -> Any:
        """The robustness setting a `robust/KEY` split is predicted under (None: as given)."""
        robustness = self.profile.robustness
        if robustness is None or not split.startswith(ROBUST) or split == ROBUST_CLEAN:
            return None
        return robustness.settings()[split.removeprefix(ROBUST)]

    def split_samples(self, split: str) -> list[Any]:
        from drivekd.data.formats import load_split
        from drivekd.data.sample import image_blind_control

        if split.startswith(ROBUST):
            return self.robust_samples()
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

        first = runs[0]
        if split == ROBUST_CLEAN:
            self._clean_subset(first.variant.name, first.seed)
            return
        samples = self.split_samples(split)
        parts = []
        for run in runs:
            mine = [s for s in samples if run.capability in (None, s.capability)]
            parts.append(self._predict(self.configs.run_dir(run) / "final", mine, self.setting_of(split)))
        write_records([r for p in parts for r in p], self.pred_file(first.variant.name, first.seed, split))

    def _predict(self, model: Path, samples: list[Any], setting: Any = None) -> list[dict[str, Any]]:
        from drivekd.eval.predict import generate_records
        from drivekd.models.loading import load_backend

        backend = load_backend(str(model))
        p = self.profile
        return generate_records(
            backend, samples, batch_size=p.eval_batch_size, max_new_tokens=p.eval_max_new_tokens, setting=setting
        )[0]

    def _clean_subset(self, name: str, seed: int | None) -> None:
        """The robustness table's clean column: the test predictions of the robustness subset, so that
        every column is scored on the same questions (no second clean pass)."""
        from drivekd.eval.predict import write_records

        ids = {s.id for s in self.robust_samples()}
        lines = self.pred_file(name, seed, "test").read_text(encoding="utf-8").splitlines()
        records = [r for r in map(json.loads, lines) if r["id"] in ids]
        write_records(records, self.pred_file(name, seed, ROBUST_CLEAN))

    def evaluate_teacher(self, split: str) -> None:
        from drivekd.eval.predict import write_records

        if split == ROBUST_CLEAN:
            self._clean_subset("teacher", None)
            return
        records = self._predict(self.teacher, self.split_samples(split), self.setting_of(split))
        write_records(records, self.pred_file("teacher", None, split))

    def majority(self, split: str) -> None:
        from drivekd.data.formats import load_split
        from drivekd.eval.baselines import majority_records
        from drivekd.eval.predict import write_records

        records = majority_records(load_split(self.data, "train"), load_split(self.data, split))
        write_records(records, self.pred_file("majority", None, split))

    def trained_students(self) -> dict[str, Path]:
        """Each finished all-data student's final model, by row."""
        out = {}
        for name in self.profile.variants:
            for seed in self.profile.seeds:
                runs = self.configs.runs(name, seed)
                if len(runs) == 1 and RunFolder(self.configs.run_dir(runs[0])).finished:
                    out[runs[0].row] = self.configs.run_dir(runs[0]) / "final"
        return out

    def mechanism(self) -> None:
        """Attention mass on the asked-about object's visual token: teacher, each all-data student."""
        from drivekd.data.formats import load_split
        from drivekd.eval.attention import tagged_attention
        from drivekd.models.loading import load_backend

        samples = load_split(self.data, "test")[: self.profile.mechanism_samples]
        models = {"teacher": str(self.teacher), "student base": str(self.student)}
        models |= {row: str(path) for row, path in self.trained_students().items()}
        write_json(
            self.out / "mechanism.json", {k: tagged_attention(load_backend(v), samples) for k, v in models.items()}
        )

    def deployed_student(self) -> Path | None:
        """The student the deployment table shows: multi-teacher AGP if it trained, else CE."""
        trained = self.trained_students()
        seed = self.profile.seeds[0]
        for name in ("multi-agp", "ce", *self.profile.variants):
            if f"{name}/seed-{seed}" in trained:
                return trained[f"{name}/seed-{seed}"]
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
        write_json(self.out / "bench" / "infer.json", result)


def _current_cache(folder: Path) -> bool:
    from drivekd.distill.cache import FORMAT, cache_format

    return cache_format(folder) == FORMAT


def _made(cache: Path) -> float:
    return (cache / "manifest.json").stat().st_mtime


def _capture(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # recorded for its row, or raised by the caller
        return e
    return None


def _worker_init(threads: int) -> None:
    """A job's process: its share of the CPU threads, and no progress bars (several jobs' bars would
    interleave; a job reports through its steps' start and end lines)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from drivekd.progress import show_bars

    torch.set_num_threads(threads)
    show_bars(False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading and saving bars
