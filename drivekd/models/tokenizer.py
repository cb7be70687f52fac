"""The offline tokenizer shared by every tiny preset: byte-level BPE trained on DriveSim-QA text.

Both families' special tokens live in one vocabulary, so a teacher and a student of a family see
identical token ids (attention distillation compares maps position by position). Rebuild with
`drivekd models build-tokenizer --data DIR` (see README).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SHIPPED = Path(__file__).parent / "assets" / "tokenizer.json"
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",  # InternVL
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",  # Qwen2.5-VL
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """Byte-level BPE that keeps every digit a token of its own, as Qwen2's and LLaMA's tokenizers do.

    Merged digits made each object-tag coordinate one token out of thousands (`0.4727` -> `0 . 4727`),
    each seen a handful of times, so no model could learn where a tag points; digit by digit,
    `0 . 4 7 2 7` shares its leading digits with every nearby tag.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_shipped_tokenizer(path: Path = SHIPPED) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": "<IMG_CONTEXT>"},
        model_max_length=4096,
    )
