"""The narrow interface the rest of drivekd uses to train and query a VLM.

A backend turns samples into a padded model batch (ChatML prompt, images expanded in placeholder
order, labels on answer tokens only), tells which positions hold visual tokens, and generates.
Family files (`internvl.py`, `qwen25vl.py`) supply only the image-specific parts.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from drivekd.data.sample import IMAGE_PLACEHOLDER, Sample, decision_span, focus_object, tag_fraction
from drivekd.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Batch:
    """Model inputs plus what losses and signals need about each position and sample."""

    inputs: dict[str, torch.Tensor]  # forward kwargs: input_ids, attention_mask, pixel_values, ...
    labels: torch.Tensor | None  # (B, T); IGNORE_INDEX outside answers
    visual_mask: torch.Tensor  # (B, T) bool: positions filled with visual embeddings
    sample_ids: list[str]
    capabilities: list[str]
    decision_mask: torch.Tensor | None = None  # (B, T) bool: answer tokens inside `Final: {...}`
    tag_mask: torch.Tensor | None = None  # (B, T) bool: the visual token under the object the sample is about

    def to(self, device: torch.device | str) -> Batch:
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        self.labels = None if self.labels is None else self.labels.to(device)
        self.visual_mask = self.visual_mask.to(device)
        self.decision_mask = None if self.decision_mask is None else self.decision_mask.to(device)
        self.tag_mask = None if self.tag_mask is None else self.tag_mask.to(device)
        return self

    def __len__(self) -> int:
        return len(self.sample_ids)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose next token is an answer token, where the CE is taken."""
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return answer


def answer_cross_entropy(
    model: torch.nn.Module, batch: Batch, *, all_logits: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """The answer tokens' mean next-token CE (the model's own loss with `labels`) and the forward's
    output. The LM head runs only at the answer-predicting positions (`logits_to_keep`, an `(N, V)`
    `logits`): full logits are B x T x vocabulary (1 GiB in fp32 for one 6-camera InternVL3 sample)
    and the CE's forward and backward keep several copies, for the few dozen positions that count.
    `all_logits` keeps every position's logits `(B, T, V)` (for a signal that reads them)."""
    assert batch.labels is not None, "the answer CE needs labels"
    answer = answer_positions(batch.labels)
    # no KV cache: a training forward has no use for one, and under activation checkpointing it would
    # keep every layer's keys and values
    out = model(**batch.inputs, logits_to_keep=0 if all_logits else answer, use_cache=False, **kwargs)
    logits = out.logits[answer] if all_logits else out.logits
    targets = batch.labels[:, 1:][answer[:, :-1]]
    return torch.nn.functional.cross_entropy(logits.float(), targets), out


class VLMBackend(abc.ABC):
    family: str = ""
    # Parameter-name prefixes of the model's parts (checked projector first: it may sit inside the
    # vision module, as Qwen2.5-VL's `visual.merger` does); everything else is the language model.
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_processor: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.im_start = "<|im_start|>"
        self.im_end = "<|im_end|>"
        self.eos_id = tokenizer.convert_tokens_to_ids(self.im_end)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._count_cache: dict[tuple[int, int], int] = {}
        self._length_cache: dict[tuple[tuple[str, ...], str, str], int] = {}

    # ---- family-specific -------------------------------------------------------------------
    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel tensors for the model, and the number of visual tokens of each image."""

    @abc.abstractmethod
    def token_grids(self, pixel_inputs: dict[str, torch.Tensor], counts: list[int]) -> list[tuple[int, int, int]]:
        """Per image: `(offset, rows, cols)` of the row-major token grid that covers the whole image
        within the image's token block (a tiled InternVL image: its thumbnail)."""

    @abc.abstractmethod
    def image_tokens(self, count: int) -> str:
        """The token text one image of `count` visual tokens expands to in the prompt."""

    @property
    def visual_token_id(self) -> int:
        """The id of positions the model fills with visual embeddings (both families' config field)."""
        return int(self.model.config.image_token_id)

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    # ---- shared ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.text_config.vocab_size)

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (`layers`, `norm`): no vision tower, no LM head."""
        inner = self.model.model if hasattr(self.model, "model") else self.model
        return inner.language_model if hasattr(inner, "language_model") else inner

    def forward(
        self, batch: Batch, *, logits: bool = True, hidden_states: bool = False, layers: int | None = None
    ) -> Any:
        """One forward pass over `batch`. `logits=False` skips the LM head (`last_hidden_state` instead);
        `layers=N` runs only the first N LM layers (a teacher whose signals stop early), which only
        makes sense without logits."""
        return self.run(batch.inputs, logits=logits, hidden_states=hidden_states, layers=layers)

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        *,
        logits: bool = True,
        hidden_states: bool = False,
        layers: int | None = None,
        past_key_values: Any = None,
    ) -> Any:
        """`forward` on model inputs; with `past_key_values` (a KV cache of the sequence's first
        tokens, see `prefix_inputs` / `suffix_inputs`) the inputs are the tokens after them and the
        cache is extended in place and returned as the result's `past_key_values`."""
        if layers is not None and logits:
            raise ValueError("a truncated forward has no logits")
        lm = self.language_model
        full = lm.layers
        if layers is not None and layers < len(full):
            lm.layers = full[:layers]
        try:
            model = self.model if logits else self.model.model
            extra = {} if past_key_values is None else {"past_key_values": past_key_values, "use_cache": True}
            return model(**inputs, output_hidden_states=hidden_states, **extra)
        finally:
            lm.layers = full

    # ---- a shared prefix run once, its KV cache reused -----------------------------------------
    # Inputs with one value per token (cut at a prefix's end); the others (pixels, image grids) are
    # per image and belong to the prefix, which holds every image.
    sequence_inputs: tuple[str, ...] = ("input_ids", "attention_mask")

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Every token's rotary position as the model's own forward places it; None where that is the
        token's index (plain 1-D rotary), which a forward after a KV cache continues by itself."""
        return None

    def prefix_inputs(self, batch: Batch, length: int) -> dict[str, torch.Tensor]:
        """The inputs of a one-sample batch's first `length` tokens, which hold all its images."""
        inputs = {k: v[:, :length] if k in self.sequence_inputs else v for k, v in batch.inputs.items()}
        positions = self.position_ids(batch.inputs)
        if positions is not None:
            inputs["position_ids"] = positions[..., :length]
        return inputs

    def suffix_inputs(self, batch: Batch, length: int) -> dict[str, torch.Tensor]:
        """The inputs of a right-padded batch's tokens after its samples' common first `length` tokens
        (no image among them), to run against those tokens' KV cache: the attention mask spans the
        whole sequence, and the positions continue the whole sequence's (Qwen2.5-VL's 3-D M-RoPE ones,
        which the images shift, computed from the whole batch)."""
        if not bool(batch.inputs["attention_mask"][:, :length].all()):
            raise ValueError("a suffix batch needs its samples' prefix unpadded (right padding)")
        inputs = {k: batch.inputs[k][:, length:] for k in self.sequence_inputs if k != "attention_mask"}
        inputs["attention_mask"] = batch.inputs["attention_mask"]
        positions = self.position_ids(batch.inputs)
        if positions is not None:
            inputs["position_ids"] = positions[..., length:]
        return inputs

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_attention(self, implementation: str) -> None:
        """Switch the attention implementation of the language model (e.g. `sdpa`, `eager`)."""
        self.model.set_attn_implementation(implementation)

    def prompt_text(self, sample: Sample, tokens_per_image: Sequence[int]) -> str:
        parts = sample.question.split(IMAGE_PLACEHOLDER)
        text = parts[0]
        for count, rest in zip(tokens_per_image, parts[1:], strict=True):
            text += self.image_tokens(count) + rest
        return f"{self.im_start}user\n{text}{self.im_end}\n{self.im_start}assistant\n"

    def build_batch(
        self,
        samples: Sequence[Sample],
        *,
        with_answers: bool = True,
        padding_side: str = "right",
        max_length: int | None = None,
    ) -> Batch:
        images = []
        for s in samples:
            for ref in s.images:
                try:
                    with Image.open(ref.path) as im:
                        images.append(im.convert("RGB"))
                except OSError as e:
                    raise DataError(f"sample {s.id}: cannot read image {ref.path}: {e}") from e
        pixel_inputs, counts = self.image_inputs(images) if images else ({}, [])
        grids = self.token_grids(pixel_inputs, counts) if images else []
        rows, label_rows, decision_rows, tag_positions, k = [], [], [], [], 0
        for s in samples:
            n = len(s.images)
            prompt = self.tokenizer(self.prompt_text(s, counts[k : k + n]), add_special_tokens=False).input_ids
            tag_positions.append(self._tag_position(s, prompt, images[k : k + n], grids[k : k + n], with_answers))
            k += n
            answer, decision = self._answer_tokens(s.answer) if with_answers else ([], [])
            ids = prompt + answer
            if max_length is not None and len(ids) > max_length:
                raise DataError(f"sample {s.id}: {len(ids)} tokens exceed max_length {max_length}")
            rows.append(ids)
            label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
            decision_rows.append([False] * len(prompt) + decision)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        decision_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        tag_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (ids, lab, dec) in enumerate(zip(rows, label_rows, decision_rows, strict=True)):
            start = 0 if padding_side == "right" else width - len(ids)
            sl = slice(start, start + len(ids))
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            labels[i, sl] = torch.tensor(lab)
            decision_mask[i, sl] = torch.tensor(dec, dtype=torch.bool)
            if tag_positions[i] is not None:
                tag_mask[i, start + tag_positions[i]] = True
        inputs = {"input_ids": input_ids, "attention_mask": attention, **pixel_inputs, **self.extra_inputs(input_ids)}
        return Batch(
            inputs=inputs,
            labels=labels if with_answers else None,
            visual_mask=input_ids == self.visual_token_id,
            sample_ids=[s.id for s in samples],
            capabilities=[s.capability for s in samples],
            decision_mask=decision_mask if with_answers else None,
            tag_mask=tag_mask,
        )

    def _tag_position(
        self,
        sample: Sample,
        prompt: list[int],
        images: list[Image.Image],
        grids: list[tuple[int, int, int]],
        with_answer: bool,
    ) -> int | None:
        """Prompt position of the visual token under the object the sample is about (which object is
        the data's convention, `focus_object`; where its token sits is this backend's)."""
        focus = focus_object(sample, with_answer=with_answer)
        if focus is None:
            return None
        camera, x, y = focus
        j = [ref.camera for ref in sample.images].index(camera)
        point = tag_fraction(x, y, images[j].width, images[j].height)  # fractions, or DriveLM's pixels
        if point is None:  # outside the image (pixels of another image size): no token is the object's
            return None
        x, y = point
        offset, grid_rows, grid_cols = grids[j]
        vis = self.visual_token_id
        # each image is one run of visual tokens, in placeholder order
        block_starts = [p for p, t in enumerate(prompt) if t == vis and (p == 0 or prompt[p - 1] != vis)]
        row = min(max(int(y * grid_rows), 0), grid_rows - 1)
        col = min(max(int(x * grid_cols), 0), grid_cols - 1)
        return block_starts[j] + offset + row * grid_cols + col

    def _answer_tokens(self, answer: str) -> tuple[list[int], list[bool]]:
        """Token ids of an answer (plus end of turn) and which of them lie in its committed answer
        (`decision_span`, the data's convention)."""
        enc = self.tokenizer(answer + self.im_end, add_special_tokens=False, return_offsets_mapping=True)
        span = decision_span(answer)
        if span is None:
            return enc.input_ids, [False] * len(enc.input_ids)
        return enc.input_ids, [start < span[1] and end > span[0] for start, end in enc.offset_mapping]

    def visual_token_count(self, width: int, height: int) -> int:
        """Visual tokens of one image of this size (reads no pixels)."""
        return self.image_inputs([Image.new("RGB", (width, height))])[1][0]

    def fsdp_units(self) -> list[torch.nn.Module]:
        """What a sharded model gathers one at a time: each language-model layer. The rest (vision
        tower, projector, embeddings, head) is the root unit, which every forward runs: a unit of its
        own for the vision tower would be skipped by a process whose micro-batch has no image while
        another's has one, and the processes' collectives would no longer pair up."""
        return list(self.language_model.layers)

    def part_of(self, parameter_name: str) -> str:
        """ "projector", "vision" or "llm": which part of the VLM a parameter belongs to."""
        name = f".{parameter_name}."
        for part, prefixes in (("projector", self.projector_prefixes), ("vision", self.vision_prefixes)):
            if any(f".{pre}." in name for pre in prefixes):
                return part
        return "llm"

    def token_lengths(self, sample: Sample) -> int:
        """Sequence length of a sample with its answer; images are only opened for their size.

        Remembered per (images, question, answer): the length filter and length-grouped batching
        both ask for every training sample."""
        key = (tuple(ref.path for ref in sample.images), sample.question, sample.answer)
        if key not in self._length_cache:
            self._length_cache[key] = self._token_lengths(sample)
        return self._length_cache[key]

    def token_ids(self, sample: Sample) -> list[int]:
        """The token ids `build_batch` gives a sample (prompt, then answer); images are only opened
        for their size."""
        prompt = self.tokenizer(self.prompt_text(sample, self.visual_tokens(sample)), add_special_tokens=False)
        return list(prompt.input_ids) + self._answer_tokens(sample.answer)[0]

    def visual_tokens(self, sample: Sample) -> list[int]:
        """Visual tokens of each of the sample's images; images are only opened for their size."""
        counts = []
        for ref in sample.images:
            with Image.open(ref.path) as im:
                size = im.size
            if size not in self._count_cache:
                self._count_cache[size] = self.visual_token_count(*size)
            counts.append(self._count_cache[size])
        return counts

    def _token_lengths(self, sample: Sample) -> int:
        prompt = self.prompt_text(sample, self.visual_tokens(sample))
        return len(self.tokenizer(prompt + sample.answer + self.im_end, add_special_tokens=False).input_ids)

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int = 96) -> list[str]:
        """Greedy decoding with the KV cache, left-padded batch."""
        was_training = self.model.training
        self.model.eval()
        batch = self.build_batch(samples, with_answers=False, padding_side="left").to(self.device)
        out = self.model.generate(
            **batch.inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        self.model.train(was_training)
        new = out[:, batch.inputs["input_ids"].shape[1] :]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    def save(self, directory: str | Path, model: PreTrainedModel | None = None) -> None:
        """HF format: loads back with plain transformers (model, tokenizer, image processor). `model`:
        written instead of the backend's own (a whole copy of a sharded one)."""
        (model or self.model).save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
