"""The teacher cache written in shards: planned from the samples alone, by any number of processes,
and finished after a kill by redoing only what was not written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from drivekd.data.sample import ImageRef, Sample
from drivekd.distill.cache import shard_plan

from .conftest import run_torchrun


def _sample(i: int, frame: str) -> Sample:
    return Sample(
        id=f"s{i}",
        capability="perception",
        question_type="t",
        question="q?",
        answer="a",
        images=[ImageRef(camera="CAM_FRONT", path=f"/data/{frame}.png")],
        scene_id=frame,
    )


def test_a_shard_plan_keeps_frames_whole_and_depends_on_the_samples_only():
    frames = ["a", "b", "a", "c", "c", "c", "d", "b", "e"]
    samples = [_sample(i, f) for i, f in enumerate(frames)]
    plan = shard_plan(samples, shard_samples=3)
    # frames in order of first appearance: a (0, 2), b (1, 7), c (3, 4, 5), d (6), e (8)
    assert plan == [[0, 2, 1, 7], [3, 4, 5], [6, 8]]
    assert sorted(i for shard in plan for i in shard) == list(range(len(samples)))
    for shard in plan:  # no frame in two shards
        others = {frames[i] for other in plan if other is not shard for i in other}
        assert not {frames[i] for i in shard} & others
    assert shard_plan(samples, shard_samples=100) == [[0, 2, 1, 7, 3, 4, 5, 6, 8]]
    assert shard_plan(samples, shard_samples=1) == [[0, 2], [1, 7], [3, 4, 5], [6], [8]]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Enough frames (one per scene, about 8 questions each) for several shards."""
    from drivekd.data.drivesim.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("shards") / "data"
    generate(out, GenerateConfig(scenes=6, seed=21, split_fractions=(0.8, 0.2, 0.0)))
    return out


def _config(tmp_path: Path, data_dir: Path, teacher_dir: Path) -> Path:
    raw = {
        "model": {"name": "tiny-internvl-student"},
        "teacher": str(teacher_dir),
        "recipe": "drive-kd",
        "data": {"path": str(data_dir)},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 2},
    }
    file = tmp_path / "distill.yaml"
    file.write_text(yaml.safe_dump(raw))
    return file


def _cache(*args: str) -> subprocess.CompletedProcess:
    # one thread, as each torchrun process has: the same arithmetic, so the same bits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "drivekd", "cache-teacher", *args], capture_output=True, text=True, timeout=300, env=env
    )


def _tensors(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for file in sorted(folder.glob("shard-*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return out


def _same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert all(bool((ta[k] == tb[k]).all()) for k in ta)  # type: ignore[union-attr]
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    for key in ("format", "fingerprint", "index", "lengths", "student_depth", "teacher_depths"):
        assert ma[key] == mb[key], key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir, teacher_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cache")
    config = _config(root, data_dir, teacher_dir)
    r = _cache("--config", str(config), "--out", str(root / "one"), "--shard-samples", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return config, root / "one"


@pytest.mark.integration
def test_two_processes_write_the_cache_one_process_writes(one_process, tmp_path):
    config, one = one_process
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and len(manifest["shards"]) >= 3
    assert {s["rank"] for s in manifest["shards"].values()} == {0}
    r = run_torchrun(
        "cache-teacher", "--config", str(config), "--out", str(tmp_path / "two"), "--shard-samples", "2", port=29561
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _same(one, tmp_path / "two")
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["world_size"] == 2
    assert [s["rank"] for s in two["shards"].values()] == [n % 2 for n in range(len(two["shards"]))]
    assert not list(tmp_path.glob(".two.partial"))  # the work folder became the cache


@pytest.mark.integration
def test_a_killed_cache_is_finished_by_redoing_only_its_unwritten_shards(one_process, tmp_path):
    config, one = one_process
    out, work = tmp_path / "killed", tmp_path / ".killed.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "drivekd", "cache-teacher", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--shard-samples", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while not list(work.glob("shard-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in work.glob("shard-*.json"))
    total = len(json.loads((one / "manifest.json").read_text())["shards"])
    assert 1 <= len(written) < total and not out.exists()
    before = {name: (work / name).stat().st_mtime_ns for name in written}
    r = _cache("--config", str(config), "--out", str(out), "--shard-samples", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(written)} of this process's {total} shards are written" in r.stdout + r.stderr
    _same(one, out)
    # the shards written before the kill were kept, not written again
    for name in before:
        shard = name.replace(".json", ".safetensors")
        assert (out / shard).stat().st_mtime_ns <= before[name]
    # partial work of another plan (here: another shard size) is not mixed in
    stale = tmp_path / ".other.partial"
    stale.mkdir()
    (stale / "plan.json").write_text(json.dumps({"shards": [["s0"]]}))
    (stale / "shard-00000.json").write_text(json.dumps({"rank": 0, "world_size": 1, "lengths": {"s0": 1}}))
    r = _cache("--config", str(config), "--out", str(tmp_path / "other"), "--shard-samples", "2")
    assert r.returncode == 0 and "resuming" not in r.stdout + r.stderr
    _same(one, tmp_path / "other")


@pytest.mark.integration
def test_a_distillation_run_reads_each_next_batchs_cached_targets_ahead(one_process, tmp_path, monkeypatch):
    from drivekd.distill.run import run_distill
    from drivekd.distill.teachers import CachedTeachers
    from drivekd.train.config import DistillConfig, load_config

    config, one = one_process
    seen: list[CachedTeachers] = []
    original = CachedTeachers.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(CachedTeachers, "__init__", remember)
    overrides = [f"teacher.cache={one}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4"]
    run_distill(load_config(DistillConfig, config, overrides))
    teachers = seen[-1]  # the run's (calibration reads its own sample first, with no batch ahead)
    # every micro-batch after an epoch's first was read ahead: 4 steps of 2 samples, the first not
    assert teachers.read_ahead == 6 and not teachers._ahead
    # and the targets read ahead are the ones read on demand
    batch_ids = [s for s in json.loads((one / "manifest.json").read_text())["index"]][:2]
    ahead = CachedTeachers.__new__(CachedTeachers)
    ahead.__dict__.update(teachers.__dict__)
    ahead._ahead, ahead._reader = {}, None
    ahead.prefetch(batch_ids)
    for sample_id in batch_ids:
        got, want = ahead._stored(sample_id), teachers._read(sample_id)
        assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in got)


def test_fp8_storage_rounds_each_row_to_its_own_scale_and_fp16_is_exact():
    from drivekd.distill.cache import decode, encode

    torch.manual_seed(0)
    value = torch.rand(5, 300) ** 6  # attention-like: a few large entries, many tiny ones
    value[2] = 0.0  # a row of zeros stays zeros
    value[3] *= 1e-5  # a row far below the others keeps its own precision
    fp16 = encode(value, "fp16")
    assert set(fp16) == {""} and torch.equal(decode(fp16.__getitem__, "", "fp16", "none"), value.to(torch.float16))
    stored = encode(value, "fp8")
    assert stored[""].dtype == torch.float8_e4m3fn and stored["#scale"].shape == (5,)
    back = decode(lambda key: stored[key.removeprefix("k")], "k", "fp8", "none")
    # slow reference: each row divided by (its max / 448), rounded to e4m3, multiplied back
    for r in range(5):
        scale = max(float(value[r].abs().max()), 1e-30) / 448.0
        want = (value[r] / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.allclose(back[r], want, rtol=1e-6, atol=0)
    normal = value >= value.amax(1, keepdim=True) * 2**-6 / 448 * 8  # above e4m3's subnormals, row-relative
    rel = ((back - value).abs() / value.clamp_min(1e-38))[normal]
    assert float(rel.max()) <= 2**-4 + 1e-6  # three mantissa bits: half an ulp is 1/16 at most
    assert bool((back[2] == 0).all()) and float(back[3].max()) > 0


@pytest.mark.parametrize("storage", ["fp16", "fp8"])
def test_zstd_gives_back_every_stored_byte_and_shape(storage):
    from drivekd.distill.cache import compress, decode, encode

    torch.manual_seed(0)
    maps = torch.softmax(torch.randn(3, 40, 40) * 4, -1).tril()  # attention-like: peaked rows, causal zeros
    shard = {}
    values = [maps, torch.zeros(0, 40), torch.rand(7)]  # an empty and a 1-d tensor too
    if storage == "fp16":
        values.append(torch.tensor(0.25))  # and a 0-d one (fp8 scales rows: it has none)
    for i, value in enumerate(values):
        shard |= {f"s{i}/x/0{suffix}": t for suffix, t in encode(value, storage).items()}
    packed = compress(dict(shard))
    for key, stored in shard.items():
        if key.endswith("#scale"):  # fp8's scales are kept as they are
            assert packed[key] is stored
            continue
        assert packed[key].dtype == torch.uint8 and packed[f"{key}#shape"].tolist() == list(stored.shape)
        plain = decode(shard.__getitem__, key, storage, "none")
        unpacked = decode(packed.__getitem__, key, storage, "zstd")
        assert unpacked.dtype == plain.dtype and unpacked.shape == plain.shape
        bits = [t.contiguous().reshape(-1).view(torch.uint8) for t in (unpacked, plain)]
        assert torch.equal(*bits)  # bit for bit
    big = "s0/x/0"
    assert packed[big].numel() < 0.8 * shard[big].numel() * shard[big].element_size()


@pytest.mark.integration
def test_a_zstd_cache_reads_back_what_an_uncompressed_one_holds_in_fewer_bytes(one_process, tmp_path):
    from drivekd.bench.cache import uncompressed_bytes
    from drivekd.distill.cache import TeacherCache
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    config, one = one_process  # written by `drivekd cache-teacher` with its default, zstd
    plain = run_cache_teacher(load_config(DistillConfig, config), tmp_path / "plain", compression="none")
    packed, unpacked = TeacherCache(one), TeacherCache(plain)
    assert (packed.manifest["compression"], unpacked.manifest["compression"]) == ("zstd", "none")
    keys = {k.split("/", 1)[1] for k in load_file(str(next(plain.glob("shard-*.safetensors")))) if "#" not in k}
    assert keys
    for sample_id in unpacked.manifest["index"]:
        for key in keys:
            a, b = packed.tensors(sample_id, key), unpacked.tensors(sample_id, key)
            assert a.dtype == b.dtype == torch.float16 and torch.equal(a, b), (sample_id, key)
    size = [sum(f.stat().st_size for f in d.glob("shard-*.safetensors")) for d in (one, plain)]
    assert size[0] < 0.85 * size[1], size
    # the values before compression are the uncompressed cache's, whose files are little else
    assert uncompressed_bytes(one) == uncompressed_bytes(plain) <= size[1]


def test_an_unknown_storage_or_compression_is_refused_before_any_work(tmp_path):
    from drivekd.distill.cache import write_cache
    from drivekd.errors import DriveKDError

    for storage, compression in (("fp16", "zst"), ("bf16", "zstd")):
        with pytest.raises(DriveKDError, match="expected one of"):
            write_cache(None, {}, {}, [], tmp_path / "c", storage=storage, compression=compression)
    assert not list(tmp_path.iterdir())


def test_cache_teachers_choices_are_the_caches_own():
    from drivekd.cli.train import cache_teacher
    from drivekd.distill.cache import COMPRESSIONS, STORAGES

    choices = {p.name: tuple(p.type.choices) for p in cache_teacher.params if p.name in ("storage", "compression")}
    assert choices == {"storage": STORAGES, "compression": COMPRESSIONS}


@pytest.mark.integration
def test_an_fp8_cache_is_half_the_bytes_and_read_back_through_its_scales(one_process, tmp_path, capsys):
    from drivekd.bench.cache import uncompressed_bytes
    from drivekd.distill.cache import TeacherCache
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    config, one = one_process
    cfg = load_config(DistillConfig, config)
    fp8 = run_cache_teacher(cfg, tmp_path / "fp8", storage="fp8", echo=lambda _: None)
    exact, lossy = TeacherCache(one), TeacherCache(fp8)
    assert lossy.manifest["storage"] == "fp8" and exact.manifest["storage"] == "fp16"
    sizes = [uncompressed_bytes(d) for d in (one, fp8)]  # the values, before both caches' zstd
    assert 0.45 < sizes[1] / sizes[0] < 0.6, sizes
    sample_id = next(iter(exact.manifest["index"]))
    for k in range(3):
        want, got = exact.tensors(sample_id, f"reasoning/{k}").float(), lossy.tensors(sample_id, f"reasoning/{k}")
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max()) <= float(want.abs().max()) / 16 + 1e-3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("student", "teacher", "recipe", "storage"),
    [
        ("tiny-internvl-student", "checkpoint", "drive-kd", "fp16"),
        ("tiny-internvl-student", "checkpoint", "ce-hidden", "fp8"),
        ("tiny-qwen25vl-student", "tiny-qwen25vl-teacher", "drive-kd", "fp16"),
        ("tiny-qwen25vl-student", "tiny-qwen25vl-teacher", "ce-kl", "fp16"),
    ],
)
def test_a_frames_prefix_stored_once_reads_back_bit_for_bit(
    tmp_path, data_dir, teacher_dir, student, teacher, recipe, storage
):
    from drivekd.distill.cache import TeacherCache
    from drivekd.distill.run import run_cache_teacher
    from drivekd.train.config import DistillConfig, load_config

    raw = yaml.safe_load(_config(tmp_path, data_dir, teacher_dir).read_text())
    raw.update(model={"name": student}, recipe=recipe)
    raw["teacher"] = str(teacher_dir) if teacher == "checkpoint" else teacher
    raw["train"]["micro_batch_size"] = 3  # frames of about 8 questions span batches: padding differs
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(raw))
    cfg = load_config(DistillConfig, file)
    made = {
        share: run_cache_teacher(cfg, tmp_path / f"share-{share}", storage=storage, share_prefixes=share, echo=print)
        for share in (True, False)
    }
    shared, whole = TeacherCache(made[True]), TeacherCache(made[False])
    assert not whole.manifest["prefixes"] and len(shared.manifest["prefixes"]) >= len(whole.manifest["index"]) // 2
    names = {
        k.split("/", 1)[1].split("#")[0] for f in made[False].glob("shard-*.safetensors") for k in load_file(str(f))
    }
    assert names
    for sample_id in whole.manifest["index"]:
        for key in names:
            a, b = shared.tensors(sample_id, key), whole.tensors(sample_id, key)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (sample_id, key)
    size = [sum(f.stat().st_size for f in made[s].glob("shard-*.safetensors")) for s in (True, False)]
    assert size[0] < size[1]
