"""The `drivekd` command line: one group per pipeline stage."""

from __future__ import annotations

import sys

import click

from drivekd import __version__
from drivekd.cli.bench import bench
from drivekd.cli.data import data
from drivekd.cli.evaluate import baseline, evaluate
from drivekd.cli.experimental import experimental
from drivekd.cli.models import models
from drivekd.cli.plan import plan
from drivekd.cli.prestudy import prestudy
from drivekd.cli.reproduce import reproduce
from drivekd.cli.score import score
from drivekd.cli.train import cache_teacher, calibrate, config, distill, sft
from drivekd.errors import DriveKDError


class _Main(click.Group):
    """Turns user errors into one line on stderr and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DriveKDError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        finally:
            _end_process_group()


def _end_process_group() -> None:
    """A process of a torchrun launch ends its process group before the interpreter exits: left to
    interpreter teardown, gloo's threads can abort a process whose run had finished (SIGABRT,
    "terminate called without an active exception", seen after a resumed FSDP run wrote its model)."""
    dist = sys.modules.get("torch.distributed")  # not imported by commands that never load torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="drivekd")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Distil large driving vision-language models into small ones (Drive-KD).

    Pipeline: `data` (generate, convert, validate) -> later stages train, distil and evaluate.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


main.add_command(data)
main.add_command(sft)
main.add_command(distill)
main.add_command(cache_teacher)
main.add_command(calibrate)
main.add_command(bench)
main.add_command(evaluate)
main.add_command(baseline)
main.add_command(models)
main.add_command(score)
main.add_command(prestudy)
main.add_command(reproduce)
main.add_command(config)
main.add_command(plan)
main.add_command(experimental)
