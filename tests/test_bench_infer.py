import json

import pytest
import torch
from click.testing import CliRunner

from drivekd.bench.infer.driver import bench_infer, ratios, render_table
from drivekd.bench.infer.int8 import is_int8, quantize_int8, weights_mb
from drivekd.bench.infer.timing import greedy_timed
from drivekd.bench.infer.worker import worker, worker_main
from drivekd.cli import main
from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split
from drivekd.errors import DriveKDError
from drivekd.models.loading import count_parameters, load_backend
from tests.conftest import run_cli

TEACHER, STUDENT = "tiny-internvl-teacher", "tiny-internvl-student"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on a busy 2-core machine thrash (seconds per forward); one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "data"
    generate(out, GenerateConfig(scenes=3, seed=11))
    assert len(load_split(out, "test")) >= 2
    return out


def _perturbed(name):
    """Random init predicts one token everywhere; larger weights make greedy outputs varied."""
    backend = load_backend(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in backend.model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08, generator=g)
    backend.model.eval()
    return backend


def _until_eos(row, eos):
    row = row.tolist()
    return row[: row.index(eos)] if eos in row else row


@pytest.mark.parametrize("name", [STUDENT, "tiny-qwen25vl-student"])
def test_timed_greedy_loop_matches_generate(name, data):
    backend = _perturbed(name)
    samples = sorted(load_split(data, "test"), key=lambda s: len(s.question))
    samples = [samples[0], samples[-1]]  # different lengths: left padding in the batch
    batch = backend.build_batch(samples, with_answers=False, padding_side="left")
    assert (batch.inputs["attention_mask"] == 0).any()
    n = 6
    tokens, first_s, decode_s = greedy_timed(backend, batch, n)
    assert tokens.shape == (2, n) and first_s > 0 and decode_s > 0
    assert len({t for row in tokens.tolist() for t in row}) > 1  # not a degenerate constant output
    with torch.no_grad():  # EOS suppressed in both: exact, token for token
        ref = backend.model.generate(
            **batch.inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            eos_token_id=backend.eos_id,
            pad_token_id=backend.pad_id,
        )
    assert torch.equal(tokens, ref[:, batch.inputs["input_ids"].shape[1] :])
    texts = backend.generate(samples, max_new_tokens=n)  # the backend's own greedy decoding (stops at EOS)
    mine = [backend.tokenizer.decode(_until_eos(r, backend.eos_id), skip_special_tokens=True).strip() for r in tokens]
    assert mine == texts


def test_int8_variant_quantizes_linears_and_still_generates(data):
    backend = load_backend(STUDENT)
    float_mb = weights_mb(backend.model)
    params = count_parameters(backend)
    samples = load_split(data, "test")[:2]
    quantize_int8(backend)
    assert is_int8(backend.model)
    assert backend.int8_engine in torch.backends.quantized.supported_engines
    assert not any(type(m) is torch.nn.Linear for m in backend.model.modules())
    assert weights_mb(backend.model) < float_mb
    assert count_parameters(backend) < params  # packed int8 weights are no longer parameters
    batch = backend.build_batch(samples, with_answers=False, padding_side="left")
    tokens, _, _ = greedy_timed(backend, batch, 5)
    assert tokens.shape == (2, 5)
    texts = [backend.tokenizer.decode(r, skip_special_tokens=True) for r in tokens]
    assert all(isinstance(t, str) for t in texts)
    assert len(backend.generate(samples, max_new_tokens=5)) == 2


@pytest.fixture(scope="module")
def measured(data, tmp_path_factory):
    """One real run through the CLI (in-process; each model still in its own worker process)."""
    out = tmp_path_factory.mktemp("infer-json") / "infer.json"
    args = ["bench", "infer", "--models", TEACHER, STUDENT, "--int8", "--data", str(data)]
    r = CliRunner().invoke(main, [*args, "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    return r.output, json.loads(out.read_text())


@pytest.mark.integration  # measures two models in worker processes
def test_json_schema_and_ratios(measured):
    stdout, result = measured
    assert result["settings"]["torch_threads"] == 1
    names = [m["name"] for m in result["models"]]
    assert names == [TEACHER, STUDENT, f"{STUDENT}-int8"]
    for m in result["models"]:
        for key in ("params", "peak_mem_mb", "tok_per_s", "first_token_s"):
            assert m[key] > 0, (m["name"], key)
        assert m["new_tokens"] == 3
    teacher, student, int8 = result["models"]
    assert teacher["params"] > student["params"] == int8["params"]
    assert int8["int8"] and int8["quantized_linear"] and not student["quantized_linear"]
    assert int8["weights_mb"] < student["weights_mb"]
    assert result["ratios"][TEACHER] == dict.fromkeys(
        ("mem_ratio", "speed_ratio", "latency_ratio", "params_ratio"), 1.0
    )
    for m in result["models"][1:]:
        q = result["ratios"][m["name"]]
        assert q["mem_ratio"] == pytest.approx(m["peak_mem_mb"] / teacher["peak_mem_mb"])
        assert q["speed_ratio"] == pytest.approx(m["tok_per_s"] / teacher["tok_per_s"])
        assert q["latency_ratio"] == pytest.approx(m["first_token_s"] / teacher["first_token_s"])
        assert q["params_ratio"] == pytest.approx(m["params"] / teacher["params"])
    s = result["settings"]
    assert (s["batch"], s["new_tokens"], s["repeats"]) == (1, 3, 1)
    assert s["prompt_tokens"] > 0 and s["device"] == "cpu" and s["torch"] == torch.__version__
    table = render_table(result)
    assert table in stdout
    lines = table.splitlines()
    assert len(lines) == 5 and "| peak mem (MB) |" in lines[0] and "Avg" not in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_worker_scores_when_asked(data):
    spec = {"model": STUDENT, "data_dir": str(data), "split": "test", "batch": 1, "new_tokens": 2, "repeats": 1}
    r = worker({**spec, "device": "cpu", "score": True, "max_score_samples": 1})
    assert r["score_samples"] == 1 and 0 <= r["score_avg"] <= 100
    assert set(r["score_capabilities"]) == {"perception", "reasoning", "planning"}
    result = {"models": [{"name": "s", **r}], "ratios": ratios([{"name": "s", **r}])}
    header, _, row = render_table(result).splitlines()
    assert header.endswith("| Perc. | Reas. | Plan. | Avg |") and row.count("|") == header.count("|")


@pytest.mark.integration
def test_cli_missing_model_is_one_line_exit_2(tmp_path):
    r = run_cli("bench", "infer", "--models", str(tmp_path / "no-such-ckpt"), "--new-tokens", "2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no-such-ckpt" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_inputs_name_the_item(data, tmp_path):
    with pytest.raises(DriveKDError, match="tiny-nope"):
        bench_infer(["tiny-nope"], data_dir=data)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(DriveKDError, match=r"config\.json"):
        bench_infer([str(tmp_path / "ckpt")], data_dir=data)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "test.jsonl").write_text("")
    with pytest.raises(DriveKDError, match="split test is empty"):
        bench_infer([STUDENT], data_dir=empty)


def test_failing_worker_reports_one_line(tmp_path, capsys):
    spec = {"model": STUDENT, "data_dir": str(tmp_path), "split": "test", "batch": 1, "new_tokens": 2}
    assert worker_main(["--worker", json.dumps({**spec, "repeats": 1, "device": "cpu"})]) == 2
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "test.jsonl" in json.loads(out)["error"]
