import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from drivekd.data.drivesim.generate import GenerateConfig, generate
from drivekd.data.formats import load_split, write_jsonl
from drivekd.data.general import QUESTION_TYPES, generate_general
from drivekd.distill.recipe import load_recipe
from drivekd.errors import DataError, DriveKDError
from drivekd.eval.prestudy.collection import analyse, collect, logit_lens
from drivekd.eval.prestudy.metrics import (
    BINS,
    adjacent_cosine,
    answer_targets,
    margin_bins,
    masked_mean,
    mean_pairwise_cosine,
    token_margins,
    tv_profile,
    vision_text_cosine,
)
from drivekd.eval.prestudy.rules import portable_index, recipe_of, recommend
from drivekd.eval.prestudy.run import run_prestudy, select_samples
from drivekd.models.loading import load_backend

from .conftest import run_cli

STUDENTS = ("tiny-internvl-student", "tiny-qwen25vl-student")


# ---- slow obvious references ----------------------------------------------------------------
def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def _mean_vec(rows):
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


def _case(seed=0):
    """3 samples, right-padded to 7 tokens; visual tokens at positions 1-2 of every sample."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 5, 6]
    valid = torch.tensor([[t < n for t in range(7)] for n in lengths])
    visual = torch.zeros(3, 7, dtype=torch.bool)
    visual[:, 1:3] = True
    hiddens = [torch.randn(3, 7, 4, generator=g) for _ in range(3)]
    return hiddens, valid, visual, lengths


def test_hidden_state_metrics_match_loops():
    hiddens, valid, visual, lengths = _case()
    adj = adjacent_cosine(hiddens, valid)
    assert adj.shape == (3, 2)
    for b, n in enumerate(lengths):
        for layer in range(2):
            ref = sum(_cos(hiddens[layer][b, t].tolist(), hiddens[layer + 1][b, t].tolist()) for t in range(n)) / n
            assert adj[b, layer].item() == pytest.approx(ref, abs=1e-5)
    h = hiddens[0]
    vt = vision_text_cosine(h, visual, valid)
    pooled = masked_mean(h, valid)
    for b, n in enumerate(lengths):
        vis = _mean_vec([h[b, t].tolist() for t in range(n) if visual[b, t]])
        txt = _mean_vec([h[b, t].tolist() for t in range(n) if not visual[b, t]])
        assert vt[b].item() == pytest.approx(_cos(vis, txt), abs=1e-5)
        assert pooled[b].tolist() == pytest.approx(_mean_vec([h[b, t].tolist() for t in range(n)]), abs=1e-5)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    pairs = [_cos(x[i].tolist(), x[j].tolist()) for i in range(4) for j in range(4) if i != j]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert math.isnan(mean_pairwise_cosine(x[:1]))


def test_tv_profile_matches_loops():
    _, valid, visual, lengths = _case()
    attn = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(2))
    prof = tv_profile(attn, visual, valid)
    assert prof.shape == (3, 2)
    for b, n in enumerate(lengths):
        rows = [i for i in range(n) if not visual[b, i]]
        cols = [j for j in range(n) if visual[b, j]]
        for k, j in enumerate(cols):
            ref = sum(attn[b, i, j].item() for i in rows) / len(rows)
            assert prof[b, k].item() == pytest.approx(ref, abs=1e-6)
    ragged = visual.clone()
    ragged[0, 3] = True
    with pytest.raises(DataError, match="same number of visual tokens"):
        tv_profile(attn, ragged, valid)


def test_margins_and_bins_match_loops():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    m = token_margins(probs.log(), torch.tensor([0, 2]), tau=1.0)
    assert m.tolist() == pytest.approx([0.2, -0.3], abs=1e-6)
    # tau = 2 takes square roots of the probabilities before renormalising
    root = probs[0].sqrt() / probs[0].sqrt().sum()
    m2 = token_margins(probs.log(), torch.tensor([1, 1]), tau=2.0)
    assert m2[0].item() == pytest.approx((root[1] - root[0]).item(), abs=1e-6)

    g = torch.Generator().manual_seed(3)
    labels = torch.full((2, 30), -100)
    labels[0, 5:8] = torch.tensor([4, 1, 2])  # 3 answer tokens
    labels[1, 8:28] = torch.randint(0, 6, (20,), generator=g)  # 20 answer tokens
    logits = torch.randn(2, 30, 6, generator=g)
    pos, targets, bins = answer_targets(labels)
    assert pos.tolist()[:3] == [[0, 4], [0, 5], [0, 6]]
    assert targets.tolist()[:3] == [4, 1, 2] and targets.tolist()[3:] == labels[1, 8:28].tolist()
    assert bins.tolist()[:3] == [0, 3, 6]
    assert bins.tolist()[3:] == [k // 2 for k in range(20)]
    sums, counts = margin_bins(logits, labels, tau=1.5)
    ref_sum, ref_count = [0.0] * BINS, [0] * BINS
    for b in range(2):
        answer = [t for t in range(1, 30) if labels[b, t] != -100]
        for k, t in enumerate(answer):
            p = [math.exp(z / 1.5) for z in logits[b, t - 1].tolist()]
            p = [v / sum(p) for v in p]
            y = labels[b, t].item()
            margin = p[y] - max(v for i, v in enumerate(p) if i != y)
            ref_sum[BINS * k // len(answer)] += margin
            ref_count[BINS * k // len(answer)] += 1
    assert counts.tolist() == ref_count
    assert sums.tolist() == pytest.approx(ref_sum, abs=1e-5)


# ---- rules -----------------------------------------------------------------------------------
def _paper_curves(L=28, flat=True, attention_lower=True):
    """The paper's Fig. 2 pattern: weakest vision-text at layer 0, adjacent cosine rising to a plateau
    then an outlier last transition, flat reasoning similarity, attention far less dispersed."""
    adj = [0.55 + 0.4 * (1 - math.exp(-i / 4)) + 0.001 * i for i in range(L - 2)] + [0.62, None]
    vt = [0.05] + [0.2 + 0.01 * i for i in range(1, L)]
    reasoning = [0.80 + (0.005 * math.sin(i) if flat else 0.01 * i) for i in range(L)]
    hid, att = [0.30] * L, [0.05] * L
    return {
        "adjacent_cosine": adj,
        "vision_text_cosine": vt,
        "intra_group_similarity": {"perception": [0.9] * L, "reasoning": reasoning, "planning": [0.9] * L},
        "dispersion": {"hidden": hid, "attention": att if attention_lower else [0.5] * L},
    }


def _recipe(rec):
    return {c: {k: v for k, v in e.items() if k in ("kind", "teacher_layer", "teacher_layers")} for c, e in rec.items()}


def test_rules_reproduce_the_paper_pattern():
    rec = recommend(_paper_curves(), 28)
    assert _recipe(rec) == {
        "perception": {"kind": "attn_tv", "teacher_layer": 0},
        "reasoning": {"kind": "attn_group", "teacher_layers": [0, -2]},
        "planning": {"kind": "attn_tv", "teacher_layer": -2},
    }
    assert rec["reasoning"]["resolved_layers"] == list(range(27))
    assert all(rec[c]["reason"] for c in rec)


def test_a_recipe_from_a_deeper_teacher_keeps_the_students_last_layer_free(tmp_path):
    # the shipped teacher (8 layers) with planning at its layer 3, the study's 4-layer student
    curves = _paper_curves(L=8)
    curves["adjacent_cosine"] = [0.5, 0.6, 0.99, 0.6, 0.6, 0.6, 0.7, None]
    rec = recommend(curves, 8)
    assert rec["planning"]["resolved_layers"] == [3]
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(recipe_of(rec)))
    recipe = load_recipe(str(file))
    assert recipe["perception"].pairs(4, 8) == [(0, [0])]
    assert recipe["planning"].pairs(4, 8) == [(1, [3])]  # same depth, not the student's layer 3
    assert recipe["reasoning"].pairs(4, 8) == [(0, [0, 1, 2]), (1, [1, 2, 3])]


def test_rules_alternatives():
    # non-flat reasoning: the single most similar layer in the range, full map
    rec = recommend(_paper_curves(flat=False), 28)
    assert _recipe(rec)["reasoning"] == {"kind": "attn_full", "teacher_layer": -2}
    # hidden states less dispersed than attention: hidden signals at the same layers
    rec = recommend(_paper_curves(attention_lower=False), 28)
    assert {c: e["kind"] for c, e in rec.items()} == {c: "hidden" for c in rec}
    assert _recipe(rec)["reasoning"] == {"kind": "hidden", "teacher_layers": [0, -2]}
    # the last transition is excluded even when it is the highest; the peak counts, not the tolerance band
    curves = _paper_curves(L=8)
    curves["adjacent_cosine"] = [0.5, 0.9, 0.7, 0.6, 0.6, 0.6, 0.99, None]
    assert recommend(curves, 8)["planning"]["resolved_layers"] == [2]
    # within the tolerance of the peak, the deepest transition wins
    curves["adjacent_cosine"] = [0.5, 0.9, 0.895, 0.6, 0.6, 0.6, 0.99, None]
    assert recommend(curves, 8)["planning"]["resolved_layers"] == [3]
    # perception looks only at the first half
    curves["vision_text_cosine"] = [0.3, 0.1, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0]
    assert recommend(curves, 8)["perception"]["teacher_layer"] == 1
    with pytest.raises(DriveKDError, match="at least 3"):
        recommend(_paper_curves(L=2), 2)
    assert [portable_index(i, 8) for i in range(8)] == [0, 1, 2, 3, -4, -3, -2, -1]


def test_select_samples_round_robin(driving_dir):
    samples = load_split(driving_dir, "train")
    picked = select_samples(samples, 6)
    assert [s.capability for s in picked] == ["perception", "reasoning", "planning"] * 2
    assert len(select_samples(samples, 10_000)) == len(samples)


# ---- the model side --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driving_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prestudy") / "drive"
    generate(out, GenerateConfig(scenes=4, seed=5))
    return out


@pytest.fixture(scope="module")
def general_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prestudy") / "general"
    generate_general(out, 6, seed=1)
    return out


@pytest.mark.parametrize("preset", STUDENTS)
def test_logit_lens_and_collect_are_batch_invariant(preset, driving_dir):
    backend = load_backend(preset)
    backend.model.eval()
    samples = select_samples(load_split(driving_dir, "val"), 4)
    batch = backend.build_batch(samples[:2])
    raw = {}
    last = backend.model.model.language_model.layers[-1]
    hook = last.register_forward_hook(lambda m, i, o: raw.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = backend.model(**batch.inputs)
        hook.remove()
        assert torch.allclose(logit_lens(backend)(raw["h"]), out.logits, atol=1e-5)
    one = analyse(collect(backend, samples, 1, 1.0), None)
    three = analyse(collect(backend, samples, 3, 1.0), None)  # right-padded batches of 3 and 1
    for key in ("adjacent_cosine", "vision_text_cosine"):
        assert one[key] == pytest.approx(three[key], abs=1e-4, nan_ok=True)
    for key in ("hidden", "attention"):
        assert one["dispersion"][key] == pytest.approx(three["dispersion"][key], abs=1e-4)
    assert one["margin"]["driving"]["mean"] == pytest.approx(three["margin"]["driving"]["mean"], abs=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("preset", STUDENTS)
def test_run_prestudy_writes_json_figure_and_recipe(preset, driving_dir, general_dir, tmp_path):
    with_general = preset.startswith("tiny-internvl")
    out = tmp_path / "study"
    result = run_prestudy(
        preset,
        driving_dir,
        out,
        general_dir=general_dir if with_general else None,
        max_samples=6,
        batch_size=3,
        tau=1.0,
    )
    L = result["num_layers"]
    assert L == 4
    on_disk = json.loads((out / "prestudy.json").read_text())
    assert on_disk["recommendation"] == result["recommendation"]
    assert set(on_disk["definitions"]) >= {"adjacent_cosine", "vision_text_cosine", "margin", "dispersion_hidden"}
    assert set(on_disk["rules"]) >= {"perception", "reasoning", "planning", "signal"}
    layers = on_disk["layers"]
    assert len(layers["adjacent_cosine"]) == L and layers["adjacent_cosine"][-1] is None
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in layers["adjacent_cosine"][:-1] + layers["vision_text_cosine"])
    assert len(layers["vision_text_cosine"]) == L
    assert all(len(v) == L for v in layers["intra_group_similarity"].values())
    assert all(len(v) == L and all(0 <= x <= 2 for x in v) for v in layers["dispersion"].values())
    drive = layers["margin"]["driving"]
    assert len(drive["by_bin"]) == L and all(len(row) == BINS for row in drive["by_bin"]) and len(drive["mean"]) == L
    assert all(-1 <= x <= 1 for row in drive["by_bin"] for x in row if x is not None)
    if with_general:
        assert len(layers["margin"]["general"]["by_bin"]) == L and on_disk["samples"]["general"] == 6
    else:
        assert layers["margin"]["general"] is None
    assert on_disk["samples"]["by_capability"] == {"perception": 2, "reasoning": 2, "planning": 2}
    recipe = load_recipe(str(out / "recipe.yaml"))
    assert set(recipe) == {"perception", "reasoning", "planning"}
    for name, signal in recipe.items():
        resolved = signal.teacher_indices(L)  # raises if out of range
        assert resolved == result["recommendation"][name]["resolved_layers"]
        # on a shallower student no chosen layer lands on its last one
        assert max(signal.student_indices(4, L)) < 3
    assert (out / "prestudy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.integration
def test_run_prestudy_input_errors(driving_dir, tmp_path):
    with pytest.raises(DriveKDError, match="max-samples"):
        run_prestudy("tiny-internvl-student", driving_dir, tmp_path / "o", max_samples=1)
    with pytest.raises(DataError, match=r"no nope\.jsonl"):
        run_prestudy("tiny-internvl-student", driving_dir, tmp_path / "o", split="nope")
    with pytest.raises(DataError, match="no such dataset folder"):
        run_prestudy("tiny-internvl-student", tmp_path / "missing", tmp_path / "o")
    few = tmp_path / "few"
    samples = load_split(driving_dir, "val")
    planning = [s for s in samples if s.capability == "planning"]
    write_jsonl([s for s in samples if s.capability != "planning"] + planning[:1], few / "val.jsonl")
    with pytest.raises(DataError, match="capability planning has 1 sample"):
        run_prestudy("tiny-internvl-student", few, tmp_path / "o")
    with pytest.raises(DriveKDError, match="tau"):
        run_prestudy("tiny-internvl-student", driving_dir, tmp_path / "o", tau=0.0)
    assert not (tmp_path / "o").exists()


# ---- the general control set -----------------------------------------------------------------
def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_general_set_is_deterministic_and_loads(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = generate_general(a, 9, seed=3)
    generate_general(b, 9, seed=3)
    generate_general(c, 9, seed=4)
    assert _tree(a) == _tree(b)
    assert _tree(a) != _tree(c)
    assert info["by_question_type"] == {t: 3 for t in QUESTION_TYPES}
    samples = load_split(a, "test")
    assert len(samples) == 9 and len(_tree(a)) == 1 + 18
    from PIL import Image

    for s in samples:
        assert s.capability == "perception" and s.question_type in QUESTION_TYPES
        assert s.question.startswith("IMAGE_A: <image>\nIMAGE_B: <image>\n")
        assert [im.camera for im in s.images] == ["IMAGE_A", "IMAGE_B"]
        for im in s.images:
            with Image.open(im.path) as img:
                assert img.size == (224, 128) and img.format == "PNG"
        assert "Final: {" in s.answer
        if s.choices is not None:
            assert s.choices[s.correct_choice].lower() == s.facts["label"] + "."
            assert f"{{{s.correct_choice}. {s.choices[s.correct_choice]}}}" in s.answer
        else:
            assert s.answer.endswith(f"Final: {{{s.facts['count']}}}")
    with pytest.raises(DataError, match="already exists"):
        generate_general(a, 3, seed=0)
    generate_general(a, 3, seed=0, overwrite=True)
    assert len(load_split(a, "test")) == 3
    with pytest.raises(DriveKDError, match="--samples"):
        generate_general(tmp_path / "d", 0)


def test_general_answers_follow_from_the_drawn_shapes(tmp_path):
    """Re-derive every answer from the shapes stored in facts, and check those shapes are in the pixels."""
    from PIL import Image

    from drivekd.data.general import COLOURS

    generate_general(tmp_path / "g", 15, seed=7)
    for s in load_split(tmp_path / "g", "test"):
        for im in s.images:
            with Image.open(im.path) as img:
                for _kind, colour, x, y, _size in s.facts["shapes"][im.camera]:
                    assert img.getpixel((x, y)) == COLOURS[colour]
        shapes = s.facts["shapes"][s.facts["image"]]
        assert [sh[2] for sh in shapes] == sorted(sh[2] for sh in shapes)
        assert len({sh[1] for sh in shapes}) == len(shapes)  # distinct colours per image
        if s.question_type == "general_colour":
            (match,) = [sh for sh in shapes if sh[0] == s.facts["shape"]]
            assert match[1] == s.facts["label"] and f"the {match[0]} in {s.facts['image']}" in s.question
        elif s.question_type == "general_count":
            assert s.facts["count"] == sum(sh[0] == s.facts["shape"] for sh in shapes)
        else:
            k = [sh[1] for sh in shapes].index(s.facts["colour"])
            assert k >= 1 and shapes[k - 1][0] == s.facts["label"]


# ---- CLI -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_general_and_error_paths(tmp_path, driving_dir):
    ok = run_cli("data", "general", "--out", str(tmp_path / "g"), "--samples", "3", "--seed", "1")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 3 general samples" in ok.stdout

    def study(model="tiny-internvl-student", data=driving_dir, *extra):
        return ("prestudy", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), *extra)

    cases = [
        (("data", "general", "--out", str(tmp_path / "g"), "--samples", "3"), "already exists"),
        (("data", "general", "--out", str(tmp_path / "h"), "--samples", "0"), "--samples"),
        (study("tiny-internvl-student", driving_dir, "--max-samples", "1"), "--max-samples"),
        (study(tmp_path / "no-model"), "no-model"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()
