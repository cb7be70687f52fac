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
import posixpath
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
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
    samples = [s for f in files for s in _load_file(f, fmt, image_roots)]
    _warn_duplicates(samples, str(path))
    return samples


def load_split(directory: str | Path, split: str, image_roots: Sequence[str] = ()) -> list[Sample]:
    """Read one split (`train`, `val`, `test`) of a native dataset folder."""
    file = Path(directory) / f"{split}.jsonl"
    if not file.is_file():
        raise DataError(f"{directory}: no {split}.jsonl in this dataset folder")
    samples = _load_file(file, "native", image_roots)
    _warn_duplicates(samples, str(file))
    return samples


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
    """The format of a data file, told from the keys of its records (not from its extension)."""
    return _detect(file, _content(file))


class _Lines(list[tuple[str, Any]]):
    """A JSON Lines file's records: `(where, record)` pairs, blank lines skipped."""


# Keys that mark a record of each record-per-item format. A record carrying keys of two formats is
# ambiguous and refused rather than guessed.
_RECORD_KEYS: dict[str, tuple[str, ...]] = {
    "native": ("capability",),
    "reference": ("messages",),
    "drivebench": ("image_path", "scene_token", "frame_token"),
}


def _record_format(record: Any, where: str) -> str | None:
    if not isinstance(record, dict):
        return None
    kinds = [fmt for fmt, keys in _RECORD_KEYS.items() if any(k in record for k in keys)]
    if len(kinds) > 1:
        marks = "; ".join(f"{k}: {', '.join(repr(x) for x in _RECORD_KEYS[k] if x in record)}" for k in kinds)
        raise DataError(f"{where}: record has keys of several formats ({marks}); pass --format")
    return kinds[0] if kinds else None


def _detect(file: Path, content: Any) -> str:
    if isinstance(content, _Lines):
        if not content:
            return "native"  # an empty .jsonl: read as no samples
        where, first = content[0]
        return _record_format(first, where) or "native"  # native's reader names the missing fields
    if isinstance(content, list) and not content:
        raise DataError(f"{file}: holds no samples (an empty JSON list)")
    if isinstance(content, dict) and not content:
        raise DataError(f"{file}: holds no samples (an empty JSON object)")
    if isinstance(content, dict):
        fmt = _record_format(content, f"{file}: item 0")  # one record in a .json file
        if fmt is not None:
            return fmt
        first = next(iter(content.values()))
        if isinstance(first, dict) and "key_frames" in first:
            return "drivelm"
    if isinstance(content, list):
        fmt = _record_format(content[0], f"{file}: item 0")
        if fmt is not None:
            return fmt
    raise DataError(f"{file}: cannot tell the format (expected one of {', '.join(FORMATS)}); pass --format")


def _load_file(file: Path, fmt: str | None, image_roots: Sequence[str]) -> list[Sample]:
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{file}: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    content = _content(file)
    fmt = fmt or _detect(file, content)
    resolve = ImageResolver(file, image_roots)
    if fmt == "drivelm":
        items: Iterator[tuple[str, Sample]] = _read_drivelm(file, content, resolve)
    else:
        records = _records(file, content, fmt)
        if fmt == "native":
            items = _read_native(file, records, resolve)
        elif fmt == "reference":
            items = _read_reference(file, records, resolve)
        else:
            items = _read_drivebench(records, resolve)
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


def _warn_duplicates(samples: Sequence[Sample], source: str) -> None:
    """Exact repeats (same images, question and answer) are kept, and counted on stderr."""
    from drivekd.data.validate import duplicate_pairs

    pairs = duplicate_pairs(samples)
    if pairs:
        print(f"warning: {source}: {duplicates_message(pairs)}", file=sys.stderr)


def duplicates_message(pairs: Sequence[tuple[str, str]]) -> str:
    repeat, first = pairs[0]
    return (
        f"{len(pairs)} item(s) repeat an earlier item exactly (same images, question and answer); kept, so each "
        f"counts again in training and scoring (first: {repeat} repeats {first})"
    )


def _content(file: Path) -> Any:
    """The parsed file: a `_Lines` of records for JSON Lines (a `.jsonl` file, or a `.json` file holding
    one object per line), else the one JSON value the file holds."""
    if file.suffix == ".jsonl" or _is_json_lines(file):
        return _json_lines(file)
    return _parse_json(file)


def _records(file: Path, content: Any, fmt: str) -> list[tuple[str, Any]]:
    """`(where, record)` for each item of a record-per-item format: JSON Lines, a JSON list, or one
    record alone in a `.json` file."""
    if isinstance(content, _Lines):
        return list(content)
    if isinstance(content, list):
        return [(f"{file}: item {i}", item) for i, item in enumerate(content)]
    if isinstance(content, dict) and _record_format(content, f"{file}: item 0") == fmt:
        return [(f"{file}: item 0", content)]
    raise DataError(f"{file}: {fmt} format must be a JSON list of items or JSON Lines, got {_kind(content)}")


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


def _json_lines(file: Path) -> _Lines:
    out = _Lines()
    try:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = _loads(line, f"{file}:{lineno}")
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}:{e.colno}: malformed JSON: {e.msg}") from e
                out.append((f"{file}: item {len(out)} (line {lineno})", record))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    return out


def _parse_json(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read: {e}") from e
    try:
        return _loads(text, str(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e


def _loads(text: str, where: str) -> Any:
    """`json.loads`, refusing an object that repeats a key: json keeps the last value and drops the
    others without a word (a DriveLM scene written twice loses the first one's questions)."""
    repeated: dict[int, str] = {}  # id(object) -> its first repeated key

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated[id(obj)] = key
                    break
                seen.add(key)
        return obj

    data = json.loads(text, object_pairs_hook=pairs_hook)
    if repeated:
        path, key = _first_repeat(data, repeated)
        raise DataError(
            f"{where}: duplicate key {key!r} in the object at {path}; JSON keeps only the last value, so the "
            "others would be dropped silently"
        )
    return data


def _first_repeat(data: Any, repeated: dict[int, str]) -> tuple[str, str]:
    """JSONPath (`$["scene-a"]["key_frames"]`) of the first object, in document order, with a repeated key."""
    stack: list[tuple[str, Any]] = [("$", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            if id(value) in repeated:
                return path, repeated[id(value)]
            children = [(f"{path}[{json.dumps(k, ensure_ascii=False)}]", v) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(children))
    raise AssertionError("a repeated key was seen but not found")  # pragma: no cover


# -- typed fields: every value a reader takes is checked where it is read ---------------------------


def _kind(value: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(item)}")
    return item


def _require(item: Any, key: str, where: str) -> Any:
    item = _object(item, where)
    if key not in item or item[key] is None:
        raise DataError(f"{where}: missing required field {key!r}")
    return item[key]


def _typed(item: Any, key: str, where: str, kind: type, what: str) -> Any:
    value = _require(item, key, where)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {what}, got {_kind(value)}")
    return value


def _string(value: Any, field: str, where: str) -> str:
    """A text value: a string with more than white space (an empty question or answer trains and
    scores nothing)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_kind(value)}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _text(item: Any, key: str, where: str) -> str:
    return _string(_require(item, key, where), key, where)


def _identifier(value: Any, field: str, where: str) -> str:
    """An id: text, or a whole number written without quotes (`"id": 7` is id "7"); nothing else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _string(value, field, where)


def _optional_id(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    return None if value is None else _identifier(value, key, where)


def _optional_text(item: dict[str, Any], key: str, where: str) -> str | None:
    """Absent or null: None. Present: a non-empty string, else an error (not a silent default)."""
    value = item.get(key)
    return None if value is None else _string(value, key, where)


def _question(value: str, field: str, where: str) -> str:
    if not value.replace(IMAGE_PLACEHOLDER, "").strip():
        raise DataError(f"{where}: field {field!r} holds no text besides {IMAGE_PLACEHOLDER} placeholders")
    return value


def _camera_paths(item: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """`{camera: path}`: non-empty strings both."""
    paths = _require(item, key, where)
    if not isinstance(paths, dict):
        raise DataError(f"{where}: field {key!r} must map camera names to paths, got {_kind(paths)}")
    for cam, p in paths.items():
        _string(cam, f"{key}: camera", where)
        _string(p, f"{key}[{cam!r}]", where)
    return paths


def _choices_field(item: dict[str, Any], where: str) -> tuple[dict[str, str] | None, str | None]:
    choices, letter = item.get("choices"), item.get("correct_choice")
    if choices is not None and not (
        isinstance(choices, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
    ):
        raise DataError(f"{where}: field 'choices' must map letters to option texts")
    if letter is not None and not isinstance(letter, str):
        raise DataError(f"{where}: field 'correct_choice' must be a letter, got {_kind(letter)}")
    return choices or None, letter


_CAMERA_FOLDER = re.compile(r"CAM_[A-Z_]+")


def scene_of_images(raw_paths: Sequence[str]) -> str | None:
    """The scene id of a sample whose format names no scene: its first image's path as the data file
    writes it, directory included, without a leading `...` and without a camera folder
    (`samples/CAM_FRONT/0001.jpg` and `samples/CAM_BACK/0001.jpg` are one frame, `samples/0001.jpg`).
    Never the file name alone: four scenes' `CAM_FRONT/0001.jpg` are four scenes. None without images."""
    if not raw_paths:
        return None
    parts = list(PurePosixPath(posixpath.normpath(str(raw_paths[0]).replace("\\", "/"))).parts)
    if parts and parts[0] in ("...", "…"):
        parts = parts[1:]
    kept = [p for p in parts[:-1] if not _CAMERA_FOLDER.fullmatch(p)] + parts[-1:]
    return "/".join(kept).replace("//", "/") or None


def _read_native(file: Path, records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for where, item in records:
        item = _object(item, where)
        images, raw_paths = [], []
        for k, im in enumerate(_typed(item, "images", where, list, "a list")):
            im_where = f"{where} image {k}"
            raw = _text(im, "path", im_where)
            raw_paths.append(raw)
            images.append(ImageRef(_text(im, "camera", im_where), resolve(raw)))
        sample_id = _identifier(_require(item, "id", where), "id", where)
        capability = normalize_capability(_text(item, "capability", where), where=where)
        question = _question(_text(item, "question", where), "question", where)
        answer = _text(item, "answer", where)
        choices, letter = _choices_field(item, where)
        if choices is None:
            choices, inline_letter = _choices_of(question, answer)
            letter = letter if letter is not None else inline_letter
        elif letter is None:
            found = answer_letter(answer)
            letter = found if found in choices else None
        facts = item.get("facts")
        if facts is not None and not isinstance(facts, dict):
            raise DataError(f"{where}: field 'facts' must be an object, got {_kind(facts)}")
        yield (
            where,
            Sample(
                id=sample_id,
                capability=capability,
                question_type=_optional_text(item, "question_type", where) or capability,
                images=images,
                question=question,
                answer=answer,
                scene_id=_optional_id(item, "scene_id", where) or scene_of_images(raw_paths) or sample_id,
                choices=choices,
                correct_choice=letter,
                facts=facts or {},
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


def _message(messages: list[Any], role: str, where: str) -> str:
    """The content of the one message with this role (a second one would be dropped: refused)."""
    found = []
    for j, m in enumerate(messages):
        m = _object(m, f"{where} messages[{j}]")
        if _string(m.get("role"), f"messages[{j}].role", where) == role:
            found.append(_string(m.get("content"), f"messages[{j}].content", where))
    if not found:
        raise DataError(f"{where}: missing required field 'messages[role={role}]'")
    if len(found) > 1:
        raise DataError(f"{where}: {len(found)} messages with role {role!r}; only single-turn items are supported")
    return found[0]


def _read_reference(file: Path, records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for i, (where, item) in enumerate(records):
        messages = _typed(item, "messages", where, list, "a list")
        raw_images = _typed(item, "images", where, list, "a list")
        capability_name = _text(item, "question_type", where)
        for k, p in enumerate(raw_images):
            _string(p, f"images[{k}]", where)
        question = _question(_message(messages, "user", where), "messages[role=user].content", where)
        answer = _message(messages, "assistant", where)
        images = [ImageRef(_camera_name(p, k, len(raw_images)), resolve(p)) for k, p in enumerate(raw_images)]
        choices, letter = _choices_of(question, answer)
        sample_id = _optional_id(item, "id", where) or f"{file.stem}-{i}"
        yield (
            where,
            Sample(
                id=sample_id,
                capability=normalize_capability(capability_name, where=where),
                question_type=_optional_text(item, "question_subtype", where) or capability_name,
                images=images,
                question=question,
                answer=answer,
                scene_id=_optional_id(item, "scene_id", where) or scene_of_images(raw_images) or sample_id,
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


def _tag(item: dict[str, Any], where: str) -> dict[str, Any]:
    """DriveBench's `tag`: a number or string, or a list of them (0 marks multiple choice)."""
    if "tag" not in item:
        return {}
    tag = item["tag"]
    ok = tag is None or (isinstance(tag, int | str) and not isinstance(tag, bool))
    if isinstance(tag, list):
        ok = all(isinstance(t, int | str) and not isinstance(t, bool) for t in tag)
    if not ok:
        raise DataError(f"{where}: field 'tag' must be a number, a string or a list of them, got {_kind(tag)}")
    return {"tag": tag}


def _read_drivebench(records: list[tuple[str, Any]], resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    for i, (where, item) in enumerate(records):
        item = _object(item, where)
        qtype = _text(item, "question_type", where)
        capability = normalize_capability(qtype, where=where)
        paths = _camera_paths(item, "image_path", where)
        question = _text(item, "question", where)
        answer = _text(item, "answer", where)
        choices, letter = _choices_of(question, answer)
        frame = _optional_text(item, "frame_token", where)
        scene = _optional_text(item, "scene_token", where) or frame or scene_of_images(list(paths.values()))
        sample_id = f"{frame or f'frame{i}'}:{i}"
        yield (
            where,
            Sample(
                id=sample_id,
                capability=capability,
                question_type=qtype.lower(),
                images=[ImageRef(cam, resolve(p)) for cam, p in paths.items()],
                question=_with_placeholders(question, list(paths)),
                answer=answer,
                scene_id=scene or sample_id,
                choices=choices,
                correct_choice=letter,
                facts=_tag(item, where),
            ),
        )


def _read_drivelm(file: Path, data: Any, resolve: ImageResolver) -> Iterator[tuple[str, Sample]]:
    if not isinstance(data, dict) or isinstance(data, _Lines):
        raise DataError(f"{file}: DriveLM format must be one JSON object keyed by scene id, got {_kind(data)}")
    for scene_id, scene in data.items():
        _string(scene_id, "scene id", f"{file}: scene {scene_id!r}")
        frames = _typed(scene, "key_frames", f"{file}: scene {scene_id}", dict, "an object of frames")
        for frame_id, frame in frames.items():
            fwhere = f"{file}: scene {scene_id} frame {frame_id}"
            _string(frame_id, "frame id", fwhere)
            qa = _typed(frame, "QA", fwhere, dict, "an object of question lists")
            paths = _camera_paths(frame, "image_paths", fwhere)
            images = [ImageRef(cam, resolve(p)) for cam, p in paths.items()]
            for qtype, items in qa.items():
                if not isinstance(items, list):
                    raise DataError(f"{fwhere}: QA {qtype!r} must be a list of questions, got {_kind(items)}")
                capability = normalize_capability(qtype, where=f"{fwhere} QA {qtype!r}")
                for k, item in enumerate(items):
                    where = f"{fwhere} {qtype}[{k}]"
                    question = _text(item, "Q", where)
                    answer = _text(item, "A", where)
                    choices, letter = _choices_of(question, answer)
                    yield (
                        where,
                        Sample(
                            id=f"{frame_id}:{qtype}:{k}",
                            capability=capability,
                            question_type=qtype.lower(),
                            images=list(images),
                            question=_with_placeholders(question, list(paths)),
                            answer=answer,
                            scene_id=scene_id,
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
