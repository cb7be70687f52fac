"""Build or load a backend: tiny presets from configs, or any local directory / hub id."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import DriveKDError
from drivekd.models.backend import VLMBackend
from drivekd.models.internvl import InternVLBackend
from drivekd.models.qwen25vl import Qwen25VLBackend

BACKENDS: dict[str, type[VLMBackend]] = {"internvl": InternVLBackend, "qwen2_5_vl": Qwen25VLBackend}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Teacher and student of a family share the image size, patching and tokenizer, so their
# visual-token layouts match position by position; they differ in width and depth only.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-internvl-teacher": {
        "family": "internvl",
        "text": {"hidden": 320, "layers": 8, "heads": 5},
        "vision": {"hidden": 192, "layers": 4, "heads": 4},
    },
    "tiny-internvl-student": {
        "family": "internvl",
        "text": {"hidden": 128, "layers": 4, "heads": 2},
        "vision": {"hidden": 96, "layers": 2, "heads": 2},
    },
    "tiny-qwen25vl-teacher": {
        "family": "qwen2_5_vl",
        "text": {"hidden": 320, "layers": 8, "heads": 5},
        "vision": {"hidden": 192, "layers": 4, "heads": 4},
    },
    "tiny-qwen25vl-student": {
        "family": "qwen2_5_vl",
        "text": {"hidden": 128, "layers": 4, "heads": 2},
        "vision": {"hidden": 96, "layers": 2, "heads": 2},
    },
}
TINY_IMAGE_SIZE, TINY_PATCH = 96, 8

# Pretrained tiny models shipped inside the package (weights, tokenizer, processor, card.json), built
# by `drivekd reproduce --profile NAME` and installed with `drivekd models install-base`.
PRETRAINED_DIR = Path(__file__).with_name("pretrained")
PRETRAINED = ("drivesim-internvl-teacher", "drivesim-internvl-student-base")


def pretrained_path(name: str) -> Path:
    """The folder of a shipped pretrained model; an error naming the rebuild if it is missing."""
    path = PRETRAINED_DIR / name
    if not (path / "model.safetensors").is_file():
        raise DriveKDError(
            f"{name}: the shipped weights are missing from {path}; rebuild them with `drivekd reproduce "
            f"--profile {name} --out DIR` and `drivekd models install-base DIR/export/{name}`"
        )
    return path


def pretrained_card(name: str) -> dict[str, Any]:
    return json.loads((pretrained_path(name) / "card.json").read_text(encoding="utf-8"))


def resolve_model(spec: str) -> str:
    """A shipped pretrained model's name becomes its folder; anything else is returned unchanged."""
    return str(pretrained_path(spec)) if spec in PRETRAINED else spec


@dataclass
class LoadOptions:
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs, e.g. {"r": 8, "target_modules": [...]}
    seed: int = 0
    # Spread over devices (and CPU memory and disk) instead of `device`, through accelerate's
    # big-model placement: a frozen teacher larger than one device. `auto` / `balanced` /
    # `balanced_low_0` / `sequential`, or an explicit {module name: device}.
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, str] | None = None  # per device, e.g. {0: "20GiB", "cpu": "100GiB"}
    offload_folder: str | None = None  # where weights that fit nowhere else go


@dataclass(frozen=True)
class ModelShape:
    """What can be known of a model before loading its weights (for checks made before any work)."""

    family: str  # "internvl" | "qwen2_5_vl" | another model_type (unsupported)
    num_layers: int
    hidden_size: int


def model_shape(spec: str) -> ModelShape | None:
    """A preset's or checkpoint folder's shape from its config alone; None for a hub id not on disk."""
    if spec in PRESETS:
        p = PRESETS[spec]
        return ModelShape(p["family"], p["text"]["layers"], p["text"]["hidden"])
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise DriveKDError(f"{spec}: no config.json: not a model checkpoint directory")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    layers, hidden = text.get("num_hidden_layers"), text.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise DriveKDError(f"{path}/config.json: no text_config.num_hidden_layers / hidden_size")
    return ModelShape(str(config.get("model_type")), layers, hidden)


def load_backend(spec: str, options: LoadOptions | None = None) -> VLMBackend:
    """`spec` is a preset name, a local checkpoint directory, or a hub id (offline: a directory)."""
    options = options or LoadOptions()
    if options.dtype not in DTYPES:
        raise DriveKDError(f"dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    if options.device_map is not None:
        if options.lora:
            raise DriveKDError("a model spread over devices (device_map) is a frozen teacher: no LoRA")
        if spec in PRESETS:
            raise DriveKDError(f"{spec}: a preset is built in memory; device_map places a checkpoint as it loads")
    backend = _build_preset(spec, options) if spec in PRESETS else _load_pretrained(resolve_model(spec), options)
    if options.device_map is None:
        backend.model.to(options.device)
    _freeze(backend, options)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        backend.model = get_peft_model(backend.model, LoraConfig(**options.lora))
    return backend


def _build_preset(name: str, options: LoadOptions) -> VLMBackend:
    from drivekd.models import internvl, qwen25vl
    from drivekd.models.tokenizer import SPECIAL_TOKENS, load_shipped_tokenizer

    preset = PRESETS[name]
    tokenizer = load_shipped_tokenizer()
    vocab = ((len(tokenizer) + 1 + 63) // 64) * 64  # at least one spare id, a multiple of 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if preset["family"] == "internvl":
        config = internvl.tiny_config(
            vocab, ids, text=preset["text"], vision=preset["vision"], image_size=TINY_IMAGE_SIZE, patch=TINY_PATCH
        )
        processor = internvl.tiny_image_processor(TINY_IMAGE_SIZE)
    else:
        config = qwen25vl.tiny_config(vocab, ids, text=preset["text"], vision=preset["vision"], patch=TINY_PATCH)
        processor = qwen25vl.tiny_image_processor(TINY_IMAGE_SIZE * TINY_IMAGE_SIZE, TINY_PATCH)
    cls = BACKENDS[preset["family"]]
    config._attn_implementation = options.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = cls.model_class(config).to(DTYPES[options.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    return cls(model, tokenizer, processor)


def _load_pretrained(spec: str, options: LoadOptions) -> VLMBackend:
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(spec)
    if path.exists() and not (path / "config.json").is_file():
        raise DriveKDError(f"{spec}: no config.json: not a model checkpoint directory")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise DriveKDError(
            f"{spec}: no such model directory, and not a preset ({', '.join(PRESETS)}), "
            f"a shipped model ({', '.join(PRETRAINED)}) or hub id"
        )
    model_type = _model_type(path) if path.exists() else None
    try:
        if model_type is None:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(spec).model_type
        if model_type not in BACKENDS:
            raise DriveKDError(f"{spec}: model type {model_type!r} is not a supported VLM ({', '.join(BACKENDS)})")
        cls = BACKENDS[model_type]
        placement = (
            {}
            if options.device_map is None
            else {
                "device_map": options.device_map,
                "max_memory": options.max_memory,
                "offload_folder": options.offload_folder,
            }
        )
        model = cls.model_class.from_pretrained(
            spec, dtype=DTYPES[options.dtype], attn_implementation=options.attn_implementation, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(spec)
        processor = AutoImageProcessor.from_pretrained(spec)
    except OSError as e:
        raise DriveKDError(f"{spec}: cannot load: {str(e).splitlines()[0]}") from e
    return cls(model, tokenizer, processor)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise DriveKDError(f"{path}/config.json: unreadable: {e}") from e


def _freeze(backend: VLMBackend, options: LoadOptions) -> None:
    frozen = {"vision": options.freeze_vision, "projector": options.freeze_projector, "llm": options.freeze_llm}
    for name, p in backend.model.named_parameters():
        if frozen[backend.part_of(name)]:
            p.requires_grad_(False)


def count_parameters(backend: VLMBackend) -> int:
    return sum(p.numel() for p in backend.model.parameters())


# ---- real architectures, random weights ------------------------------------------------------
SHAPES_FILE = Path(__file__).with_name("shapes.yaml")


def real_shapes() -> dict[str, dict[str, Any]]:
    """The published architectures `drivekd models init --like` builds (drivekd/models/shapes.yaml)."""
    import yaml

    return yaml.safe_load(SHAPES_FILE.read_text(encoding="utf-8"))


def build_like(name: str, options: LoadOptions | None = None, *, meta: bool = False) -> VLMBackend:
    """A randomly initialised model with a published architecture and the shipped tokenizer (its
    vocabulary padded to the real size). `meta=True` allocates nothing: shapes and counts only."""
    from drivekd.models import internvl, qwen25vl
    from drivekd.models.tokenizer import SPECIAL_TOKENS, load_shipped_tokenizer

    options = options or LoadOptions()
    shapes = real_shapes()
    if name not in shapes:
        raise DriveKDError(f"{name}: not a known architecture ({', '.join(shapes)})")
    if options.dtype not in DTYPES:
        raise DriveKDError(f"dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    shape = shapes[name]
    tokenizer = load_shipped_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    family = internvl if shape["family"] == "internvl" else qwen25vl
    config = family.real_config(shape, ids)
    config._attn_implementation = options.attn_implementation
    cls = BACKENDS[shape["family"]]
    with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else contextlib.nullcontext():
        torch.manual_seed(options.seed)
        model = cls.model_class._from_config(config, dtype=DTYPES[options.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    return cls(model, tokenizer, family.real_image_processor(shape))


def init_like(name: str, out: Path, options: LoadOptions | None = None) -> Path:
    """Write a random-weight checkpoint of a published architecture to `out` (loads with `--model out`)."""
    from drivekd.atomic import atomic_dir

    backend = build_like(name, options)
    with atomic_dir(out) as tmp:
        backend.save(tmp)
    return out
