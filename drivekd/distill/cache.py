"""Teacher target cache: run the teachers once, store exactly what the recipe's losses read.

Layout of a cache folder: `manifest.json` (fingerprint, teacher depths, shard index) and
`shard-00000.safetensors`, ... with tensors keyed `<sample id>/<signal>/<k>` (fp16; or, with the
lossy `fp8` storage, float8 e4m3 values scaled row by row, the scales under `<key>#scale`). With
`zstd` compression (the default, lossless) each value tensor is stored as its zstd-compressed bytes
(uint8) and its shape under `<key>#shape`. A frame's
prefix rows (`prefix:<content key>/<signal>/<k>`) are stored once and each question's tensors hold
its rows after them (`frame_prefix`); otherwise a sample's targets are trimmed to the
sample's length. `attn_tv` keeps only the text->vision block (everything else is masked out of its
loss); `attn_full` / `attn_group` one (window-mean) map per matched student layer; `hidden` the
(window-mean) hidden states; `logit_kl` the logits. A cache whose teacher weights,
recipe, tokenizer or data differ from the run's is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drivekd import progress
from drivekd.atomic import atomic_file
from drivekd.data.sample import Sample
from drivekd.digest import sha256_of, update_with_file
from drivekd.distill.signals import BoundSignal, Signal
from drivekd.errors import DriveKDError
from drivekd.models.backend import VLMBackend

SHARD_SAMPLES = 256
OPEN_SHARDS = 64  # memory-mapped shard files a reader keeps open
# how target values are stored: fp16 (the default: the targets' own precision for the losses), or fp8
# (float8 e4m3 scaled per row to its largest value, about half the bytes; its error: docs/results.md)
STORAGES = ("fp16", "fp8")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
BYTES_PER_VALUE = {"fp16": 2, "fp8": 1}
VALUE_DTYPE = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
# how the stored values' bytes are written: zstd (lossless; attention maps are mostly tiny values and
# causal zeros, about a third smaller in fp16 and half in fp8: docs/results.md) or as they are
COMPRESSIONS = ("zstd", "none")
ZSTD_LEVEL = 3
# bytes per element of what a cache's shards hold, by safetensors' dtype names
ITEM_BYTES = {"F16": 2, "F8_E4M3": 1, "F32": 4, "U8": 1, "I64": 8}


def compress(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard's tensors as written with zstd: each value tensor as its compressed bytes and its shape
    (`#shape`); fp8's per-row scales as they are. Takes the tensors out of `shard` one by one, so a
    shard of real-size maps is not held twice."""
    import zstandard

    out: dict[str, torch.Tensor] = {}
    packer = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # one frame per tensor, its size in the header
    for key in list(shard):
        value = shard.pop(key)
        if key.endswith("#scale"):
            out[key] = value
            continue
        packed = packer.compress(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[key] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        out[f"{key}#shape"] = torch.tensor(value.shape, dtype=torch.int64)
    return out


def unpack(read: Any, key: str, storage: str) -> torch.Tensor:
    """A value tensor written by `compress`, back as stored before compression."""
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(read(key).numpy().tobytes())
    shape = read(f"{key}#shape").tolist()
    if not raw:  # torch makes no tensor from an empty buffer
        return torch.empty(shape, dtype=VALUE_DTYPE[storage])
    return torch.frombuffer(bytearray(raw), dtype=VALUE_DTYPE[storage]).reshape(shape)


def encode(value: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """A target as stored: key suffix -> tensor ("" the values, "#scale" fp8's per-row scales)."""
    if storage == "fp16":
        return {"": value.to(torch.float16).contiguous().cpu()}
    rows = value.float().reshape(-1, value.shape[-1])
    scale = rows.abs().amax(1).clamp_min(1e-30) / FP8_MAX  # each row's largest value maps to e4m3's largest
    q = (rows / scale[:, None]).to(torch.float8_e4m3fn).reshape(value.shape)
    return {"": q.contiguous().cpu(), "#scale": scale.contiguous().cpu()}


def stored_keys(key: str, storage: str, compression: str) -> list[str]:
    """The stored tensors one target is read back from."""
    return [key] + [f"{key}#scale"] * (storage == "fp8") + [f"{key}#shape"] * (compression == "zstd")


def decode(read: Any, key: str, storage: str, compression: str) -> torch.Tensor:
    """A stored target back as values (`read(key)` gives a stored tensor)."""
    stored = unpack(read, key, storage) if compression == "zstd" else read(key)
    if storage == "fp16":
        return stored
    rows = stored.float().reshape(-1, stored.shape[-1]) * read(f"{key}#scale")[:, None]
    return rows.reshape(stored.shape)


# the recipe identified by its signals bound to both models' depths (layer pairs, windows, blocks)
# and the student's depth; images by their whole content; the teacher's dtype; each sample's token
# count. /7: a frame's prefix rows stored once (`prefixes`), values' storage, each shard's writer.
# /8: values compressed (`compression`)
FORMAT = "drivekd-teacher-cache/8"


def checkpoint_digest(spec: str) -> str:
    """A model's identity by content: its config and weight files' bytes (a preset or hub id: its name)."""
    from drivekd.models.loading import PRESETS, resolve_model

    if spec in PRESETS:
        return f"preset:{spec}"
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return f"hub:{spec}"
    weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
    if not weights:
        raise DriveKDError(f"{spec}: no weight files (*.safetensors, *.bin) to identify this teacher by")
    h = hashlib.sha256()
    for file in [path / "config.json", *weights]:
        if file.is_file():
            h.update(file.name.encode())
            update_with_file(h, file)
    return h.hexdigest()[:16]


def fingerprint(
    bound: dict[str, BoundSignal],
    teacher_of: dict[str, str],
    student: VLMBackend,
    samples: Sequence[Sample],
    teacher_dtype: str,
) -> dict[str, str]:
    """What a cache depends on; each part hashed so a mismatch can be named. The recipe part is each
    signal bound to the student's and its teacher's depths (`BoundSignal.identity`): the stored targets
    are window means per matched student layer, so a student of another depth needs other targets."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # Keyed by signal, valued by content: the same weights under another spelling of their path (a
    # trailing "/", a relative path, a moved study folder, a shipped model's name) are the same teacher.
    teachers = {name: checkpoint_digest(ckpt) for name, ckpt in sorted(teacher_of.items())}
    return {
        # which weights, whatever the signals' names, and at which precision they ran
        "teacher": digest([sorted(set(teachers.values())), teacher_dtype]),
        # weights, shares, distances and mixing change the loss, not the stored targets: a cache serves them all
        "recipe": digest({n: b.identity() for n, b in bound.items()} | {"_teachers": teachers}),
        "tokenizer": digest(student.tokenizer.get_vocab()),
        "data": digest(data_identity(samples)),
    }


def data_identity(samples: Sequence[Sample]) -> list[Any]:
    """What a cache's data is: ids, questions, answers, and each image by its path relative to the
    images' common folder and the SHA-256 of its whole file. The same dataset moved or copied keeps
    its caches; an image re-rendered or corrupted under the same name does not, wherever in the file
    the change is (a hash of the first 64 KiB would miss a BMP repainted below its top rows).
    Each file is read once (its cost: docs/results.md)."""
    paths = [im.path for s in samples for im in s.images]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    seen: dict[str, str] = {}

    def image(path: str) -> tuple[str, str]:
        if path not in seen:
            seen[path] = sha256_of(path)[:32]
        return os.path.relpath(path, root), seen[path]

    return [(s.id, s.question, s.answer, [image(im.path) for im in s.images]) for s in samples]


def shard_plan(samples: Sequence[Sample], shard_samples: int = SHARD_SAMPLES) -> list[list[int]]:
    """Sample indices of each shard, whatever the number of processes writing them: frames (the samples
    showing the same images) are kept whole and taken in order of first appearance, and a shard closes
    at the first frame boundary at or past `shard_samples` samples."""
    frames: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(samples):
        frames.setdefault(tuple(im.path for im in s.images), []).append(i)
    plan: list[list[int]] = [[]]
    for members in frames.values():
        if len(plan[-1]) >= shard_samples:
            plan.append([])
        plan[-1].extend(members)
    return [shard for shard in plan if shard]


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


class Ranks:
    """The processes writing one cache together (one, or those of a `torchrun` launch)."""

    def __init__(self) -> None:
        from accelerate import PartialState

        # on CPUs accelerate joins a torchrun launch's processes only when told it runs on the CPU
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world_size = self.state.process_index, self.state.num_processes

    @property
    def device(self) -> str:
        return str(self.state.device) if torch.cuda.is_available() else "cpu"

    def wait(self) -> None:
        self.state.wait_for_everyone()


def write_cache(
    teachers: Any,
    signals: dict[str, Signal],
    teacher_of: dict[str, str],
    samples: Sequence[Sample],
    out: Path,
    batch_size: int = 8,
    *,
    shard_samples: int = SHARD_SAMPLES,
    ranks: Ranks | None = None,
    echo: Any = print,
    storage: str = "fp16",
    share_prefixes: bool = True,
    reuse_prefix: bool = True,
    compression: str = "zstd",
) -> dict[str, Any]:
    """Run live teachers (`teachers.LiveTeachers`) over `samples` and write the cache folder.

    The shards are planned from the samples alone (`shard_plan`) and each is batched on its own, so
    any number of processes writes the same tensors: process r writes shards r, r + N, ... Shards
    are written into `.NAME.partial/` beside the cache, each file renamed into place when complete; a
    killed run, run again with the same config, redoes only the shards it had not finished. The
    finished folder then takes the place of `out` (the old one moved aside first, then removed).
    `reuse_prefix`: each frame's prefix runs once, its questions after its KV cache (`_write_shard`)."""
    if storage not in STORAGES or compression not in COMPRESSIONS:
        raise DriveKDError(
            f"cache storage {storage!r} / compression {compression!r}: expected one of {STORAGES} / {COMPRESSIONS}"
        )
    ranks = ranks or Ranks()
    student = teachers.student
    plan = shard_plan(samples, shard_samples)
    header: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": fingerprint(teachers.bound, teacher_of, student, samples, teachers.dtype),
        "student_depth": student.num_layers,
        "teacher_depths": {n: teachers.depth(n) for n in signals},
        "teacher_widths": {n: teachers.width(n) for n in signals},
        "storage": storage,
        "compression": compression,
        "prefix_sharing": share_prefixes,
        # the targets' rounding depends on it (the prefix's matrix products have other shapes), so a
        # run resumed with the other setting starts over
        "prefix_reuse": reuse_prefix,
    }
    # what the shards' bytes depend on besides the header: which samples, batched how
    planned = {**header, "batch_size": batch_size, "shards": [[samples[i].id for i in shard] for shard in plan]}
    work, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    if ranks.rank == 0:
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed while swapping in its cache
        plan_file = work / "plan.json"
        if not (plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) == planned):
            shutil.rmtree(work, ignore_errors=True)  # another config's shards, or none
            work.mkdir(parents=True)
            with atomic_file(plan_file) as tmp:
                tmp.write_text(json.dumps(planned), encoding="utf-8")
    ranks.wait()
    mine = [n for n in range(len(plan)) if n % ranks.world_size == ranks.rank]
    todo = [n for n in mine if not (work / shard_name(n)).with_suffix(".json").is_file()]
    if ranks.rank == 0 and len(todo) < len(mine):
        echo(f"resuming {work}: {len(mine) - len(todo)} of this process's {len(mine)} shards are written")
    bar = progress.bar(total=sum(len(plan[n]) for n in todo), desc="cache", unit="sample", disable=ranks.rank != 0)
    for number in todo:
        samples_of = [samples[i] for i in plan[number]]
        _write_shard(
            teachers,
            signals,
            samples_of,
            work,
            number,
            batch_size,
            ranks,
            storage,
            share_prefixes,
            reuse_prefix,
            compression,
        )
        bar.update(len(plan[number]))
    bar.close()
    ranks.wait()
    manifest: dict[str, Any] = {
        **header,
        "world_size": ranks.world_size,
        "shards": {},
        "index": {},
        "lengths": {},
        "prefixes": {},  # sample id -> [frame prefix key, its tokens, its text tokens], where shared
        "teacher_seconds": 0.0,  # the teachers' forward passes, summed over shards (and processes)
        "after_prefix": 0,  # questions the teacher ran after their frame's prefix's KV cache
    }
    if ranks.rank == 0:
        for number in range(len(plan)):
            written = json.loads((work / shard_name(number)).with_suffix(".json").read_text(encoding="utf-8"))
            manifest["shards"][shard_name(number)] = {"rank": written["rank"], "samples": len(written["lengths"])}
            manifest["lengths"].update(written["lengths"])
            manifest["prefixes"].update(written["prefixes"])
            manifest["index"].update(dict.fromkeys(written["lengths"], shard_name(number)))
            manifest["teacher_seconds"] += written["teacher_seconds"]
            manifest["after_prefix"] += written["after_prefix"]
        # the plan and the shards' records stay in the cache: its account of what was written by whom
        with atomic_file(work / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if out.exists():  # a kill between the two renames leaves `old` (removed next time) and `work`
            os.replace(out, old)  # complete, which the next run only renames
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    ranks.wait()
    return manifest


def frame_prefix(ids: torch.Tensor, visual: torch.Tensor, images: Sequence[str]) -> tuple[str, int, int]:
    """A sample's frame prefix: everything up to its last visual token (the preamble and every camera's
    tokens, alike for every question about the frame), as (content key, tokens, text tokens among
    them). Attention is causal, so every target row of these positions is the same for all of them."""
    where = visual.nonzero()
    length = int(where[-1]) + 1 if len(where) else 0
    h = hashlib.sha256(ids[:length].cpu().numpy().tobytes())
    h.update("\n".join(images).encode())
    return h.hexdigest()[:24], length, int((~visual[:length]).sum())


def prefix_groups(student: VLMBackend, samples: Sequence[Sample]) -> tuple[list[list[int]], list[int]]:
    """Which samples the teacher can run after a shared prefix: groups (indices, in order of first
    appearance) of two or more samples whose token ids agree up to their last visual token, with
    the same images and tokens after it; and the others (no images, or a prefix no other sample has),
    which run whole. Token ids come from the tokenizer alone (no pixels are read)."""
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for i, sample in enumerate(samples):
        ids = student.token_ids(sample)
        visual = [p for p, t in enumerate(ids) if t == student.visual_token_id]
        length = visual[-1] + 1 if visual else 0
        if length == 0 or len(ids) <= length:
            by_key[("whole", i)] = [i]
            continue
        by_key.setdefault((tuple(ids[:length]), tuple(im.path for im in sample.images)), []).append(i)
    groups = [g for g in by_key.values() if len(g) > 1]
    alone = sorted(i for g in by_key.values() if len(g) == 1 for i in g)
    return groups, alone


def _write_shard(
    teachers: Any,
    signals: dict[str, Signal],
    chunk_samples: Sequence[Sample],
    work: Path,
    number: int,
    batch_size: int,
    ranks: Ranks,
    storage: str,
    share_prefixes: bool = True,
    reuse_prefix: bool = True,
    compression: str = "zstd",
) -> None:
    """One shard's tensors, then its record (the rank that wrote it, each sample's tokens and frame
    prefix, the teacher's seconds): a shard whose record exists is complete.

    With `reuse_prefix`, the teacher runs each frame's prefix (preamble and images) once and the
    questions about it after its KV cache (`LiveTeachers.run_prefix`), in batches of `batch_size`;
    a sample whose prefix no other sample shares runs whole, as all do without it. The targets are
    the whole forward's to rounding (tests/test_cache_reuse.py).

    With `share_prefixes`, a frame's prefix rows are stored once (`prefix:<key>/...`) and each sample
    stores only its rows after them. A sample whose own stored prefix rows are not bit for bit the
    stored ones keeps its whole targets, so what is read back is exactly what is stored unshared."""
    student = teachers.student
    shard: dict[str, torch.Tensor] = {}
    lengths: dict[str, int] = {}
    prefixes: dict[str, list[Any]] = {}
    groups, alone = prefix_groups(student, chunk_samples) if reuse_prefix else ([], list(range(len(chunk_samples))))
    # (samples, the group whose prefix they run after, or None: whole); a group's prefix runs before its first batch
    work_list: list[tuple[list[int], int | None]] = []
    for g, group in enumerate(groups):
        work_list += [(group[i : i + batch_size], g) for i in range(0, len(group), batch_size)]
    work_list += [(alone[i : i + batch_size], None) for i in range(0, len(alone), batch_size)]
    teacher_s = 0.0
    prefix, prefix_of = None, None
    for indices, group_number in work_list:
        chunk = [chunk_samples[i] for i in indices]
        batch = student.build_batch(chunk).to(student.device)
        start = time.perf_counter()
        if group_number is None:
            targets = teachers.targets(batch)
        else:
            if group_number != prefix_of:
                prefix = None  # the previous frame's KV cache freed before this one's is made
                _, rows, _ = frame_prefix(batch.inputs["input_ids"][0], batch.visual_mask[0], [])
                prefix = teachers.run_prefix(student.build_batch(chunk[:1]).to(student.device), rows)
                prefix_of = group_number
            targets = teachers.targets(batch, prefix)
        if batch.inputs["input_ids"].is_cuda:  # the clock stops when the device's queued work is done
            torch.cuda.synchronize(batch.inputs["input_ids"].device)
        teacher_s += time.perf_counter() - start
        counts = [int(n) for n in batch.inputs["attention_mask"].sum(1).tolist()]
        for b, sample in enumerate(chunk):
            visual = batch.visual_mask[b, : counts[b]]
            values = {
                f"{name}/{k}": sig.stored(target[b], counts[b], visual)
                for name, sig in signals.items()
                for k, target in enumerate(targets[name])
            }
            key, rows, text_rows = frame_prefix(batch.inputs["input_ids"][b], visual, [im.path for im in sample.images])
            split = _shared_split(signals, values, rows, text_rows, key, shard, storage) if share_prefixes else None
            for name_k, value in values.items():
                kept = value if split is None else value[split[name_k] :]
                for suffix, stored in encode(kept, storage).items():
                    shard[f"{sample.id}/{name_k}{suffix}"] = stored
            if split is not None:
                prefixes[sample.id] = [key, rows, text_rows]
            else:  # (a repeated id whose first copy shared: its whole targets replaced those)
                prefixes.pop(sample.id, None)
            lengths[sample.id] = counts[b]
    with atomic_file(work / shard_name(number)) as tmp:
        save_file(compress(shard) if compression == "zstd" else shard, str(tmp))
    with atomic_file((work / shard_name(number)).with_suffix(".json")) as tmp:
        record = {
            "rank": ranks.rank,
            "world_size": ranks.world_size,
            "lengths": lengths,
            "prefixes": prefixes,
            "teacher_seconds": teacher_s,
            "after_prefix": sum(len(g) for g in groups),
        }
        tmp.write_text(json.dumps(record))


def _shared_split(
    signals: dict[str, Signal],
    values: dict[str, torch.Tensor],
    rows: int,
    text_rows: int,
    key: str,
    shard: dict[str, torch.Tensor],
    storage: str,
) -> dict[str, int] | None:
    """Rows of each stored target that the frame's prefix holds, storing the prefix when it is the
    frame's first; None when the sample cannot share it (nothing after the prefix, or its prefix rows
    differ from the stored ones by a bit)."""
    split, heads = {}, {}
    for name_k, value in values.items():
        sig = signals[name_k.split("/")[0]]
        r = text_rows if sig.text_rows_only else rows
        if r == 0 or value.shape[0] <= r:
            return None
        head = value[:r]
        if sig.square:  # a causal map's prefix rows are zero right of the prefix: kept as (r, r)
            if bool(head[:, r:].any()):
                return None
            head = head[:, :r]
        split[name_k], heads[name_k] = r, encode(head, storage)
    first = f"prefix:{key}/{next(iter(values))}" not in shard
    for name_k, encoded in heads.items():
        for suffix, stored in encoded.items():
            name = f"prefix:{key}/{name_k}{suffix}"
            if first:
                shard[name] = stored
            elif not torch.equal(shard[name].view(torch.uint8), stored.view(torch.uint8)):
                return None
    return split


def estimate_bytes(
    bound: dict[str, BoundSignal],
    lengths: Sequence[int],
    visual: Sequence[int],
    widths: dict[str, int],
    vocab: int,
    storage: str = "fp16",
    *,
    prefixes: Sequence[int] | None = None,
    questions_per_frame: float = 1.0,
) -> int:
    """The cache's size in bytes with `storage` before compression (zstd's saving depends on the
    teacher's maps), from token counts alone (before any teacher runs; fp8's per-row scales, 4 bytes a
    row, left out). With `prefixes` (each sample's frame-prefix tokens, its
    visual tokens among them), a frame's prefix rows count once per `questions_per_frame` questions:
    they hold what the targets would store for a sample as long as its prefix."""
    total = 0.0
    for name, b in bound.items():
        for i, (n, v) in enumerate(zip(lengths, visual, strict=True)):
            elements = b.signal.stored_elements(n, v, widths[name], vocab)
            if prefixes is not None:  # as `_shared_split` stores them
                r = prefixes[i]
                if b.signal.square:  # the prefix block (r x r) once, the question's rows at full width
                    elements = (n - r) * n + r * r / questions_per_frame
                else:
                    head = b.signal.stored_elements(r, v, widths[name], vocab)
                    elements -= head * (1 - 1 / questions_per_frame)
            total += BYTES_PER_VALUE[storage] * len(b.pairs) * elements
    return int(total)


def cache_format(folder: str | Path) -> str | None:
    """The format a cache folder's manifest declares; None where there is no manifest."""
    file = Path(folder) / "manifest.json"
    return json.loads(file.read_text(encoding="utf-8")).get("format") if file.is_file() else None


class TeacherCache:
    """Reads cached targets back into the padded batch layout the losses expect."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        file = self.folder / "manifest.json"
        if not file.is_file():
            raise DriveKDError(
                f"{self.folder}: not a teacher cache (no manifest.json); build it with `drivekd cache-teacher`"
            )
        self.manifest = json.loads(file.read_text(encoding="utf-8"))
        if (found := self.manifest.get("format")) != FORMAT:
            raise DriveKDError(
                f"{self.folder}: a cache of format {found!r}, this drivekd reads {FORMAT!r}; "
                "rebuild it with `drivekd cache-teacher`"
            )
        # Shards are memory-mapped and a sample's tensors read alone: a shuffled batch touches several
        # shards, and at real shapes one shard is gigabytes, of which a batch needs a few samples.
        self.storage, self.compression = self.manifest["storage"], self.manifest["compression"]
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # the prefetching thread and the training step read alike

    def check(self, expected: dict[str, str], student_depth: int) -> None:
        """Refuse a cache made for another teacher, recipe binding, tokenizer or data than the run's."""
        made_for = self.manifest["student_depth"]
        if made_for != student_depth:
            raise DriveKDError(
                f"{self.folder}: cache was made for a {made_for}-layer student, this run's has {student_depth} "
                "layers (its targets are matched to the student's layers); rebuild it with `drivekd cache-teacher`"
            )
        for part, value in expected.items():
            if self.manifest["fingerprint"].get(part) != value:
                raise DriveKDError(
                    f"{self.folder}: cache was made for a different {part} than this run's; rebuild it with "
                    "`drivekd cache-teacher`"
                )

    def teacher_depth(self, name: str) -> int:
        return int(self.manifest["teacher_depths"][name])

    def _shard(self, file: str) -> Any:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        handle = safe_open(str(self.folder / file), framework="pt")
        self._open[file] = handle
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return handle

    def check_length(self, sample_id: str, length: int) -> None:
        cached = self.manifest["lengths"].get(sample_id)
        if cached != length:
            raise DriveKDError(
                f"{self.folder}: sample {sample_id} has {length} tokens in this run and {cached} in the cache (another "
                "tokenizer, prompt or image layout?); rebuild it with `drivekd cache-teacher`"
            )

    def tensors(self, sample_id: str, key: str) -> torch.Tensor:
        file = self.manifest["index"].get(sample_id)
        if file is None:
            raise DriveKDError(f"{self.folder}: sample {sample_id} is not in the cache")
        shared = self.manifest["prefixes"].get(sample_id)
        names = [f"{sample_id}/{key}"] + ([f"prefix:{shared[0]}/{key}"] if shared is not None else [])
        with self._lock:  # the stored tensors only: decompressing needs no lock, and the step may wait on it
            handle = self._shard(file)
            raw = {k: handle.get_tensor(k) for n in names for k in stored_keys(n, self.storage, self.compression)}
        own = decode(raw.__getitem__, names[0], self.storage, self.compression)
        if shared is None:
            return own
        head = decode(raw.__getitem__, names[1], self.storage, self.compression)
        if head.shape[1] < own.shape[1]:  # a causal map's prefix rows: zero right of the prefix
            head = torch.nn.functional.pad(head, (0, own.shape[1] - head.shape[1]))
        return torch.cat([head, own])
