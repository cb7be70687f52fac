import dataclasses

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split
from drivekd.errors import DriveKDError
from drivekd.models.backend import IGNORE_INDEX
from drivekd.models.loading import PRESETS, LoadOptions, count_parameters, load_backend

FAMILIES = {
    "internvl": ("tiny-internvl-teacher", "tiny-internvl-student"),
    "qwen25vl": ("tiny-qwen25vl-teacher", "tiny-qwen25vl-student"),
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "data"
    generate(out, GenerateConfig(scenes=3, seed=11))
    return load_split(out, "train")[:4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_and_student_share_token_layout(family, samples):
    teacher, student = (load_backend(name) for name in FAMILIES[family])
    assert 10e6 <= count_parameters(teacher) <= 20e6
    assert 1e6 <= count_parameters(student) <= 3e6
    bt, bs = teacher.build_batch(samples), student.build_batch(samples)
    assert torch.equal(bt.inputs["input_ids"], bs.inputs["input_ids"])
    assert torch.equal(bt.visual_mask, bs.visual_mask)
    assert bt.visual_mask.any()
    assert teacher.num_layers == 8 and student.num_layers == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_batch_labels_cover_answers_only(name, samples):
    backend = load_backend(name)
    batch = backend.build_batch(samples)
    for i, s in enumerate(samples):
        labelled = batch.labels[i][batch.labels[i] != IGNORE_INDEX]
        assert backend.tokenizer.decode(labelled) == s.answer + "<|im_end|>"
        # padding is on the right and never attended
        length = int(batch.inputs["attention_mask"][i].sum())
        assert (batch.inputs["attention_mask"][i, :length] == 1).all()
    # every image placeholder expanded: visual positions = tokens per image x images
    per_image = backend.visual_token_count(224, 128)
    assert int(batch.visual_mask[0].sum()) == per_image * len(samples[0].images)
    out = backend.model(**batch.inputs, labels=batch.labels)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["tiny-internvl-student", "tiny-qwen25vl-student"])
def test_decision_mask_is_the_final_span_and_ce_is_the_answer_token_mean(name, samples):
    import re

    from drivekd.train.sft import answer_metrics, cross_entropy

    backend = load_backend(name)
    batch = backend.build_batch(samples)
    for i, s in enumerate(samples):
        marked = backend.tokenizer.decode(batch.inputs["input_ids"][i][batch.decision_mask[i]])
        assert marked == re.search(r"Final: \{[^}]*\}", s.answer).group(0)
        assert (batch.labels[i][batch.decision_mask[i]] != IGNORE_INDEX).all()  # answer tokens only
    # slow reference: the mean NLL over answer tokens, one token at a time
    logits = backend.model(**batch.inputs).logits.double()
    num = den = 0.0
    for i in range(len(samples)):
        for t in range(1, batch.labels.shape[1]):
            label = int(batch.labels[i, t])
            if label == IGNORE_INDEX:
                continue
            num += -torch.log_softmax(logits[i, t - 1], -1)[label].item()
            den += 1
    assert cross_entropy(backend.model, batch)["ce"].item() == pytest.approx(num / den, rel=1e-4)
    # decision_acc: teacher-forced exact match of the whole span, against a per-sample loop; sample 0's
    # span labels are set to the model's own argmax so that one sample is a hit
    argmax = logits.argmax(-1)
    span = batch.decision_mask[0].nonzero().flatten()
    batch.labels[0, span] = argmax[0, span - 1]
    expected = sum(
        all(
            int(argmax[i, t - 1]) == int(batch.labels[i, t])
            for t in range(1, batch.labels.shape[1])
            if batch.decision_mask[i, t]
        )
        for i in range(len(samples))
    ) / len(samples)
    metrics = answer_metrics(backend.model, batch)
    assert expected >= 1 / len(samples)
    accuracy, answers_with_a_span = metrics["decision_acc"]
    assert answers_with_a_span == len(samples) and accuracy.item() == pytest.approx(expected)
    assert metrics["ce"].item() == pytest.approx(cross_entropy(backend.model, batch)["ce"].item())


@pytest.mark.parametrize("name", ["tiny-internvl-student", "tiny-qwen25vl-student"])
def test_answer_ce_runs_the_head_at_answer_positions_only_and_equals_the_models_own_loss(name, samples):
    from drivekd.models.backend import answer_cross_entropy, answer_positions

    backend = load_backend(name, LoadOptions(seed=5))
    batch = backend.build_batch(samples)
    params = [p for p in backend.model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        backend.model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    own, own_grads = loss_and_grads(lambda: backend.model(**batch.inputs, labels=batch.labels).loss)
    answers = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    for all_logits in (False, True):
        kept = {}

        def ours(all_logits=all_logits, kept=kept):
            loss, out = answer_cross_entropy(backend.model, batch, all_logits=all_logits)
            kept["shape"] = tuple(out.logits.shape)
            return loss

        loss, grads = loss_and_grads(ours)
        rows = batch.labels.shape if all_logits else (answers,)
        assert kept["shape"] == (*rows, backend.vocab_size)
        assert int(answer_positions(batch.labels).sum()) == answers
        assert loss.item() == pytest.approx(own.item(), rel=1e-6)
        scale = max(g.abs().max().item() for g in own_grads)
        assert max((a - b).abs().max().item() for a, b in zip(grads, own_grads, strict=True)) <= 1e-5 * scale


@pytest.mark.parametrize("name", ["tiny-internvl-student", "tiny-qwen25vl-student"])
def test_checkpoint_loads_back_with_plain_transformers(name, samples, tmp_path):
    backend = load_backend(name, LoadOptions(seed=3))
    backend.save(tmp_path)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(plain) is type(backend.model)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == len(backend.tokenizer)
    assert AutoImageProcessor.from_pretrained(tmp_path) is not None
    batch = backend.build_batch(samples[:2])
    backend.model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(backend.model(**batch.inputs).logits, plain(**batch.inputs).logits, atol=1e-5)
    again = load_backend(str(tmp_path))
    assert again.family == backend.family
    texts = again.generate(samples[:2], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_presets_are_seeded():
    a = load_backend("tiny-internvl-student", LoadOptions(seed=1))
    b = load_backend("tiny-internvl-student", LoadOptions(seed=1))
    c = load_backend("tiny-internvl-student", LoadOptions(seed=2))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.model.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_freeze_options():
    backend = load_backend("tiny-internvl-student", LoadOptions(freeze_vision=True, freeze_projector=True))
    frozen = {n for n, p in backend.model.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n or "multi_modal_projector" in n for n in frozen)
    assert any(p.requires_grad for n, p in backend.model.named_parameters() if "language_model" in n)


@pytest.mark.parametrize(
    ("name", "vision", "projector"),
    [
        ("tiny-internvl-student", "vision_tower.", "multi_modal_projector."),
        ("tiny-qwen25vl-student", "visual.blocks.", "visual.merger."),
    ],
)
def test_parameter_parts(name, vision, projector):
    backend = load_backend(name)
    parts = {n: backend.part_of(n) for n, _ in backend.model.named_parameters()}
    assert {parts[n] for n in parts if vision in n} == {"vision"}
    assert {parts[n] for n in parts if projector in n} == {"projector"}
    assert {parts[n] for n in parts if "language_model" in n or "lm_head" in n} == {"llm"}


def test_lora_wraps_language_model():
    backend = load_backend("tiny-internvl-student", LoadOptions(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_bad_model_paths(tmp_path):
    with pytest.raises(DriveKDError, match="no such model directory"):
        load_backend(str(tmp_path / "missing"))
    with pytest.raises(DriveKDError, match=r"no config\.json"):
        load_backend(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DriveKDError, match="not a supported VLM"):
        load_backend(str(tmp_path))


def test_shipped_tokenizer_keeps_every_digit_a_token():
    from drivekd.models.tokenizer import load_shipped_tokenizer, train_tokenizer

    tok = load_shipped_tokenizer()
    tag = "<c1,CAM_FRONT,0.5000,0.4727>"
    pieces = tok.convert_ids_to_tokens(tok(tag, add_special_tokens=False).input_ids)
    assert pieces[-12:] == [",", "0", ".", "5", "0", "0", "0", ",", "0", ".", "4", "7", "2", "7", ">"][-12:]
    assert tok.decode(tok(tag + " 16 m", add_special_tokens=False).input_ids) == tag + " 16 m"
    # a corpus full of one number still never merges its digits
    fresh = train_tokenizer(["0.4727 0.4727 speed 22.4"] * 50, vocab_size=300)
    assert all(len(t.lstrip("Ġ")) <= 1 or not any(c.isdigit() for c in t) for t in fresh.get_vocab())


def _tagged_sample(tmp_path, tag, *, square_at=None, cams=("CAM_FRONT", "CAM_BACK"), size=(224, 128)):
    from PIL import Image

    from drivekd.data.sample import ImageRef, Sample

    refs = []
    for cam in cams:
        img = Image.new("RGB", size)
        if square_at is not None and cam == square_at[0]:
            u, v = int(square_at[1] * size[0]), int(square_at[2] * size[1])
            img.paste((255, 255, 255), (u - 6, v - 6, u + 6, v + 6))
        path = tmp_path / f"{cam}-{len(list(tmp_path.iterdir()))}.png"
        img.save(path)
        refs.append(ImageRef(cam, str(path)))
    question = "".join(f"{cam}: <image>\n" for cam in cams) + f"What colour is object {tag}?"
    return Sample("t", "perception", "colour", refs, question, "Red.", "sc")


@pytest.mark.parametrize("name", ["tiny-internvl-student", "tiny-qwen25vl-student"])
@pytest.mark.parametrize("where", [("CAM_FRONT", 0.6, 0.4), ("CAM_BACK", 0.9, 0.1), ("CAM_BACK", 0.1, 0.9)])
def test_tag_mask_points_at_the_token_that_sees_the_tagged_spot(name, where, tmp_path):
    """Reference: paint a white square at the tag's spot; the visual token whose features change most
    must be the one the tag mask marks."""
    backend = load_backend(name)
    backend.model.eval()
    cam, x, y = where
    tag = f"<c1,{cam},{x:.4f},{y:.4f}>"
    plain, painted = _tagged_sample(tmp_path, tag), _tagged_sample(tmp_path, tag, square_at=where)
    batch = backend.build_batch([plain, painted])
    assert batch.tag_mask.sum(1).tolist() == [1, 1]
    assert torch.equal(batch.tag_mask[0], batch.tag_mask[1]) and bool((batch.tag_mask & batch.visual_mask).any())
    with torch.no_grad():
        embeds = backend.model.get_input_embeddings()(batch.inputs["input_ids"])
        features = backend.model.model.get_image_features(
            **{k: v for k, v in batch.inputs.items() if k in ("pixel_values", "image_grid_thw")}
        )
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    features = features.reshape(-1, embeds.shape[-1])
    per_sample = features.shape[0] // 2
    change = (features[per_sample:] - features[:per_sample]).norm(dim=-1)
    visual_positions = batch.visual_mask[1].nonzero().flatten()
    assert visual_positions[change.argmax()] == batch.tag_mask[1].nonzero().flatten()[0]


def test_tag_mask_reads_pixel_coordinates_and_skips_what_points_nowhere(tmp_path):
    backend = load_backend("tiny-internvl-student")
    fraction = _tagged_sample(tmp_path, "<c1,CAM_BACK,0.6000,0.4000>")
    pixels = _tagged_sample(tmp_path, "<c1,CAM_BACK,134.4,51.2>")  # the same spot of a 224x128 image
    two_tags = _tagged_sample(tmp_path, "<c1,CAM_BACK,0.6,0.4> or <c2,CAM_FRONT,0.2,0.5>")
    other_camera = _tagged_sample(tmp_path, "<c1,CAM_FRONT_LEFT,0.6,0.4>")
    batch = backend.build_batch([fraction, pixels, two_tags, other_camera])
    assert torch.equal(batch.tag_mask[0], batch.tag_mask[1]) and int(batch.tag_mask[0].sum()) == 1
    assert not batch.tag_mask[2:].any()
    # several tagged options: the object the answer picks (training batches only)
    options = dataclasses.replace(two_tags, answer="Final: {B. <c2,CAM_FRONT,0.2,0.5>}")
    answer_tag = _tagged_sample(tmp_path, "<c2,CAM_FRONT,0.2,0.5>")
    trained = backend.build_batch([options, answer_tag])
    assert int(trained.tag_mask[0].sum()) == 1 and torch.equal(trained.tag_mask[0], trained.tag_mask[1])
    assert not backend.build_batch([options], with_answers=False).tag_mask.any()
    left = backend.build_batch([fraction, two_tags], padding_side="left")
    assert int(left.tag_mask[0].sum()) == 1 and bool((left.tag_mask & left.visual_mask).sum() == 1)


def test_tag_attention_loss_is_the_eager_attention_mass(tmp_path):
    from drivekd.experimental.tag_attention import with_tag_attention
    from drivekd.models.backend import IGNORE_INDEX
    from drivekd.train.sft import cross_entropy

    backend = load_backend("tiny-internvl-student", LoadOptions(attn_implementation="eager"))
    backend.model.eval()
    samples = [
        _tagged_sample(tmp_path, "<c1,CAM_FRONT,0.3,0.6>"),
        _tagged_sample(tmp_path, "<c1,CAM_FRONT,0.3,0.6> or <c2,CAM_BACK,0.5,0.5>"),  # no single object
        _tagged_sample(tmp_path, "<c3,CAM_BACK,0.8,0.7>"),
    ]
    samples[2] = dataclasses.replace(samples[2], answer="Final: {B. Red.}\nObject: red sedan")
    batch = backend.build_batch(samples)
    losses = with_tag_attention(cross_entropy, backend, weight=0.5, layer=-2)(backend.model, batch)
    with torch.no_grad():
        out = backend.model(**batch.inputs, labels=batch.labels, output_attentions=True)
    maps = out.attentions[2][:, 0]  # layer -2 of 4, head 0
    expected = []
    final_span = backend.tokenizer("Final: {B. Red.}", add_special_tokens=False).input_ids
    for i in (0, 2):
        target = int(batch.tag_mask[i].nonzero())
        answer_start = int((batch.labels[i] != IGNORE_INDEX).nonzero()[0])
        # sample 0 ("Red."): every answer token; sample 2: only the tokens of `Final: {B. Red.}`
        last = answer_start + len(final_span) if i == 2 else int((batch.labels[i] != IGNORE_INDEX).nonzero()[-1]) + 1
        for q in range(answer_start - 1, last - 1):
            expected.append(-torch.log(maps[i, q, target]))
    assert torch.allclose(losses["ce"], out.loss, atol=1e-5)
    assert torch.allclose(losses["tag_attention"], 0.5 * torch.stack(expected).mean(), atol=1e-5)
