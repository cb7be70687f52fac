"""A run folder knows what run it holds: whether a command may start, resume or has nothing to do.

A run's identity is every config field that changes its result, plus what the config names but does
not contain (a recipe's signals). A fresh start records it (`run.json`); `--resume` compares the new
config with it and refuses a change with the diff, except for fields that only change how the run is
watched or kept, and `train.max_steps` / `train.epochs`, which may grow to train on. Resuming a
finished run with nothing to add is a no-op that writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from drivekd.atomic import atomic_file, write_json
from drivekd.data.sample import Sample
from drivekd.errors import DriveKDError

RECORD = "run.json"
RECORD_VERSION = 4  # 4: steps per epoch (grad_accum, several processes) and sharded checkpoints changed; 3: the experimental fields left the product configs
# fields that change neither the weights nor the metrics of the run
NO_EFFECT = frozenset(
    {"train.save_every", "train.keep_last", "train.loader_workers", "train.log_every", "train.eval_every"}
)
MAY_GROW = frozenset({"train.max_steps", "train.epochs"})


# where the run is written is not what it is: a moved folder, or an absolute path, resumes
NOT_IDENTITY = frozenset({"train.output_dir"})


def run_identity(config: BaseModel, **named: Any) -> dict[str, Any]:
    """The config's fields flattened to dotted keys (paths that exist made absolute, so `data` and
    `./data` are one dataset), with `named` contents (e.g. `recipe=...`) and the number of processes,
    which sets the global batch and each rank's samples, added."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(inner, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = value

    walk(config.model_dump(mode="json"), "")
    walk(json.loads(json.dumps({**named, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, default=str)), "named.")
    for key in NOT_IDENTITY:
        flat.pop(key, None)
    for key, value in flat.items():
        if _names_a_path(key) and isinstance(value, str) and value and Path(value).exists():
            flat[key] = os.path.abspath(value)
    return flat


def samples_digest(samples: Sequence[Sample]) -> str:
    """What a run's data says, cheaply: each sample's id, capability, question type, question, options
    and answer, in order (images are checked by decoding, not hashed here)."""
    h = hashlib.sha256()
    for s in samples:
        fields = (s.id, s.capability, s.question_type, s.question, s.choices, s.correct_choice, s.answer)
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:16]


class RunFolder:
    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir)

    @property
    def finished(self) -> bool:
        return (self.path / "final" / "model.safetensors").is_file()

    def has_checkpoint(self) -> bool:
        ckpts = self.path / "checkpoints"
        return ckpts.is_dir() and any(ckpts.glob("step-*"))

    def recorded(self) -> dict[str, Any] | None:
        file = self.path / RECORD
        if not file.is_file():
            return None
        record = json.loads(file.read_text(encoding="utf-8"))
        if record.get("version") != RECORD_VERSION:
            raise DriveKDError(
                f"{file}: written by an older drivekd (its identity is not comparable); start a new train.output_dir"
            )
        return record["identity"]

    def check(self, identity: dict[str, Any], *, resume: bool) -> bool:
        """Before any work: whether to train (True) or nothing is left to do (False, resuming a finished
        run unchanged); a start that would mix with or overwrite another run is a one-line error."""
        if not resume:
            if self.finished:
                raise DriveKDError(
                    f"{self.path}: holds a finished run (final/); choose another train.output_dir, or delete it"
                )
            if self.has_checkpoint():
                raise DriveKDError(
                    f"{self.path}: holds checkpoints of an earlier run; pass --resume, or choose another "
                    "train.output_dir"
                )
            return True
        before = self.recorded()
        if before is None and (self.has_checkpoint() or self.finished):
            raise DriveKDError(f"{self.path}: no {RECORD}: written by an older drivekd, cannot be resumed safely")
        if before is not None:
            known_later = {"named.data"}  # compared by check_data once the data is read
            changed = sorted(
                k for k in (before.keys() | identity.keys()) - known_later if before.get(k) != identity.get(k)
            )
            refused = [k for k in changed if k not in NO_EFFECT | MAY_GROW]
            if refused:
                diff = "; ".join(f"{k}: {_show(before.get(k))} -> {_show(identity.get(k))}" for k in refused[:4])
                more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
                raise DriveKDError(
                    f"{self.path}: --resume with a config that changes the run ({diff}{more}); resume with the run's "
                    "own config, or start a new train.output_dir"
                )
            for key in sorted(MAY_GROW & set(changed)):
                old, new = before.get(key), identity.get(key)
                if old is not None and new is not None and new < old:
                    raise DriveKDError(f"{self.path}: --resume may extend {key} ({old}), not shrink it to {new}")
            if self.finished and not (MAY_GROW & set(changed)):
                return False
        if not self.has_checkpoint():
            raise DriveKDError(f"{self.path}: --resume given but there is no checkpoint to resume from")
        return True

    def check_data(self, digest: str, *, resume: bool) -> None:
        """After the data is read: a resumed run must read the data it was started with."""
        before = self.recorded() if resume else None
        if before is not None and before.get("named.data", digest) != digest:
            raise DriveKDError(
                f"{self.path}: --resume with other data than the run was started with (the samples' ids, questions "
                "or answers differ, at the same data.path?); resume with the run's own data"
            )

    def record(self, identity: dict[str, Any]) -> None:
        with atomic_file(self.path / RECORD) as tmp:
            record = {"version": RECORD_VERSION, "identity": identity}
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def _names_a_path(key: str) -> bool:
    return (
        key.endswith(".path")
        or key in {"recipe", "model.name", "teacher.name", "teacher.cache"}
        or (key.startswith("teacher.per_signal."))
    )


# ---- folders of many runs (a study, a base's build) -------------------------------------------------


def claim_folder(path: Path, record: str, settings: dict[str, Any], what: str) -> None:
    """Start `path` as a folder of `what` made with `settings` (recorded in `record`), or accept it
    back with the same settings. Other settings, or a non-empty folder without the record, are a
    one-line error naming what differs."""
    file = path / record
    if file.is_file():
        existing = json.loads(file.read_text(encoding="utf-8")).get("settings") or {}
        if existing != settings:
            diff = sorted(k for k in existing.keys() | settings.keys() if existing.get(k) != settings.get(k))
            raise DriveKDError(
                f"{path}: holds a {what} with other settings (differs in: {', '.join(diff)}); choose another "
                "--out, or delete it"
            )
        return
    if path.exists() and any(path.iterdir()):
        raise DriveKDError(f"{path}: exists and is not a drivekd {what} (no {record}); choose another --out")
    write_json(file, {"settings": settings, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


class Timings:
    """`timings.jsonl` of a folder of many runs: one line per finished step (appended, so steps
    finishing in several processes each add their own line)."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "timings.jsonl"

    def log(self, step: str, seconds: float) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "seconds": round(seconds, 1), "end": round(time.time(), 1)}) + "\n")

    def timed(self, step: str, fn: Callable[[], Any], echo: Callable[[str], None], label: str) -> Any:
        """Run `fn`, saying when it starts and how long it took, and log it."""
        echo(f"[{label}] {step} ...")
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.log(step, seconds)
        echo(f"[{label}] {step}: {seconds:.0f} s")
        return result

    def totals(self) -> dict[str, float]:
        """Seconds per step, summed over the attempts the file records."""
        out: dict[str, float] = {}
        if self.file.is_file():
            for line in self.file.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                out[rec["step"]] = out.get(rec["step"], 0.0) + rec["seconds"]
        return out
