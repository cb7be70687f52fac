import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N runs N workers side by side: one thread each (and in the processes they start), or
    # N x cores threads fight over the cores and every test gets several times slower
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "drivekd", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def run_torchrun(*args: str, port: int) -> subprocess.CompletedProcess:
    """`drivekd ARGS` under torchrun with 2 CPU processes (gloo), one thread each."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "drivekd",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL a launcher and every process under it, and wait until all are gone. torchrun starts
    each worker in a session of its own, so killing the launcher's process group leaves the workers
    running on: they would go on writing the run folder beside a resumed run. Returns how many
    processes it killed."""
    import psutil

    launcher = psutil.Process(proc.pid)
    family = [*launcher.children(recursive=True), launcher]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after SIGKILL: {[p.pid for p in alive]}"
    return len(family)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small DriveSim-QA dataset (a module may define its own `data_dir` instead)."""
    from drivekd.data.drivesim.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("distill") / "data"
    generate(out, GenerateConfig(scenes=3, seed=21))
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny InternVL teacher: a checkpoint folder, as a user's teacher is."""
    from drivekd.models.loading import LoadOptions, load_backend

    out = tmp_path_factory.mktemp("teacher") / "t"
    load_backend("tiny-internvl-teacher", LoadOptions(seed=7)).save(out)
    return out


@pytest.fixture(scope="module")
def qwen_teacher_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL teacher (seed 7), saved."""
    from drivekd.models.loading import LoadOptions, load_backend

    out = tmp_path_factory.mktemp("qwen-teacher") / "t"
    load_backend("tiny-qwen25vl-teacher", LoadOptions(seed=7)).save(out)
    return out


def png(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture
def drivebench_file(tmp_path: Path) -> Path:
    items = [
        {
            "scene_token": "sc1",
            "frame_token": "fr1",
            "question_type": "perception",
            "tag": 0,
            "question": "What is the moving status of object <c1,CAM_FRONT,0.5,0.5>? Please select the correct "
            "answer from the following options: A. Going ahead. B. Turn left. C. Turn right.",
            "answer": "B. Turn left.",
            "image_path": {"CAM_FRONT": "samples/CAM_FRONT/a.jpg", "CAM_BACK": "samples/CAM_BACK/b.jpg"},
        },
        {
            "scene_token": "sc1",
            "frame_token": "fr1",
            "question_type": "prediction",
            "tag": 1,
            "question": "Will <c1,CAM_FRONT,0.5,0.5> be in the moving direction of the ego vehicle?",
            "answer": "No.",
            "image_path": {"CAM_FRONT": "samples/CAM_FRONT/a.jpg", "CAM_BACK": "samples/CAM_BACK/b.jpg"},
        },
        {
            "scene_token": "sc2",
            "frame_token": "fr2",
            "question_type": "behavior",
            "tag": 0,
            "question": "Predict the behavior of the ego vehicle. Please select the correct answer from the "
            "following options: A. Going straight. B. Turning left.",
            "answer": "A",
            "image_path": {"CAM_FRONT": "samples/CAM_FRONT/c.jpg"},
        },
        {
            "scene_token": "sc2",
            "frame_token": "fr2",
            "question_type": "planning",
            "tag": 2,
            "question": "What actions could the ego vehicle take?",
            "answer": "Keep going.",
            "image_path": {"CAM_FRONT": "samples/CAM_FRONT/c.jpg"},
        },
    ]
    f = tmp_path / "drivebench.json"
    f.write_text(json.dumps(items))
    for p in ("samples/CAM_FRONT/a.jpg", "samples/CAM_BACK/b.jpg", "samples/CAM_FRONT/c.jpg"):
        png(tmp_path / p)
    return f


@pytest.fixture
def drivelm_file(tmp_path: Path) -> Path:
    data = {
        "scene-a": {
            "scene_description": "highway",
            "key_frames": {
                "frame-1": {
                    "QA": {
                        "perception": [{"Q": "What are the important objects?", "A": "A car ahead.", "C": None}],
                        "prediction": [{"Q": "Will the car stop?", "A": "No."}],
                        "planning": [{"Q": "What should the ego do?", "A": "Keep going."}],
                        "behavior": [{"Q": "Predict the ego behavior.", "A": "Going straight."}],
                    },
                    "image_paths": {
                        "CAM_FRONT": "../nuscenes/samples/CAM_FRONT/x.jpg",
                        "CAM_BACK": "../nuscenes/samples/CAM_BACK/y.jpg",
                    },
                }
            },
        }
    }
    f = tmp_path / "sub" / "drivelm.json"
    f.parent.mkdir()
    f.write_text(json.dumps(data))
    png(tmp_path / "nuscenes/samples/CAM_FRONT/x.jpg")
    png(tmp_path / "nuscenes/samples/CAM_BACK/y.jpg")
    return f


def reply_chat(handler, content: str) -> None:
    """Answer an OpenAI-compatible chat request (on a stub server's handler) with `content`."""
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
