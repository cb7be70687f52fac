"""`drivekd bench cache --json`: one JSON object with the cache's bytes and teacher seconds per
question, with and without the prefix run and stored once, and each lossy storage's error."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import run_cli


@pytest.mark.integration
def test_bench_cache_prints_one_json_object_with_consistent_figures():
    # the smallest run that still has a frame of several questions and two batches of them
    args = ["--cameras", "1", "--questions-per-frame", "4", "--frames", "1", "--batch", "2", "--lossy-questions", "2"]
    r = subprocess.run(
        [sys.executable, "-m", "drivekd", "bench", "cache", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # stdout is the JSON object alone (progress went to stderr)
    assert (result["pair"], result["shapes"], result["cameras"], result["questions_per_frame"]) == (
        "internvl",
        "tiny",
        1,
        4,
    )
    assert result["teacher"] == "drivesim-internvl-teacher"
    for key in ("bytes_per_question", "bytes_per_question_unshared", "teacher_seconds_per_question"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert isinstance(result["teacher_seconds_per_question_without_reuse"], float)
    # the prefix stored once for 4 questions: less than storing it with each, more than the suffixes alone
    assert result["bytes_per_question"] < result["bytes_per_question_unshared"]
    assert result["bytes_ratio"] == pytest.approx(result["bytes_per_question"] / result["bytes_per_question_unshared"])
    assert result["questions_after_prefix"] == 4 and result["caches"]["whole"]["questions_after_prefix"] == 0
    assert result["caches"]["reused"]["questions_sharing"] == 4
    assert result["visual_tokens_per_frame"] == 36 and result["tokens_per_question"] > 36
    # reuse changes the targets by rounding only (fp16 storage: an ulp of the largest value at most)
    assert result["reuse_target_difference"]["max_rel"] <= 2**-10
    # zstd (lossless) stores fewer bytes than the values hold; the unshared layout is written uncompressed
    assert result["bytes_per_question"] < 0.9 * result["bytes_per_question_uncompressed"]
    assert result["caches"]["whole"]["compression"] == "none" and result["caches"]["reused"]["compression"] == "zstd"
    assert result["caches"]["whole"]["bytes_per_question_uncompressed"] <= result["bytes_per_question_unshared"]
    fp8 = result["lossy"]["fp8"]
    uncompressed = fp8["bytes_per_question_uncompressed"] / result["bytes_per_question_uncompressed"]
    assert 0.45 < uncompressed < 0.6  # one byte a value, not two
    assert fp8["bytes_per_question"] < fp8["bytes_per_question_uncompressed"]
    assert set(fp8["signals"]) == {"perception", "reasoning", "planning"}
    for row in (fp8, result["fp16_against_exact"]):
        assert 0.0 <= row["loss_rel_error"] < 0.05
        assert 0.99 <= row["grad_cosine"] <= 1.0 + 1e-9
        assert row["loss_rel_error"] == max(s["loss_rel_error"] for s in row["signals"].values())
        assert row["grad_cosine"] == min(s["grad_cosine"] for s in row["signals"].values())
    # fp16 rounds less than fp8
    assert result["fp16_against_exact"]["loss_rel_error"] <= fp8["loss_rel_error"]


@pytest.mark.integration
def test_bench_cache_on_a_device_that_is_not_there_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run_cli("bench", "cache", "--json", "--device", "cuda", "--questions-per-frame", "1", "--frames", "1")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], r.stderr
