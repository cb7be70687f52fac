"""`drivekd reproduce`: the whole Drive-KD study on the embedded default, in one resumable command."""

from __future__ import annotations

from pathlib import Path

import click

BASES = ("drivesim-internvl-teacher", "drivesim-internvl-student-base")


@click.command()
@click.option(
    "--profile",
    "profile_name",
    default="quick",
    show_default=True,
    help="quick / full / ablations (drivekd/study/profiles.yaml), or a profile YAML file of your own (its "
    "fields, or `extends: quick` and the fields it changes): the Drive-KD study. A base's name: rebuild that "
    "shipped pretrained model from nothing (hours on a CPU).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Study directory (created or resumed).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Data-generation processes.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Study jobs run at once, each in its own process with its share of the CPU threads (the teacher's "
    "side, each student row, the teacher's evaluations; a job starts as soon as what it reads is done). On 2 "
    "cores two jobs are no faster than one (docs/results.md).",
)
@click.option(
    "--seed",
    "seeds",
    type=int,
    multiple=True,
    help="Train only these seeds' students (run seeds side by side in separate processes; "
    "a final run without --seed adds the deployment table).",
)
@click.option(
    "--report-only", is_flag=True, help="Rebuild OUT/report.md and results.json from what exists; train nothing."
)
@click.option(
    "--variant",
    help="Bases only: one of the build's variants in drivekd/study/bases.yaml laid over its spec "
    "(gpu: larger batches and more samples for one GPU; smoke: a few scenes and steps, to try a script).",
)
@click.option(
    "--data-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Bases only: a folder of DriveSim-QA datasets generated earlier; a dataset the build needs is "
    "copied from it when its card shows the same settings and generator version.",
)
@click.option("--data-only", is_flag=True, help="Bases only: generate the build's datasets and stop.")
def reproduce(
    profile_name: str,
    out: Path,
    workers: int,
    jobs: int,
    seeds: tuple[int, ...],
    report_only: bool,
    variant: str | None,
    data_from: Path | None,
    data_only: bool,
) -> None:
    """Generate DriveSim-QA, train the teacher, pre-study it, train and score every student variant,
    benchmark deployment and write OUT/report.md + OUT/results.json. Run it again to resume.

    With a base's name as profile: generate its data, run its training stages, export and score the
    weights and write OUT/export/NAME with its card (`drivekd models install-base` ships it)."""
    if profile_name in BASES:
        from drivekd.study.bases import BaseBuilder, load_builds

        builds = load_builds(variant=variant)
        if profile_name not in builds:
            raise click.BadParameter(f"{profile_name} has no variant {variant!r}", param_hint="--variant")
        builder = BaseBuilder(builds[profile_name], out, workers=workers, data_from=data_from)
        click.echo(f"wrote {builder.run(data_only=data_only)}")
        return
    if variant or data_from or data_only:
        raise click.UsageError("--variant, --data-from and --data-only are for a base's build")
    from drivekd.study.profiles import load_profile
    from drivekd.study.runner import Study

    study = Study(out, load_profile(profile_name), workers=workers, jobs=jobs)
    report = study.report() if report_only else study.run(seeds or None)
    click.echo(f"wrote {report}")
