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
