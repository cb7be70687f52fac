"""`pip install drivekd` without the `sim` extra: one's own data works, DriveSim-QA says what to install."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # CLI in subprocesses, builds and studies end to end

# A process in which highway-env, gymnasium and matplotlib cannot be imported, as after a plain install.
BLOCK = """
import importlib.abc, importlib.util, sys
BLOCKED = {"highway_env", "gymnasium", "matplotlib", "pygame"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a)
from drivekd.cli import main
sys.argv = ["drivekd", *sys.argv[1:]]
main()
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=300)


def test_own_data_needs_no_simulator_and_generation_names_the_extra(tmp_path):
    sample = {"id": "a", "capability": "planning", "images": [], "question": "Go?", "answer": "Yes."}
    data = tmp_path / "own.jsonl"
    data.write_text(json.dumps(sample) + "\n")
    validated = _run("data", "validate", str(data))
    assert validated.returncode == 0, validated.stderr
    from drivekd.data.formats import load_samples
    from drivekd.eval.predict import prediction_record

    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps(prediction_record(load_samples(data)[0], "Yes.")) + "\n")
    scored = _run("score", str(pred), "--json")
    assert scored.returncode == 0, scored.stderr

    generated = _run("data", "generate", "--out", str(tmp_path / "sim"), "--scenes", "1")
    assert generated.returncode == 2
    lines = generated.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in generated.stderr
    assert "highway_env" in lines[0] and "pip install 'drivekd[sim]'" in lines[0]
    assert not (tmp_path / "sim").exists()
