"""`drivekd reproduce`: the whole Drive-KD study on the embedded default, in one resumable command."""

from __future__ import annotations

from pathlib import Path

import click

BASES = ("drivesim-internvl-teacher", "drivesim-internvl-student-base")


@click.command()
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(["quick", "full", *BASES]),
    default="quick",
    show_default=True,
    help="quick / full: the Drive-KD study. A base's name: rebuild that shipped pretrained model "
    "from nothing (hours on a CPU).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Study directory (created or resumed).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Data-generation processes.")
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
def reproduce(profile_name: str, out: Path, workers: int, seeds: tuple[int, ...], report_only: bool) -> None:
    """Generate DriveSim-QA, train the teacher, pre-study it, train and score every student variant,
    benchmark deployment and write OUT/report.md + OUT/results.json. Run it again to resume.

    With a base's name as profile: generate its data, run its training stages, export and score the
    weights and write OUT/export/NAME with its card (`drivekd models install-base` ships it)."""
    if profile_name in BASES:
        from drivekd.study.bases import BaseBuilder, load_builds

        click.echo(f"wrote {BaseBuilder(load_builds()[profile_name], out, workers=workers).run()}")
        return
    from drivekd.study.profiles import get_profile
    from drivekd.study.runner import Study

    study = Study(out, get_profile(profile_name), workers=workers)
    report = study.report() if report_only else study.run(seeds or None)
    click.echo(f"wrote {report}")
