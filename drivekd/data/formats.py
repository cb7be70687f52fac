"""Readers for every supported data format, and the native JSONL writer.

Formats (docs/method.md §2):
- `native`: JSONL, one `Sample` per line, image paths relative to the file (DriveSim-QA writes it).
- `reference`: the reference code's JSON list of `{"messages", "images", "question_type"}`.
- `drivebench`: DriveBench's JSON list of `{"scene_token", "frame_token", "question_type",
  "question", "answer", "tag", "image_path": {camera: path}}`.
- `drivelm`: DriveLM-nuScenes' `{scene: {"key_frames": {frame: {"QA": {...}, "image_paths"}}}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from drivekd.atomic import atomic_file
from drivekd.data.choices import answer_letter, parse_inline_options
from drivekd.data.paths import ImageResolver
from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample, normalize_capability
from drivekd.errors import DataError

FORMATS: tuple[str, ...] = ("native", "reference", "drivebench", "drivelm")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_CAMERA_IN_PATH = re.compile(r"(CAM_[A-Z_]+?)(?:__|/|\.|$)")


def load_samples(path: str | Path, fmt: str | None = None, image_roots: Sequence[str] = ()) -> list[Sample]:
    """Read samples from a data file, or from every split file of a native dataset folder."""
    files = data_files(path)
    return [s for f in files for s in _load_file(f, fmt, image_roots)]


def load_split(directory: str | Path, split: str, image_roots: Sequence[str] = ()) -> list[Sample]:
    """Read one split (`train`, `val`, `test`) of a native dataset folder."""
    file = Path(directory) / f"{split}.jsonl"
    if not file.is_file():
        raise DataError(f"{directory}: no {split}.jsonl in this dataset folder")
    return _load_file(file, "native", image_roots)


def data_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = [path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()]
        if not files:
            raise DataError(f"{path}: folder holds none of {', '.join(s + '.jsonl' for s in SPLITS)}")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def detect_format(file: Path) -> str:
    if file.suffix == ".jsonl" or _is_json_lines(file):
        return "native"
    data = _parse_json(file)
    if isinstance(data, dict) and "capability" in data:  # one native line in a .json file
        return "native"
    if isinstance(data, dict):
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "key_frames" in first:
            return "drivelm"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if "messages" in data[0]:
            return "reference"
        if "image_path" in data[0] or "scene_token" in data[0]:
            return "drivebench"
        if "capability" in data[0]:
            return "native"
    raise DataError(f"{file}: cannot tell the format (expected one of {', '.join(FORMATS)}); pass --format")


def _load_file(file: Path, fmt: str | None, image_roots: Sequence[str]) -> list[Sample]:
    fmt = fmt or detect_format(file)
    if fmt not in FORMATS:
        raise DataError(f"{file}: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    resolve = ImageResolver(file, image_roots)
    if fmt == "native":
        items: Iterator[tuple[str, Sample]] = _read_native(file, resolve)
    elif fmt == "reference":
        items = _read_reference(file, resolve)
    elif fmt == "drivebench":
        items = _read_drivebench(file, resolve)
    else:
        items = _read_drivelm(file, resolve)
    samples = []
    seen: dict[str, str] = {}
    try:
        for where, sample in items:
            sample.check(where)
            if sample.id in seen:
                raise DataError(f"{where}: duplicate sample id {sample.id!r} (also {seen[sample.id]})")
            seen[sample.id] = where
            samples.append(sample)
    except DataError as e:
        if str(file) in str(e):
            raise
        raise DataError(f"{file}: {e}") from e  # e.g. the image resolver's, which knows no file
    return samples


def _is_json_lines(file: Path) -> bool:
    """A `.json` file holding JSON Lines (one object per line): parsed whole it fails with "Extra data"
    at line 2, column 1, which names no real fault; read line by line, errors point at the line."""
    try:
        with open(file, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
            second = next((line for line in f if line.strip()), None)
    except (OSError, UnicodeDecodeError):
        return False
    if second is None:
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _parse_json(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e


def _require(item: Any, key: str, where: str) -> Any:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if key not in item or item[key] is None:
        raise DataError(f"{where}: missing required field {key!r}")
    return item[key]


def _typed(item: Any, key: str, where: str, kind: type, what: str) -> Any:
    value = _require(item, key, where)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {what}, got {type(value).__name__}")
    return value


def _choices_field(item: dict[str, Any], where: str) -> tuple[dict[str, str] | None, str | None]:
    choices, letter = item.get("choices"), item.get("correct_choice")
    if choices is not None and not (
        isinstance(choices, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
    ):
        raise DataError(f"{where}: field 'choices' must map letters to option texts")
    if letter is not None and not isinstance(letter, str):
        raise DataError(f"{where}: field 'correct_choice' must be a letter, got {type(letter).__name__}")
    return choices or None, letter


def _read_native(file: Path, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{lineno}:{e.colno}: malformed JSON: {e.msg}") from e
            where = f"{file}: item {lineno - 1} (line {lineno})"
            images = []
            for k, im in enumerate(_typed(item, "images", where, list, "a list")):
                images.append(
                    ImageRef(
                        str(_require(im, "camera", f"{where} image {k}")),
                        resolve(_require(im, "path", f"{where} image {k}")),
                    )
                )
            sample_id = str(_require(item, "id", where))
            capability = normalize_capability(_require(item, "capability", where), where=where)
            question = str(_require(item, "question", where))
            answer = str(_require(item, "answer", where))
            choices, letter = _choices_field(item, where)
            if choices is None:
                choices, inline_letter = _choices_of(question, answer)
                letter = letter if letter is not None else inline_letter
            elif letter is None:
                found = answer_letter(answer)
                letter = found if found in choices else None
            yield (
                where,
                Sample(
                    id=sample_id,
                    capability=capability,
                    question_type=str(item.get("question_type") or capability),
                    images=images,
                    question=question,
                    answer=answer,
                    scene_id=str(item.get("scene_id") or sample_id),
                    choices=choices,
                    correct_choice=letter,
                    facts=item.get("facts") or {},
                ),
            )


def _camera_name(path: str, index: int, count: int) -> str:
    m = _CAMERA_IN_PATH.search(path)
    if m:
        return m.group(1)
    return "CAM_FRONT" if count == 1 else f"IMAGE_{index}"


def _choices_of(question: str, answer: str) -> tuple[dict[str, str] | None, str | None]:
    options = parse_inline_options(question)
    if options is None:
        return None, None
    letter = answer_letter(answer)
    return options, letter if letter in options else None


def _read_reference(file: Path, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    data = _parse_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: reference format must be a JSON list of items")
    for i, item in enumerate(data):
        where = f"{file}: item {i}"
        messages = _typed(item, "messages", where, list, "a list")
        raw_images = _typed(item, "images", where, list, "a list")
        capability_name = _require(item, "question_type", where)
        user = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        bot = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not user:
            raise DataError(f"{where}: missing required field 'messages[role=user]'")
        if not bot:
            raise DataError(f"{where}: missing required field 'messages[role=assistant]'")
        question, answer = str(user[0]), str(bot[0])
        images = [ImageRef(_camera_name(str(p), k, len(raw_images)), resolve(str(p))) for k, p in enumerate(raw_images)]
        choices, letter = _choices_of(question, answer)
        scene = Path(str(raw_images[0])).stem if raw_images else f"{file.stem}-{i}"
        yield (
            where,
            Sample(
                id=str(item.get("id") or f"{file.stem}-{i}"),
                capability=normalize_capability(capability_name, where=where),
                question_type=str(item.get("question_subtype") or capability_name),
                images=images,
                question=question,
                answer=answer,
                scene_id=str(item.get("scene_id") or scene),
                choices=choices,
                correct_choice=letter,
            ),
        )


def _with_placeholders(question: str, cameras: Sequence[str]) -> str:
    """DriveBench/DriveLM questions carry no placeholders: prepend one per camera, in order."""
    if question.count(IMAGE_PLACEHOLDER) == len(cameras):
        return question
    header = "".join(f"{cam}: {IMAGE_PLACEHOLDER}\n" for cam in cameras)
    return header + question


def _read_drivebench(file: Path, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    data = _parse_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: DriveBench format must be a JSON list of items")
    for i, item in enumerate(data):
        where = f"{file}: item {i}"
        qtype = str(_require(item, "question_type", where))
        capability = normalize_capability(qtype, where=where)
        paths = _require(item, "image_path", where)
        if not isinstance(paths, dict):
            raise DataError(f"{where}: field 'image_path' must map camera names to paths")
        question = str(_require(item, "question", where))
        answer = str(_require(item, "answer", where))
        choices, letter = _choices_of(question, answer)
        frame = str(item.get("frame_token") or f"frame{i}")
        yield (
            where,
            Sample(
                id=f"{frame}:{i}",
                capability=capability,
                question_type=qtype.lower(),
                images=[ImageRef(cam, resolve(str(p))) for cam, p in paths.items()],
                question=_with_placeholders(question, list(paths)),
                answer=answer,
                scene_id=str(item.get("scene_token") or frame),
                choices=choices,
                correct_choice=letter,
                facts={"tag": item["tag"]} if "tag" in item else {},
            ),
        )


def _read_drivelm(file: Path, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    data = _parse_json(file)
    if not isinstance(data, dict):
        raise DataError(f"{file}: DriveLM format must be a JSON object keyed by scene id")
    for scene_id, scene in data.items():
        frames = _typed(scene, "key_frames", f"{file}: scene {scene_id}", dict, "an object of frames")
        for frame_id, frame in frames.items():
            fwhere = f"{file}: scene {scene_id} frame {frame_id}"
            qa = _typed(frame, "QA", fwhere, dict, "an object of question lists")
            paths = _typed(frame, "image_paths", fwhere, dict, "an object mapping cameras to paths")
            images = [ImageRef(cam, resolve(str(p))) for cam, p in paths.items()]
            for qtype, items in qa.items():
                if not isinstance(items, list):
                    raise DataError(f"{fwhere}: QA {qtype!r} must be a list of questions")
                for k, item in enumerate(items):
                    where = f"{fwhere} {qtype}[{k}]"
                    question = str(_require(item, "Q", where))
                    answer = str(_require(item, "A", where))
                    choices, letter = _choices_of(question, answer)
                    yield (
                        where,
                        Sample(
                            id=f"{frame_id}:{qtype}:{k}",
                            capability=normalize_capability(qtype, where=where),
                            question_type=qtype.lower(),
                            images=list(images),
                            question=_with_placeholders(question, list(paths)),
                            answer=answer,
                            scene_id=str(scene_id),
                            choices=choices,
                            correct_choice=letter,
                        ),
                    )


def write_jsonl(samples: Sequence[Sample], out: str | Path) -> None:
    """Write samples as native JSONL (atomically); image paths become relative to the file."""
    out = Path(out)
    base = out.resolve().parent
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(base), ensure_ascii=False, sort_keys=True) + "\n")
