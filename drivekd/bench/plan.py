"""`drivekd plan`: the predicted peak memory per device of an SFT or distillation config, by part.

Nothing is loaded: the student and the teachers are built on the meta device from their configs (a
preset, a shipped base, a checkpoint folder, a published architecture of `drivekd models shapes` or
its hub id), so parameter counts and shapes are those of the real architecture. Each part is one
small function below with a one-line reason for its formula; sizes are bytes.

The peak is `resident + max(phases)`. Weights, teacher weights and optimiser state stay for the whole
run; on top of them comes the largest of these phases:

- forward/backward: what the student's forward saves for backward (activations, captured maps, and
  the gradients accumulation keeps), plus the largest of three moments that never coexist: the
  teacher's forward (a live teacher's working set and the targets it makes, or the cache's targets),
  the losses (targets and what the signal losses save), and the backward (what the losses saved, a
  projection strategy's (k, P) buffer and one `autograd.grad` result, and the largest transient:
  CE's backward, the LM-head gradient or a captured map's recompute);
- backward end (a plain backward): every gradient, beside the activations freed last;
- combination (projection strategies): the buffer and the gradients written from it;
- optimiser step: gradients and AdamW's temporary;
- vision forward (a frozen tower): one block's working set, before the language model runs.

`plan_measure.measure_step` runs a real step of a config on this machine's CPU, in a fresh process, and
reads its peak RSS: that is how these formulas are calibrated (docs/configuration.md, "Memory planning").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from drivekd.errors import DriveKDError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARTS = ("vision", "projector", "llm")
# When the data cannot be read here, images are assumed this size (a nuScenes camera, as in DriveBench
# and DriveLM). Only Qwen2.5-VL's visual tokens depend on it; InternVL takes one 448-px tile per image.
DEFAULT_IMAGE = (1600, 900)
# No tensor holds the CUDA context or the caching allocator's fragmentation: on a GPU a plan fits
# when its peak is within this share of the device, less the context.
CUDA_CONTEXT = 1 * GiB
ALLOCATOR_SHARE = 0.95
# The LoRA the advice suggests: the language model's attention projections only. A plain
# [q_proj, k_proj, v_proj, o_proj] list also adapts InternViT's q/k/v, whose activations then stay.
LORA_ADVICE = {"r": 16, "lora_alpha": 32, "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"}


# ---- the model, counted on the meta device --------------------------------------------------------
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
    head: int  # parameters of the LM head (its gradient is the first a backward pass makes)
    unit: int  # parameters of the largest FSDP unit: one decoder layer, or the embedding

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
        _build_preset,
        build_like,
        real_shapes,
        resolve_model,
    )

    shapes = real_shapes()
    if spec in PRESETS:
        with torch.device("meta"):
            return _build_preset(spec, LoadOptions())
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
    layer = sum(p.numel() for p in backend.language_model.layers[0].parameters())
    unit = max(layer, model.get_input_embeddings().weight.numel())
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
        head=text.vocab_size * text.hidden_size,
        unit=unit,
    )


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


# ---- what one device processes per step -----------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One micro batch: `batch` samples padded to `tokens`, each with `images` images."""

    batch: int
    tokens: int
    images: int
    visual: int  # visual tokens per sample
    act_bytes: int  # bytes per activation value: the model's dtype, or 2 under bf16/fp16 autocast
    masked: bool  # padding: a mask reaches SDPA (without padding transformers runs plain causal)

    @property
    def text(self) -> int:
        """R: the text rows a text->vision signal reads."""
        return self.tokens - self.visual


# ---- the formulas, one per part ---------------------------------------------------------------------
def weights(parameters: int, dtype_bytes: int) -> int:
    # every parameter, frozen or not, sits on the device in the model's dtype
    return parameters * dtype_bytes


def gradients(trainable: int, dtype_bytes: int) -> int:
    # `p.grad` has its parameter's dtype and exists only where requires_grad
    return trainable * dtype_bytes


def optimiser_state(trainable: int, dtype_bytes: int) -> int:
    # AdamW's exp_avg and exp_avg_sq per trainable parameter, in its dtype (2 fp32 values for fp32 weights)
    return 2 * trainable * dtype_bytes


def optimiser_step(trainable: int, largest: int, dtype_bytes: int, device: str) -> int:
    # foreach AdamW (torch's default on GPUs) takes sqrt(v) of every parameter at once; the single-tensor
    # path (CPU) holds sqrt(v) and its quotient for one tensor at a time
    return trainable * dtype_bytes if device == "cuda" else 2 * largest * dtype_bytes


def autocast_copies(trainable: int, model_bytes: int, mixed_precision: str) -> int:
    # autocast caches a 16-bit copy of each fp32 weight it casts until its region ends, after backward
    return 2 * trainable if mixed_precision != "no" and model_bytes == 4 else 0


def _rms_norm(hidden: int, b: int) -> int:
    # Qwen2 RMSNorm saves its fp32 input and 1/rms, then the normed value and the scaled output in the model dtype
    return 4 * hidden + 4 + 2 * b * hidden


def lm_layers(a: Arch, s: Step) -> int:
    # what autograd saves per decoder layer and token (transformers' Qwen2 layer on SDPA): two RMSNorms;
    # q, k, v, the output and o_proj's input, fp32 log-sum-exp per head; the float padding mask SDPA
    # makes of the boolean one; gate, SiLU(gate), up and their product; LoRA adapters' inputs
    b = s.act_bytes
    repeated = s.masked and 1 < a.kv_heads < a.heads  # with a mask, repeat_kv copies k and v to every head
    kv = (a.heads if repeated else a.kv_heads) * a.head_dim
    attention = b * (2 * a.heads * a.head_dim + 2 * kv + a.hidden) + 4 * a.heads
    mask = b * s.tokens if s.masked else 0
    mlp = 4 * b * a.intermediate
    lora = a.lora_saved["llm"] * b // a.layers
    per_token = 2 * _rms_norm(a.hidden, b) + attention + mask + mlp + lora
    return a.layers * s.batch * s.tokens * per_token


def lm_edges(a: Arch, s: Step) -> int:
    # the final RMSNorm, the embeddings with visual tokens scattered in, and rotary cos/sin (shared by every layer)
    return s.batch * s.tokens * (_rms_norm(a.hidden, s.act_bytes) + s.act_bytes * (a.hidden + 2 * a.head_dim))


def logits_and_loss(a: Arch, s: Step, logits_kept: bool) -> int:
    # CE saves its fp32 log-softmax; the logits stay too while something holds them (the distiller does)
    return s.batch * s.tokens * a.vocab * (4 + (s.act_bytes if logits_kept else 0))


def ce_backward(a: Arch, s: Step) -> int:
    # CE's backward makes two fp32 gradients of the log-softmax's size (and a 16-bit one for 16-bit logits)
    return s.batch * s.tokens * a.vocab * (8 + (0 if s.act_bytes == 4 else s.act_bytes))


def vision_tower(a: Arch, s: Step, graph: bool) -> int:
    # a trained tower saves what each block saves per patch; a frozen one holds one block's working set
    tokens = s.batch * s.images * a.vision_tokens
    h, i, b = a.vision_hidden, a.vision_intermediate, s.act_bytes
    if not graph:
        return tokens * b * (4 * h + 2 * i)
    if a.family == "internvl":
        # LayerNorm input and output (twice), q, k, v, the output, projection input, both layer-scale inputs; fc1 and GELU outputs
        per_token = 11 * b * h + 2 * b * i + 4 * a.vision_heads + 16
    else:
        # RMSNorm (twice), q, k, v, the output, proj input, fp32 rotary copies of q and k; gate, SiLU, up, product
        per_token = 2 * _rms_norm(h, b) + 5 * b * h + 8 * h + 4 * a.vision_heads + 4 * b * i
    lora = a.lora_saved["vision"] * b // a.vision_layers
    # Qwen2.5-VL's patch embedding (a Conv3d over flattened patches) also keeps its input
    patches = tokens * a.patch_values * b if a.family != "internvl" else 0
    return a.vision_layers * tokens * (per_token + lora) + patches


def projector(a: Arch, s: Step, graph: bool) -> int:
    # the projector's norm and two-layer MLP over the merged patches of each visual token, saved when it
    # trains or when a trained tower lies behind it
    if not graph:
        return 0
    merged = 4 * a.vision_hidden
    if a.family == "internvl":
        return s.batch * s.visual * (s.act_bytes * (2 * merged + 2 * a.hidden) + 8)
    per_patch = _rms_norm(a.vision_hidden, s.act_bytes)
    return s.batch * s.visual * (4 * per_patch + s.act_bytes * (2 * merged + merged))


def per_head_maps(a: Arch, s: Step) -> int:
    # tag attention supervises one head, so its layer keeps every head's fp32 map in the graph (and its cast)
    return s.batch * a.heads * s.tokens * s.tokens * (4 + (0 if s.act_bytes == 4 else s.act_bytes))


def per_head_backward(a: Arch, s: Step) -> int:
    # ... and their backward two fp32 gradients of that size
    return s.batch * a.heads * s.tokens * s.tokens * 8


def captured_maps(a: Arch, s: Step, rows: dict[int, int]) -> int:
    # a captured student layer keeps its (B, R, T) head-mean map and the additive mask (or its rows) for
    # the checkpointed recompute; text-row layers also their gathered queries
    b = s.act_bytes
    kept = sum(s.batch * r * s.tokens * 2 * b for r in rows.values())
    return kept + sum(s.batch * a.heads * r * a.head_dim * b for r in rows.values() if r < s.tokens)


def map_recompute(a: Arch, s: Step, rows: dict[int, int]) -> int:
    # backward recomputes one captured layer's map at a time, keeping every head's fp32 probabilities
    # until used, beside the logits of one head and the gradients of the map and of one head
    return s.batch * max(rows.values(), default=0) * s.tokens * 4 * (a.heads + 3)


def map_losses(s: Step, pair_rows: list[int]) -> int:
    # each matched (signal, layer) distance keeps its difference and float mask, plus the boolean mask
    return sum(s.batch * r * s.tokens * (2 * s.act_bytes + 1) for r in pair_rows)


def hidden_losses(a: Arch, s: Step, pairs: int, width: int) -> int:
    # output_hidden_states keeps every layer's output; each matched pair keeps a (projected) fp32 difference
    kept = (a.layers + 1) * s.batch * s.tokens * a.hidden * s.act_bytes
    return kept + 2 * pairs * s.batch * s.tokens * width * 4


def logit_kl_loss(s: Step, vocab: int) -> int:
    # temperature KL keeps fp32 log-softmaxes of both logits and the teacher's probabilities, and one gradient
    return 4 * s.batch * s.tokens * vocab * 4


def agp_buffer(trainable: int, losses: int, buffer_bytes: int) -> int:
    # GradientAggregator writes each loss's gradient into one (k, P) buffer, k = CE and every signal
    return losses * trainable * buffer_bytes


def agp_grad_result(trainable: int, largest: int, grad_bytes: int, in_place: bool) -> int:
    # a buffer of the parameters' dtype takes each backward in place (one parameter's new gradient at a
    # time); a bf16 buffer for fp32 weights gets autograd.grad's whole gradient copied into its row
    return largest * grad_bytes if in_place else trainable * grad_bytes


def agp_combination(losses: int, largest: int, buffer_bytes: int, gram_chunk: int) -> int:
    # the Gram matrix takes fp32 blocks of the buffer, the combination fp32 slices of one parameter at a time
    upcast = 0 if buffer_bytes == 4 else 1
    return losses * gram_chunk * 4 * upcast + (losses * upcast + 1) * largest * 4


def cache_reads(s: Step, elements: list[int]) -> int:
    # CachedTeachers pads each sample's stored target into one fp32 batch tensor per (signal, matched layer)
    return sum(s.batch * e * 4 for e in elements)


def live_teacher(t: Arch, s: Step, dtype_bytes: int, maps: dict[int, int], hidden_layers: int, logits: bool) -> int:
    # no graph: the (B, R, T) maps it keeps and the states or logits its signals read, plus the larger of
    # one head's fp32 logits, probabilities, running sum and mask rows, and one decoder layer's working set
    kept = sum(s.batch * r * s.tokens * dtype_bytes for r in maps.values())
    per_head = 5 * s.batch * max(maps.values(), default=0) * s.tokens * 4
    layer = s.batch * s.tokens * (2 * t.hidden + 3 * t.intermediate) * dtype_bytes
    states = hidden_layers * s.batch * s.tokens * t.hidden * dtype_bytes
    vocab = s.batch * s.tokens * t.vocab * dtype_bytes if logits else 0
    return kept + max(per_head, layer) + states + vocab


def teacher_targets(s: Step, elements: list[int], dtype_bytes: int) -> int:
    # a live teacher's targets, one window mean per (signal, matched student layer)
    return sum(s.batch * e * dtype_bytes for e in elements)


def ddp_buckets(trainable: int, dtype_bytes: int, gpus: int) -> int:
    # DDP's reducer keeps flat gradient buckets (gradient_as_bucket_view is off): one more gradient
    return trainable * dtype_bytes if gpus > 1 else 0


def fsdp_gather(a: Arch, dtype_bytes: int) -> int:
    # FSDP all-gathers one unit's full weights and prefetches the next
    return 2 * a.unit * dtype_bytes


# ---- a config, planned ----------------------------------------------------------------------------
def load_any_config(path: Path, overrides: tuple[str, ...] = ()) -> BaseModel:
    """An SFT or a distillation config, told apart by its fields (a `teacher`, `recipe`, ... key)."""
    from drivekd.train.config import DistillConfig, SFTConfig, load_config

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return load_config(SFTConfig, path, overrides)  # raises its one-line error
    keys = set(raw) if isinstance(raw, dict) else set()
    keys |= {o.split("=", 1)[0].split(".")[0] for o in overrides}
    distill_only = set(DistillConfig.model_fields) - set(SFTConfig.model_fields)
    return load_config(DistillConfig if keys & distill_only else SFTConfig, path, overrides)


def peek_data(data: Any) -> tuple[int, tuple[int, int]] | None:
    """The most images per sample among the first training samples and the first image's size; None
    when the data cannot be read here (a cluster path, say)."""
    from PIL import Image

    from drivekd.data.formats import load_samples, load_split

    path = Path(data.path)
    try:
        if path.is_dir():
            samples = load_split(path, data.train_split, data.image_roots)
        else:
            samples = load_samples(path, data.format, data.image_roots)
    except (DriveKDError, OSError, ValueError):
        return None
    samples = [s for s in samples[:256] if s.images]
    if not samples:
        return None
    try:
        with Image.open(samples[0].images[0].path) as im:
            size = im.size
    except OSError:
        size = DEFAULT_IMAGE
    return max(len(s.images) for s in samples), size


@dataclass(frozen=True)
class Inputs:
    """What the plan is asked for, beyond the config."""

    tokens: int | None = None  # None: data.max_length
    images: int | None = None  # None: read from the data, else 1
    gpus: int = 1
    device: str = "cuda"  # "cpu": the CPU optimiser path and RAM budget (calibration)
    device_memory_gb: float = 80.0
    image: tuple[int, int] | None = None  # (width, height); None: read from the data
    padded: bool | None = None  # the batch holds padding (a mask reaches SDPA); None: when micro batch > 1


# Where a part counts. "saved" parts stay from the student's forward to its backward; on top of them
# the forward/backward phase takes the largest of three moments: the teacher's forward (its working
# set and the targets it makes), the losses (targets and what the losses save), and the backward (what
# the losses saved, the AGP buffer, and the largest transient: those never coexist).
RESIDENT, SAVED, TRANSIENT = "resident", "saved", "transient"
TEACHER, TARGETS, LOSSES, BACKWARD = "teacher forward", "targets", "losses", "backward"


@dataclass
class Plan:
    kind: str  # "sft" | "distill"
    student: dict[str, Any]
    teachers: list[dict[str, Any]]
    step: dict[str, Any]
    parts: dict[str, int]
    counted: dict[str, list[str]]  # part -> the phases it counts in (resident, saved, transient, ...)
    phases: dict[str, int]  # resident and each phase; peak = resident + the largest phase
    peak: int
    budget: int
    fits: bool
    fsdp: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    advice: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def phases_of(parts: dict[str, int], counted: dict[str, list[str]]) -> dict[str, int]:
    """resident, forward/backward (saved parts and the largest moment), and the other phases."""

    def total(phase: str) -> int:
        return sum(v for k, v in parts.items() if phase in counted[k])

    largest = max([v for k, v in parts.items() if TRANSIENT in counted[k]], default=0)
    moments = (
        total(TEACHER) + total(TARGETS),
        total(TARGETS) + total(LOSSES),
        total(LOSSES) + total(BACKWARD) + largest,
    )
    out = {RESIDENT: total(RESIDENT), "forward/backward": total(SAVED) + max(moments)}
    for phase in ("backward end", "combination", "optimiser step", "vision forward"):
        if any(phase in c for c in counted.values()):
            out[phase] = total(phase)
    return out


def plan(config: BaseModel, inputs: Inputs | None = None, *, advise: bool = True) -> Plan:
    """The predicted per-device peak of one training step of `config` (SFTConfig or DistillConfig)."""
    from drivekd.train.config import DistillConfig

    inputs = inputs or Inputs()
    distill = isinstance(config, DistillConfig)
    notes: list[str] = []
    peek = peek_data(config.data) if inputs.images is None or inputs.image is None else None
    image = inputs.image or (peek[1] if peek else DEFAULT_IMAGE)
    lora = json.dumps(config.model.lora, sort_keys=True) if config.model.lora else "null"
    student = arch(config.model.name, lora, image)
    images = inputs.images if inputs.images is not None else (peek[0] if peek else 1)
    if inputs.images is None and peek is None:
        notes.append(f"1 image per sample assumed ({config.data.path} is not readable here; --images N sets it)")
    tokens = inputs.tokens if inputs.tokens is not None else config.data.max_length
    visual = images * student.visual_tokens
    if visual >= tokens:
        raise DriveKDError(
            f"{images} image(s) x {student.visual_tokens} visual tokens = {visual} leave no text in {tokens} "
            "tokens: raise --tokens (or data.max_length), or lower --images"
        )
    s_bytes = DTYPE_BYTES[config.model.dtype]
    mixed = config.train.mixed_precision
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    padded = inputs.padded if inputs.padded is not None else micro > 1
    step = Step(micro, tokens, images, visual, 2 if mixed != "no" else s_bytes, padded)

    by_part = student.trainable(config.model)
    if sum(by_part.values()) == 0:
        raise DriveKDError(f"{config.model.name}: no trainable parameters: everything is frozen")
    vision_graph = by_part["vision"] > 0
    d = _distill_parts(config, student, step, image, notes) if distill else None
    extra = d["projection_params"] if d else 0  # hidden-state projection heads, trained beside the model
    trainable = sum(by_part.values()) + extra
    largest = max(student.largest_tensor, extra)
    strategy = config.combine.strategy if distill else "sum"
    losses = d["losses"] if d else 1
    agp = strategy != "sum" and losses > 1
    # accumulation keeps earlier micro-batches' gradients through the next pass; otherwise a plain
    # backward makes them as it frees activations (the LM head's first, all of them at its end), and a
    # projection strategy writes them at the combination
    grads_in_pass = accum > 1
    step_phase, vision_phase, backward_end = "optimiser step", "vision forward", "backward end"
    plain_end = not agp and not grads_in_pass

    parts: dict[str, int] = {}
    counted: dict[str, list[str]] = {}

    def add(name: str, value: int, *where: str) -> None:
        if value:
            parts[name], counted[name] = value, list(where)

    add("weights", weights(student.parameters + extra, s_bytes), RESIDENT)
    add("teacher weights", d["teacher_weights"] if d else 0, RESIDENT)
    add("optimiser state", optimiser_state(trainable, s_bytes), RESIDENT)
    add(
        "gradients",
        gradients(trainable, s_bytes),
        *([SAVED, vision_phase] if grads_in_pass else []),
        *(["combination"] if agp else []),
        *([backward_end] if plain_end else []),
        step_phase,
    )
    if plain_end and by_part["llm"] and student.lora is None:
        add("LM-head gradient", gradients(student.head, s_bytes), TRANSIENT)  # made once CE's backward is done
    if vision_graph:  # the tower's and projector's backward come last, beside nearly every gradient
        add(
            "activations: vision tower",
            vision_tower(student, step, True),
            SAVED,
            *([backward_end] if plain_end else []),
        )
    else:
        add("vision tower forward (frozen)", vision_tower(student, step, False), vision_phase)
    add(
        "activations: projector",
        projector(student, step, vision_graph or by_part["projector"] > 0),
        SAVED,
        *([backward_end] if plain_end else []),
    )
    add("activations: language model", lm_layers(student, step) + lm_edges(student, step), SAVED)
    add("activations: logits and log-softmax", logits_and_loss(student, step, logits_kept=distill), SAVED)
    add("CE backward", ce_backward(student, step), TRANSIENT)
    if not distill and config.train.tag_attention_weight > 0:
        add("tag-attention maps", per_head_maps(student, step), SAVED)
        add("tag-attention backward", per_head_backward(student, step), TRANSIENT)
    for name, (value, where) in (d["parts"] if d else {}).items():
        add(name, value, where)
    add("autocast weight copies", autocast_copies(trainable, s_bytes, mixed), SAVED)
    if agp:
        from drivekd.distill import aggregate

        buffer_bytes = DTYPE_BYTES[getattr(config.combine, "buffer_dtype", None) or config.model.dtype]
        pending = config.combine.project_per == "step" and accum > 1  # the step's running sum beside the new one
        combine_temp = agp_combination(losses, largest, buffer_bytes, getattr(aggregate, "GRAM_CHUNK", 0))
        if config.combine.project_per == "step" and inputs.gpus > 1:
            combine_temp += agp_buffer(trainable, losses, buffer_bytes)  # reduced across processes into a new one
        add("AGP buffer", agp_buffer(trainable, losses, buffer_bytes) * (2 if pending else 1), BACKWARD, "combination")
        in_place = buffer_bytes == s_bytes
        add("AGP gradient of one loss", agp_grad_result(trainable, largest, s_bytes, in_place), BACKWARD)
        add("AGP combination temporaries", combine_temp, "combination")
    ddp = ddp_buckets(trainable, s_bytes, inputs.gpus)
    add(
        "DDP gradient buckets",
        ddp,
        SAVED,
        *(["combination"] if agp else []),
        *([backward_end] if plain_end else []),
        step_phase,
        *([] if vision_graph else [vision_phase]),
    )
    add("optimiser step temporary", optimiser_step(trainable, largest, s_bytes, inputs.device), step_phase)

    phases = phases_of(parts, counted)
    peak = phases[RESIDENT] + max(v for k, v in phases.items() if k != RESIDENT)
    budget = device_budget(inputs)
    result = Plan(
        kind="distill" if distill else "sft",
        student={
            "name": config.model.name,
            "family": student.family,
            "dtype": config.model.dtype,
            "parameters": student.parameters,
            "trainable": trainable,
            "trainable_by_part": by_part,
            "layers": student.layers,
            "hidden": student.hidden,
            "heads": student.heads,
            "kv_heads": student.kv_heads,
            "intermediate": student.intermediate,
            "vocab": student.vocab,
            "visual_tokens_per_image": student.visual_tokens,
        },
        teachers=d["teachers"] if d else [],
        step={
            "micro_batch": step.batch,
            "grad_accum": accum,
            "tokens": step.tokens,
            "images": step.images,
            "visual_tokens": step.visual,
            "text_tokens": step.text,
            "activation_bytes": step.act_bytes,
            "strategy": strategy,
            "losses": losses,
            "captured_layers": d["captured"] if d else None,
            "gpus": inputs.gpus,
            "device": inputs.device,
        },
        parts=parts,
        counted=counted,
        phases=phases,
        peak=peak,
        budget=budget,
        fits=peak <= budget,
        notes=notes,
    )
    if inputs.gpus > 1:
        result.fsdp = _fsdp(result, student, s_bytes, inputs.gpus)
        notes.append(
            f"--gpus {inputs.gpus}: under DDP every device holds the figures above (micro batch {step.batch} per "
            f"device); FSDP shards weights, gradients, optimiser state and AGP buffers {inputs.gpus} ways "
            "(drivekd's projection strategies have not been run under FSDP)"
        )
    if agp and config.combine.amortize_every:
        notes.append(
            "combine.amortize_every does not lower the peak: every N-th step still builds the (k, P) buffer. "
            "What does: combine.buffer_dtype bfloat16, fewer signals, combine.strategy sum, or FSDP"
        )
    if advise and not result.fits:
        result.advice = advice(config, inputs, result)
    return result


def device_budget(inputs: Inputs) -> int:
    total = int(inputs.device_memory_gb * GiB)
    return int(total * ALLOCATOR_SHARE) - CUDA_CONTEXT if inputs.device == "cuda" else total


SHARDED = (
    "weights",
    "optimiser state",
    "gradients",
    "AGP buffer",
    "AGP gradient of one loss",
    "optimiser step temporary",
)


def _fsdp(p: Plan, student: Arch, s_bytes: int, gpus: int) -> dict[str, Any]:
    """The same step with weights, gradients, optimiser state and AGP buffers sharded `gpus` ways, plus
    the gathered layers; DDP's buckets are gone."""
    parts = {k: v // gpus if k in SHARDED else v for k, v in p.parts.items() if k != "DDP gradient buckets"}
    counted = {k: p.counted[k] for k in parts}
    parts["FSDP gathered layers"] = fsdp_gather(student, s_bytes)
    counted["FSDP gathered layers"] = [SAVED, *(ph for ph in ("backward end", "vision forward") if ph in p.phases)]
    phases = phases_of(parts, counted)
    peak = phases[RESIDENT] + max(v for k, v in phases.items() if k != RESIDENT)
    return {"gpus": gpus, "parts": parts, "counted": counted, "phases": phases, "peak": peak}


def _distill_parts(config: Any, student: Arch, step: Step, image: tuple[int, int], notes: list[str]) -> dict[str, Any]:
    """Teachers, captured maps, signal losses and targets of a distillation config: parts as
    {name: (bytes, where it counts)}."""
    from drivekd.distill.engine import check_recipe

    signals = check_recipe(config)
    teacher_of = {n: str(config.teacher.of(n)) for n in signals}
    cached = bool(config.teacher.cache) and bool(signals)
    t_bytes = DTYPE_BYTES[config.teacher.dtype]
    teachers = {ckpt: arch(ckpt, "null", image) for ckpt in dict.fromkeys(teacher_of.values())}
    # the same bound signals the distiller and the teachers read (drivekd/distill/signals.py)
    bound = {name: sig.bind(name, student.layers, teachers[teacher_of[name]].layers) for name, sig in signals.items()}

    def rows(b: Any) -> int:
        # text->vision signals read the text rows of a map (R x T), the others the whole map (T x T)
        return step.text if b.reads == "text_rows" else step.tokens

    def target_elements(b: Any, t: Arch) -> int:
        if b.reads in ("maps", "text_rows"):
            return rows(b) * step.tokens
        return b.signal.stored_elements(step.tokens, step.visual, t.hidden, t.vocab)  # hidden: T x width, logits: T x V

    captured: dict[int, int] = {}
    whole, text_rows = set(), set()
    pair_rows: list[int] = []
    elements: list[int] = []
    projection_params = 0
    hidden_pairs, hidden_width, kl_vocab = 0, 0, 0
    for name, b in bound.items():
        sig, t, pairs = b.signal, teachers[teacher_of[name]], b.pairs
        if b.reads in ("maps", "text_rows"):
            (whole if b.reads == "maps" else text_rows).update(b.student_layers)
            for layer in b.student_layers:  # a layer some signal needs whole serves the text-row signals too
                captured[layer] = max(captured.get(layer, 0), rows(b))
                pair_rows.append(rows(b))
        if sig.needs_hidden:
            hidden_pairs += len(pairs)
            hidden_width = max(hidden_width, t.hidden)
            if t.hidden != student.hidden:
                projection_params += student.hidden * t.hidden  # a Linear(student width, teacher width)
        if sig.needs_logits:
            kl_vocab = max(kl_vocab, t.vocab)
        elements += [target_elements(b, t) for _ in pairs]
    parts: dict[str, tuple[int, str]] = {}
    if captured:
        parts["captured attention maps"] = (captured_maps(student, step, captured), SAVED)
        parts["captured-map recompute"] = (map_recompute(student, step, captured), TRANSIENT)
        parts["attention-map losses"] = (map_losses(step, pair_rows), LOSSES)
    if hidden_pairs:
        parts["hidden-state losses"] = (hidden_losses(student, step, hidden_pairs, hidden_width), LOSSES)
    if kl_vocab:
        parts["logit-KL loss"] = (logit_kl_loss(step, kl_vocab), LOSSES)
    teacher_weights = 0
    if cached:
        parts["teacher cache reads"] = (cache_reads(step, elements), TARGETS)
        notes.append("teacher.cache: no teacher on the device; cache shards stay in host memory (at most 4 GiB)")
    elif signals:
        live = 0
        for ckpt, t in teachers.items():
            maps: dict[int, int] = {}
            hidden_layers, logits = 0, False
            for name, b in bound.items():
                if teacher_of[name] != ckpt:
                    continue
                if b.reads in ("maps", "text_rows"):
                    for tl in b.teacher_layers:
                        maps[tl] = max(maps.get(tl, 0), rows(b))
                if b.reads == "hidden":
                    hidden_layers = max(hidden_layers, max(b.teacher_layers, default=0) + 3)  # it runs one layer deeper
                logits = logits or b.reads == "logits"
            live += live_teacher(t, step, t_bytes, maps, hidden_layers, logits)
            teacher_weights += weights(t.parameters, t_bytes)
        parts["live teacher forward"] = (live, TEACHER)
        parts["teacher targets"] = (teacher_targets(step, elements, t_bytes), TARGETS)
    info = [
        {
            "name": ckpt,
            "parameters": t.parameters,
            "layers": t.layers,
            "dtype": config.teacher.dtype,
            "on_device": not cached,
            "signals": [name for name in signals if teacher_of[name] == ckpt],
        }
        for ckpt, t in teachers.items()
    ]
    return {
        "teachers": info,
        "captured": {"maps": sorted(whole), "text_rows": sorted(text_rows - whole)},  # the student's layers
        "teacher_weights": teacher_weights,
        "parts": parts,
        "losses": 1 + len(signals),  # CE and each signal
        "projection_params": projection_params,
    }


# ---- advice -----------------------------------------------------------------------------------------
def _with(config: BaseModel, section: str, **changes: Any) -> BaseModel:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})


def advice(config: BaseModel, inputs: Inputs, current: Plan) -> list[dict[str, Any]]:
    """What to change when the plan does not fit, each change planned again, ranked by bytes saved."""
    from drivekd.train.config import CombineConfig, DistillConfig

    m = config.model
    distill = isinstance(config, DistillConfig)
    options: list[tuple[str, dict[str, Any], Callable[[], int | None]]] = []

    def peak_of(changed: BaseModel) -> Callable[[], int]:
        return lambda: plan(changed, inputs, advise=False).peak

    if not m.lora and current.student["trainable_by_part"]["vision"] > 0:
        options.append(
            (
                "freeze the vision tower",
                {"model.freeze_vision": True},
                peak_of(_with(config, "model", freeze_vision=True)),
            )
        )
    if m.lora and current.student["trainable_by_part"]["vision"] > 0:
        # target_modules such as [q_proj, ...] also match InternViT's q/k/v: its activations then stay
        only_lm = {**m.lora, "target_modules": LORA_ADVICE["target_modules"]}
        options.append(
            (
                "LoRA on the language model only",
                {"model.lora.target_modules": only_lm["target_modules"]},
                peak_of(_with(config, "model", lora=only_lm)),
            )
        )
    if not m.lora:
        lora = _with(config, "model", lora=LORA_ADVICE)
        options.append(
            ("LoRA on the language model's attention projections", {"model.lora": LORA_ADVICE}, peak_of(lora))
        )
    if m.dtype == "float32":
        bf16 = _with(_with(config, "model", dtype="bfloat16"), "train", mixed_precision="bf16")
        options.append(("bf16 weights", {"model.dtype": "bfloat16", "train.mixed_precision": "bf16"}, peak_of(bf16)))
    if distill and current.teachers and not config.teacher.cache:
        options.append(
            (
                "teacher targets from a cache (run `drivekd cache-teacher` first) instead of a live teacher",
                {"teacher.cache": "DIR"},
                peak_of(_with(config, "teacher", cache="DIR")),
            )
        )
    agp = "AGP buffer" in current.parts
    buffer_dtype = getattr(config.combine, "buffer_dtype", None) if distill else None
    if agp and (buffer_dtype or m.dtype) == "float32":
        if "buffer_dtype" in CombineConfig.model_fields:
            options.append(
                (
                    "the AGP buffer in bf16",
                    {"combine.buffer_dtype": "bfloat16"},
                    peak_of(_with(config, "combine", buffer_dtype="bfloat16")),
                )
            )
        else:
            options.append(("the AGP buffer in bf16 (this drivekd has no combine.buffer_dtype)", {}, lambda: None))
    if agp:
        summed = _with(config, "combine", strategy="sum", amortize_every=None)
        fields: dict[str, Any] = {"combine.strategy": "sum"}
        if config.reweight.enabled:  # reweighting reads per-loss gradient norms, which `sum` never forms
            summed, fields = _with(summed, "reweight", enabled=False), {**fields, "reweight.enabled": False}
        options.append(("summed gradients, no projection (changes the method)", fields, peak_of(summed)))
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    for smaller in (k for k in range(micro - 1, 0, -1) if micro % k == 0):
        candidate = _with(config, "train", micro_batch_size=smaller, grad_accum=accum * micro // smaller)
        peak = plan(candidate, inputs, advise=False).peak
        if peak <= current.budget or smaller == 1:
            options.append(
                (
                    f"micro batch {smaller} with {accum * micro // smaller}x accumulation (the same samples per step)",
                    {"train.micro_batch_size": smaller, "train.grad_accum": accum * micro // smaller},
                    lambda p=peak: p,
                )
            )
            break
    for gpus in (2, 4, 8, 16):
        if gpus <= inputs.gpus and gpus != 16:
            continue
        sharded = plan(config, dataclasses.replace(inputs, gpus=gpus), advise=False).fsdp
        assert sharded is not None
        if sharded["peak"] <= current.budget or gpus == 16:
            launch = f"accelerate launch --use_fsdp --num_processes {gpus}"
            options.append((f"FSDP across {gpus} GPUs", {"launch": launch}, lambda p=sharded["peak"]: p))
            break
    rows = []
    for change, fields, peak_fn in options:
        peak = peak_fn()
        saves = None if peak is None else current.peak - peak
        fits = None if peak is None else peak <= current.budget
        rows.append({"change": change, "fields": fields, "saves": saves, "peak": peak, "fits": fits})
    rows.sort(key=lambda r: -1 if r["saves"] is None else -r["saves"])
    return rows


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
