"""The prepared GPU build of the shipped bases (gpu/*.sh), dry-run here at the `smoke` variant's size:
what is packed travels, the build runs without the simulator and sends back tar parts, and the
parts join into exports that pass `drivekd models verify-base` on this machine."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from drivekd.study.bases import load_builds

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "gpu" / name), *args],
        env={**os.environ, "PYTHON": sys.executable, "VARIANT": "smoke", "WHEELS": "none", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # the bases change rarely: `./run.sh test -m slow` before a GPU session
def test_pack_build_unpack_at_smoke_size(tmp_path):
    pack, work = tmp_path / "pack", tmp_path / "work"
    packed = _script("pack-bases.sh", env={"PACK": str(pack), "WORK": str(work)})
    assert packed.returncode == 0, packed.stderr[-2000:]
    with tarfile.open(pack / "bases-data.tar.xz") as tar:
        folders = {m.name for m in tar.getmembers() if m.isdir() and "/" not in m.name}
    # every generated dataset of both builds once; the shared held-out and check sets once
    builds = load_builds(variant="smoke")
    wanted = {f"{d.task}-{d.seed}-{d.scenes}" for b in builds.values() for d in b.datasets.values() if d.drill is None}
    assert folders == wanted and len(wanted) == 8

    out = tmp_path / "out"
    # the GPU machine has no simulator: the build must not need it
    blocked = tmp_path / "no-simulator"
    for module in ("highway_env", "gymnasium"):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text("raise ImportError('not on the GPU machine')\n")
    env = {"PACK": str(pack), "WORK": str(tmp_path / "gpu"), "OUT": str(out), "PYTHONPATH": str(blocked)}
    built = _script("build-bases.sh", env=env)
    assert built.returncode == 0, (out / "build.log").read_text()[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    assert names[:2] == ["build.log", "machine.txt"]
    assert {n.split(".")[0] for n in names[2:]} == {"teacher", "student-base"}
    assert "copied" in (out / "build.log").read_text()

    back = tmp_path / "back"
    unpacked = _script("unpack-bases.sh", str(out), str(back), env={"DATA_FROM": str(work)})
    assert unpacked.returncode == 0, unpacked.stderr[-2000:]
    assert unpacked.stdout.count("matches its card") == 2
    for name in ("teacher", "student-base"):
        card = json.loads((back / name / "export" / f"drivesim-internvl-{name}" / "card.json").read_text())
        assert card["variant"] == "smoke"
        assert card["rebuild"] == f"drivekd reproduce --profile drivesim-internvl-{name} --variant smoke --out DIR"
        assert card["steps"] == 2 * len(builds[f"drivesim-internvl-{name}"].stages)
        assert (back / name / "stages" / "drill" / "metrics.jsonl").is_file()


def test_real_size_check_runs_here_at_tiny_size(tmp_path):
    out = tmp_path / "out"
    env = {
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "PAIR": "tiny",
        "SMALL": "tiny-internvl-student",
        "LARGE": "tiny-internvl-teacher",
        "DEVICE": "cpu",
        "CAMERAS": "2",
        # a phase of each kind (the ratios between them: `test_scale_ratios_...`)
        "PHASES": "sft cache agp-reuse-cached agp-fsdp-cached capture-eager capture-rows sft-ac agp-modules-ac-cached",
        "REPEATS": "1",
        "TESTS": "none",
        "CACHE_QUESTIONS": "3",
    }
    run = _script("check-real-size.sh", env=env)
    assert run.returncode == 0, run.stdout + (out / "scale.log").read_text()[-2000:]
    names = ["cache.json", "cache.log", "infer.json", "infer.log", "machine.txt", "scale.json", "scale.log"]
    names.append("tests.log")
    assert sorted(p.name for p in out.iterdir()) == names  # at most 8 files come back
    cache = json.loads((out / "cache.json").read_text())  # `bench cache --json`: one object, the tiny pair here
    assert (cache["shapes"], cache["cameras"], cache["questions_per_frame"]) == ("tiny", 2, 3)
    assert cache["bytes_per_question"] < cache["bytes_per_question_unshared"] and "fp8" in cache["lossy"]
    scale = json.loads((out / "scale.json").read_text())["runs"]["tiny-2cam"]
    assert {
        "sft",
        "cache",
        "agp-reuse-cached",
        "agp-fsdp-cached",
        "capture-eager",
        "capture-rows",
    } <= set(scale)
    assert all("error" not in scale[p] for p in scale if p != "ratios")
    assert scale["capture-rows"]["map_shape"][1] < scale["capture-eager"]["map_shape"][1]  # text rows only
    assert "agp-modules-ac-cached peak / sft-ac peak" in scale["ratios"]  # both checkpointed
    assert "target for the 1B shape" in (out / "infer.log").read_text()


def test_scale_ratios_are_the_issues_targets_from_the_phase_files(tmp_path):
    """`bench scale`'s ratios from phase files: each step against SFT, checkpointed steps against
    checkpointed SFT, amortised AGP from its exact and cheap steps, the capture's memory over the pass
    without maps; a failed phase is left out."""
    from drivekd.bench.scale import collect

    phases = {
        "sft": (10.0, 100),
        "sft-ac": (12.0, 90),
        "agp-cached": (20.0, 150),
        "agp-reuse-cached": (11.0, 110),
        "agp-modules-ac-cached": (24.0, 99),
        "capture-none": (1.0, 100),
        "capture-eager": (1.0, 160),
        "capture-rows": (1.0, 110),
    }
    (tmp_path / "phases").mkdir()
    for phase, (seconds, peak) in phases.items():
        (tmp_path / "phases" / f"internvl-6cam-{phase}.json").write_text(
            json.dumps({"step_s": seconds, "peak_rss_bytes": peak})
        )
    (tmp_path / "phases" / "internvl-6cam-sum-cached.json").write_text(json.dumps({"error": "killed"}))
    ratios = collect(tmp_path)["runs"]["internvl-6cam"]["ratios"]
    assert ratios["agp-cached / sft"] == 2.0 and ratios["agp-cached peak / sft peak"] == 1.5
    assert ratios["agp-modules-ac-cached / sft-ac"] == 2.0 and ratios["agp-modules-ac-cached peak / sft-ac peak"] == 1.1
    assert "sft-ac / sft-ac" not in ratios and not any(k.startswith("sum-cached") for k in ratios)
    assert ratios["agp amortised every 8 (cached) / sft"] == pytest.approx((20 + 7 * 11) / 8 / 10)
    assert ratios["capture memory: text rows / eager (over the pass without maps)"] == pytest.approx(10 / 60)
