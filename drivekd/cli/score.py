"""`drivekd score`: score prediction files, optionally with an LLM judge."""

from __future__ import annotations

import json
from pathlib import Path

import click

from drivekd.errors import DriveKDError


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per file, one per line (JSONL), instead of a table."
)
@click.option(
    "--judge-url", metavar="URL", help="OpenAI-compatible base URL (POST URL/chat/completions); enables the judge."
)
@click.option("--judge-model", metavar="NAME", help="Judge model name (required with --judge-url).")
@click.option(
    "--judge-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL cache of judge replies: a rerun resumes and asks nothing twice.",
)
@click.option(
    "--judge-key-env", default="OPENAI_API_KEY", show_default=True, help="Environment variable with the API key."
)
@click.option(
    "--judge-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds per attempt (socket timeout and deadline for the whole reply).",
)
@click.option("--judge-retries", type=click.IntRange(min=1), default=3, show_default=True, help="Attempts per request.")
@click.option("--judge-workers", type=click.IntRange(min=1), default=4, show_default=True, help="Parallel requests.")
def score(
    files: tuple[Path, ...],
    as_json: bool,
    judge_url: str | None,
    judge_model: str | None,
    judge_cache: Path | None,
    judge_key_env: str,
    judge_timeout: float,
    judge_retries: int,
    judge_workers: int,
) -> None:
    """Score prediction JSONL files (id, capability, question_type, prediction, reference[, choices,
    correct_choice, facts, question]) and show them side by side.

    Multiple choice is scored by the letter parsed from the prediction, open-ended answers with
    `facts` by field checks, the rest by BLEU-4 / ROUGE-L / CIDEr. Avg is the mean of the capabilities
    a file has; one over fewer than all three is marked `*` (`average_over` in --json). An empty or
    malformed file is an error.
    """
    from drivekd.eval.scoring import average_over, read_predictions, score_items, summarize

    if (judge_url is None) != (judge_model is None):
        raise DriveKDError("--judge-url and --judge-model go together")
    judge = None
    if judge_url is not None and judge_model is not None:
        from drivekd.eval.judge import Judge, JudgeConfig

        if judge_cache is None:
            click.echo("note: no --judge-cache given; judge replies will not be kept for a rerun", err=True)
        judge = Judge(
            JudgeConfig(
                base_url=judge_url,
                model=judge_model,
                cache=judge_cache,
                key_env=judge_key_env,
                timeout_s=judge_timeout,
                retries=judge_retries,
                workers=judge_workers,
            )
        )
    results = []
    for file in files:
        preds = read_predictions(file)
        result = summarize(str(file), score_items(preds))
        if judge is not None:
            from drivekd import progress
            from drivekd.eval.judge import judge_items, judge_summary

            with progress.bar(total=len(preds), desc=f"judge {file.name}", unit="q") as bar:
                verdicts = judge_items(preds, judge, progress=bar.update)
            result["judge"] = judge_summary(preds, verdicts, judge.config.model)
            result["judge"]["average_over"] = average_over(result["judge"]["capabilities"])
        results.append(result)
    if as_json:
        for result in results:
            click.echo(json.dumps(result, sort_keys=True))
    else:
        from drivekd.eval.scoring import render_markdown

        click.echo(render_markdown(results))
