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
@click.option(
    "--protocol",
    type=click.Choice(["drivekd", "drivelm"]),
    default="drivekd",
    show_default=True,
    help="drivekd: the rules below. drivelm: the DriveLM challenge's score (needs --qa).",
)
@click.option(
    "--qa",
    "qa_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="drivelm: the challenge's QA file (test_eval.json layout) the predictions answer.",
)
@click.option(
    "--language-path",
    type=click.Choice(["auto", "exact", "java-free"]),
    default="auto",
    show_default=True,
    help="drivelm: exact runs coco-caption (pycocoevalcap and Java); auto takes it when both are there.",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="drivelm: score predictions that cover part of the QA file, counting the questions left out.",
)
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
    protocol: str,
    qa_file: Path | None,
    language_path: str,
    allow_missing: bool,
) -> None:
    """Score prediction JSONL files (id, capability, question_type, prediction, reference[, choices,
    correct_choice, facts, question]) and show them side by side.

    Multiple choice is scored by the letter parsed from the prediction, open-ended answers with
    `facts` by field checks, the rest by BLEU-4 / ROUGE-L / CIDEr. Avg is the mean of the capabilities
    a file has; one over fewer than all three is marked `*` (`average_over` in --json). An empty or
    malformed file is an error.

    With --protocol drivelm, each file is scored as the DriveLM challenge scores it against --qa:
    accuracy, ChatGPT score (through the judge), language and match scores, and their weighted final;
    without a judge the final is reported as partial. Files are the challenge's [{id, answer}] JSON or
    drivekd prediction JSONL.
    """
    from drivekd.eval.scoring import average_over, file_setting, read_predictions, score_items, summarize

    if (judge_url is None) != (judge_model is None):
        raise DriveKDError("--judge-url and --judge-model go together")
    if protocol == "drivelm" and qa_file is None:
        raise DriveKDError("--protocol drivelm needs --qa (the challenge's QA file, test_eval.json layout)")
    if protocol != "drivelm" and (qa_file is not None or allow_missing or language_path != "auto"):
        raise DriveKDError("--qa, --allow-missing and --language-path belong to --protocol drivelm")
    judge = None
    if judge_url is not None and judge_model is not None:
        from drivekd.eval.judge import Judge, JudgeConfig

        if judge_cache is None:
            click.echo("note: no --judge-cache given; judge replies will not be kept for a rerun", err=True)
        asked_as: dict[str, object] = {}
        if protocol == "drivelm":
            from drivekd.eval.drivelm import JUDGE_SYSTEM_PROMPT, JUDGE_TEMPERATURE

            asked_as = {"system_prompt": JUDGE_SYSTEM_PROMPT, "temperature": JUDGE_TEMPERATURE}
        judge = Judge(
            JudgeConfig(
                base_url=judge_url,
                model=judge_model,
                cache=judge_cache,
                key_env=judge_key_env,
                timeout_s=judge_timeout,
                retries=judge_retries,
                workers=judge_workers,
                **asked_as,  # type: ignore[arg-type]
            )
        )
    if protocol == "drivelm":
        assert qa_file is not None
        _score_drivelm(files, qa_file, judge, language_path, allow_missing, as_json)
        return
    results = []
    for file in files:
        preds = read_predictions(file)
        result = summarize(str(file), score_items(preds), file_setting(preds))
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


def _score_drivelm(
    files: tuple[Path, ...], qa_file: Path, judge: object, language_path: str, allow_missing: bool, as_json: bool
) -> None:
    from drivekd.eval.drivelm import prepare, render_markdown, resolve_language_path, score_prepared

    path = resolve_language_path(language_path)  # an impossible --language-path exact fails before any work
    # Every file is checked against the QA file before the first is scored (and a judge is paid).
    prepared = [prepare(file, qa_file, allow_missing) for file in files]
    results = []
    for file, checked in zip(files, prepared, strict=True):
        if judge is None:
            results.append(score_prepared(checked, None, path))
            continue
        from drivekd import progress

        with progress.bar(desc=f"judge {file.name}", unit="q") as bar:
            results.append(score_prepared(checked, judge, path, progress=bar.update))  # type: ignore[arg-type]
    for result in results:
        for note in result["notes"]:
            click.echo(f"note: {Path(result['file']).name}: {note}", err=True)
    if as_json:
        for result in results:
            click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(render_markdown(results))
