"""The memory arithmetic of one training step: one small function per part, each with a one-line
reason for its formula; sizes are bytes."""

from __future__ import annotations

from dataclasses import dataclass

from drivekd.bench.plan.model import Arch


@dataclass(frozen=True)
class Step:
    """One micro batch: `batch` samples padded to `tokens`, each with `images` images."""

    batch: int
    tokens: int
    images: int
    visual: int  # visual tokens per sample
    act_bytes: int  # bytes per activation value: the model's dtype, or 2 under bf16/fp16 autocast
    masked: bool  # padding: a mask reaches SDPA (without padding transformers runs plain causal)
    answers: int | None = None  # answer tokens per sample; None: every text token (an upper bound)

    @property
    def text(self) -> int:
        """R: the text rows a text->vision signal reads."""
        return self.tokens - self.visual

    @property
    def head_rows(self) -> int:
        """The positions per sample the LM head runs at for the CE: the answer-predicting ones."""
        return self.text if self.answers is None else min(self.answers, self.text)


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


def logits_and_loss(a: Arch, s: Step, all_logits: bool) -> int:
    # the head runs at the answer positions only, and CE saves its fp32 log-softmax; a signal reading
    # logits (logit KL) makes the head run at every position and keeps the logits for its loss
    rows = s.tokens if all_logits else s.head_rows
    return s.batch * rows * a.vocab * (4 + (s.act_bytes if all_logits else 0))


def ce_backward(a: Arch, s: Step, all_logits: bool) -> int:
    # CE's backward makes two fp32 gradients of the log-softmax's size (and a 16-bit one for 16-bit logits)
    rows = s.tokens if all_logits else s.head_rows
    return s.batch * rows * a.vocab * (8 + (0 if s.act_bytes == 4 else s.act_bytes))


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
    return a.vision_layers * tokens * (per_token + lora) + patch_inputs(a, s)


def patch_inputs(a: Arch, s: Step) -> int:
    # Qwen2.5-VL's patch embedding (a Conv3d over flattened patches) keeps its input
    return s.batch * s.images * a.vision_tokens * a.patch_values * s.act_bytes if a.family != "internvl" else 0


def checkpointed(saved: int, layers: int, tokens: int, width: int, weight_bytes: int) -> tuple[int, int]:
    # activation checkpointing: a stack of `layers` decoder layers keeps each layer's input (`tokens` x
    # `width`, the residual stream: in the weights' dtype, autocast or not) instead of what the layers
    # save (`saved`); the backward pass recomputes one layer at a time, which then holds its share of
    # `saved` (the second figure)
    return layers * tokens * width * weight_bytes, saved // layers


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


def captured_maps(a: Arch, s: Step, rows: dict[int, int]) -> int:
    # a captured student layer takes its map losses inside its forward and keeps no map: the checkpoint
    # keeps q and k (saved by SDPA anyway), the forward's one additive mask, and for a text-row layer
    # its gathered queries and mask rows
    b = s.act_bytes
    mask = s.batch * s.tokens * s.tokens * b if any(r == s.tokens for r in rows.values()) else 0
    return mask + sum(s.batch * r * (s.tokens + a.heads * a.head_dim) * b for r in rows.values() if r < s.tokens)


def map_recompute(a: Arch, s: Step, rows: dict[int, int]) -> int:
    # backward recomputes one captured layer's map at a time, keeping every head's fp32 probabilities
    # until used, beside the logits of one head and the gradients of the map and of one head
    return s.batch * max(rows.values(), default=0) * s.tokens * 4 * (a.heads + 3)


def map_losses(s: Step, pair_rows: list[int]) -> int:
    # the losses' masks, boolean and as float weights, made once per batch for each block they read
    # (the whole map, the text rows), and one layer's map and loss temporaries at a time
    masks = sum(s.batch * r * s.tokens * (s.act_bytes + 1) for r in set(pair_rows))
    return masks + 3 * s.batch * max(pair_rows, default=0) * s.tokens * 4


def hidden_losses(a: Arch, s: Step, pairs: int, width: int, checkpointed: bool = False) -> int:
    # output_hidden_states keeps every layer's input and the final normed output; each matched pair keeps
    # a (projected) fp32 difference. Under activation checkpointing the layers' inputs are the tensors
    # the checkpoints keep (counted there): only the final output is extra
    kept = (1 if checkpointed else a.layers + 1) * s.batch * s.tokens * a.hidden * s.act_bytes
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


def gram_pass(a: Arch, s: Step, losses: int, trainable: int, grad_bytes: int, all_logits: bool) -> int:
    # `gram: modules`: the k-batched backward holds k of everything one ordinary backward makes at a
    # time, the largest being the larger of the CE's logit-sized gradients, one decoder layer's
    # cotangents, and one parameter's k gradients (`Arch.gram_held`); beside it, what a shallow loss's
    # pass kept for the cross terms (at most SHALLOW_SHARE of what the losses reach: taken of the
    # trainable parameters)
    from drivekd.distill.gramian import SHALLOW_SHARE

    rows = s.tokens if all_logits else s.head_rows
    logits = s.batch * rows * a.vocab * 8
    layer = s.batch * s.tokens * (3 * a.intermediate + 4 * a.hidden) * s.act_bytes
    shallow = int(SHALLOW_SHARE * trainable) * grad_bytes
    return losses * max(logits, layer, a.gram_held * grad_bytes) + shallow


def cache_reads(s: Step, elements: list[int], value_bytes: int) -> int:
    # CachedTeachers pads each sample's stored target into one batch tensor per (signal, matched layer),
    # fp16 targets as fp16, fp8 ones as their fp32 dequantisation
    return sum(s.batch * e * value_bytes for e in elements)


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
    # the root unit's weights are gathered for the whole forward and backward, and its whole gradient
    # is reduce-scattered at the backward's end; a decoder layer is gathered with the
    # next one prefetched, and its whole gradient lives until its reduce-scatter
    return (2 * a.root + 3 * a.unit) * dtype_bytes
