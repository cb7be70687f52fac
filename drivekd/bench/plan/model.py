"""The facts the planner reads from one model (parameters per part, widths, depths, heads, visual
tokens), counted on the meta device from a preset, a shipped base, a checkpoint folder, a published
architecture or its hub id: nothing is allocated or read."""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import DriveKDError

PARTS = ("vision", "projector", "llm")
# When the data cannot be read here, images are assumed this size (a nuScenes camera, as in DriveBench
# and DriveLM). Only Qwen2.5-VL's visual tokens depend on it; InternVL takes one 448-px tile per image.
DEFAULT_IMAGE = (1600, 900)


@dataclass(frozen=True)
class Arch:
    """What the formulas read from one model, built on the meta device (LoRA adapters included)."""

    spec: str
    family: str  # "internvl" | "qwen2_5_vl"
    params: dict[str, int]  # part (vision, projector, llm) -> parameters, LoRA adapters included
    lora: dict[str, int] | None  # part -> LoRA adapter parameters; None: no LoRA
    lora_saved: dict[str, int]  # part -> values LoRA adapters save per token, summed over adapted modules
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    visual_tokens: int  # language-model tokens per image
    vision_tokens: int  # the vision tower's sequence per image (patches, and InternViT's class token)
    patch_values: int  # pixel values the patch embedding reads per vision token
    largest_tensor: int  # elements of the largest parameter
    gram_held: int  # elements the `gram: modules` pass holds k at a time for one parameter (gramian.py)
    head: int  # parameters of the LM head (its gradient is the first a backward pass makes)
    unit: int  # parameters of the largest FSDP unit: one decoder layer
    root: int  # parameters of the FSDP root unit (vision tower, projector, embeddings, head, norm)

    @property
    def parameters(self) -> int:
        return sum(self.params.values())

    def trainable(self, model_cfg: Any) -> dict[str, int]:
        """Trainable parameters per part: LoRA trains its adapters only (peft freezes the rest), else a
        part trains unless its `freeze_*` flag is set (as `drivekd.models.loading` applies them)."""
        if self.lora is not None:
            return dict(self.lora)
        frozen = {
            "vision": model_cfg.freeze_vision,
            "projector": model_cfg.freeze_projector,
            "llm": model_cfg.freeze_llm,
        }
        return {p: 0 if frozen[p] else n for p, n in self.params.items()}


def meta_backend(spec: str) -> Any:
    """A backend of the architecture `spec` names, on the meta device: no weight is allocated or read."""
    from drivekd.models.loading import (
        BACKENDS,
        PRESETS,
        LoadOptions,
        build_like,
        load_backend,
        real_shapes,
        resolve_model,
    )

    shapes = real_shapes()
    if spec in PRESETS:
        # device "meta": load_backend moves the model to options.device, and meta weights cannot be copied
        with torch.device("meta"):
            return load_backend(spec, LoadOptions(device="meta"))
    if spec in shapes:
        return build_like(spec, meta=True)
    path = Path(resolve_model(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DriveKDError(f"{spec}: no config.json: not a model checkpoint directory")
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError) as e:
            raise DriveKDError(f"{path}/config.json: unreadable: {e}") from e
        if model_type not in BACKENDS:
            raise DriveKDError(f"{spec}: model type {model_type!r} is not a supported VLM ({', '.join(BACKENDS)})")
        from transformers import AutoImageProcessor, AutoTokenizer

        cls = BACKENDS[model_type]
        config = cls.model_class.config_class.from_pretrained(path)
        with torch.device("meta"):
            model = cls.model_class._from_config(config)
        return cls(model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))
    for name, shape in shapes.items():  # a published checkpoint's hub id plans offline from shapes.yaml
        if shape.get("hub") == spec:
            return build_like(name, meta=True)
    raise DriveKDError(
        f"{spec}: cannot plan it offline: not a preset, a shipped model, a checkpoint folder, a published "
        f"architecture ({', '.join(shapes)}) or its hub id (`drivekd models init --like NAME --out DIR` writes one)"
    )


@functools.lru_cache(maxsize=32)
def arch(spec: str, lora_json: str = "null", image: tuple[int, int] = DEFAULT_IMAGE) -> Arch:
    """The facts of model `spec`, with LoRA settings given as JSON and the image size (width, height)
    that Qwen2.5-VL's visual-token count depends on."""
    backend = meta_backend(spec)
    model = backend.model
    text, vision = model.config.text_config, model.config.vision_config
    params = dict.fromkeys(PARTS, 0)
    largest = 0
    for name, p in model.named_parameters():
        params[backend.part_of(name)] += p.numel()
        largest = max(largest, p.numel())
    gram_held = _gram_held(model)
    units = [sum(p.numel() for p in u.parameters()) for u in backend.fsdp_units()]
    visual = backend.visual_token_count(*image)
    if backend.family == "internvl":
        side = vision.image_size[0] // vision.patch_size[0]
        vision_tokens = side * side + 1  # InternViT prepends a class token
        v_heads, v_layers = vision.num_attention_heads, vision.num_hidden_layers
        patch_values = 3 * vision.patch_size[0] * vision.patch_size[1]
    else:
        vision_tokens = visual * vision.spatial_merge_size**2  # the merger folds merge x merge patches into one token
        v_heads, v_layers = vision.num_heads, vision.depth
        patch_values = 3 * vision.temporal_patch_size * vision.patch_size**2
    lora, lora_saved = None, dict.fromkeys(PARTS, 0)
    if lora_json != "null":
        lora, lora_saved = _lora_counts(backend, json.loads(lora_json))
        params = {p: params[p] + lora[p] for p in PARTS}
    heads = text.num_attention_heads
    return Arch(
        spec=spec,
        family=str(model.config.model_type),
        params=params,
        lora=lora,
        lora_saved=lora_saved,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        vision_hidden=vision.hidden_size,
        vision_layers=v_layers,
        vision_heads=v_heads,
        vision_intermediate=vision.intermediate_size,
        visual_tokens=visual,
        vision_tokens=vision_tokens,
        patch_values=patch_values,
        largest_tensor=largest,
        gram_held=gram_held,
        head=text.vocab_size * text.hidden_size,
        unit=max(units),
        root=sum(params.values()) - sum(units) - (sum(lora.values()) if lora else 0),
    )


def _gram_held(model: torch.nn.Module) -> int:
    """The most values the `gram: modules` pass holds k-fold for one parameter: parameter-tapped
    weights hold their k gradients (a weight used by two modules, a tied embedding and head, its
    first use's until the second arrives, then their sum: three); output-tapped ones a fp64 block."""
    from drivekd.distill.gramian import GRAM_CHUNK, output_tapped

    modules = [m for m in model.modules() if any(p is not None for p in m._parameters.values())]
    at_output = {id(m) for m in output_tapped(modules)}
    uses: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for m in modules:
        if id(m) in at_output:
            continue
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
                sizes[id(p)] = p.numel()
    held = max((n * (1 if uses[key] == 1 else uses[key] + 1) for key, n in sizes.items()), default=0)
    return max(held, 2 * GRAM_CHUNK if at_output else 0)  # an fp64 block: two fp32 values


def _lora_counts(backend: Any, settings: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """LoRA adapter parameters per part, and the values adapters save per token: the adapted module's
    input after dropout (a copy, when lora_dropout > 0) and the rank-r activation and its scaled copy."""
    from peft import LoraConfig, get_peft_model

    try:
        config = LoraConfig(**settings)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's deprecation notices say nothing about this model
            peft_model = get_peft_model(backend.model, config)
    except (TypeError, ValueError) as e:
        raise DriveKDError(f"model.lora: {str(e).splitlines()[0]}") from e
    adapters, saved = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    dropout = float(settings.get("lora_dropout") or 0.0)
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            part = backend.part_of(name)
            adapters[part] += sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
            saved[part] += (lora_a["default"].in_features if dropout > 0 else 0) + 2 * module.r["default"]
    return adapters, saved
