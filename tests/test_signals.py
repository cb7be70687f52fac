import hashlib
import json
from fractions import Fraction

import pytest
import torch

from drivekd.distill.recipe import load_recipe
from drivekd.distill.signals import (
    Internals,
    Positions,
    group_windows,
    make_signal,
    map_distance,
    same_depth,
)
from drivekd.models.capture import text_rows


def test_group_windows_paper_example():
    windows = group_windows(list(range(23)), list(range(27)))  # 24-layer student, 28-layer teacher, 0..-2
    assert len(windows[0][1]) == 5
    assert windows[0] == (0, [0, 1, 2, 3, 4])
    assert windows[-1] == (22, [22, 23, 24, 25, 26])
    assert group_windows([0, 1, 2], [0, 1, 2]) == [(0, [0]), (1, [1]), (2, [2])]  # equal depth: one to one
    # deeper student than teacher: g = 1, starts clipped to the last teacher layer
    assert group_windows([0, 1, 2, 3], [0, 1]) == [(0, [0]), (1, [1]), (2, [1]), (3, [1])]


def test_signal_layers_resolve_negative_indices():
    assert make_signal("attn_tv", layer=-2).student_indices(24, 28) == [22]
    assert make_signal("attn_tv", layer=-2).teacher_indices(28) == [26]
    assert make_signal("attn_group", layers=(0, -2)).student_indices(4, 8) == [0, 1, 2]
    assert make_signal("attn_group", layers=(0, -2)).teacher_indices(8) == list(range(7))


def _slow_same_depth(layer, num_from, num_to):
    """By enumeration: the student layer whose depth, as a fraction of the layers before the last, is
    nearest the teacher layer's (ties to the deeper one); the last layers match each other."""
    if layer == num_from - 1:
        return num_to - 1
    if num_from <= 2 or num_to <= 2:
        return 0
    want = Fraction(layer, num_from - 2)
    return min(range(num_to - 1), key=lambda s: (abs(Fraction(s, num_to - 2) - want), -s))


def test_same_depth_against_enumeration():
    for num_from in range(1, 30):
        for num_to in range(1, 30):
            for layer in range(num_from):
                got = same_depth(layer, num_from, num_to)
                assert got == _slow_same_depth(layer, num_from, num_to), (layer, num_from, num_to)
                assert 0 <= got < num_to
                if layer < num_from - 1 and num_to > 1:
                    assert got < num_to - 1  # never the student's last layer
    # the tiny teacher (8 layers) to the tiny student (4): the pre-study's first-half layers stay off the last
    assert [same_depth(t, 8, 4) for t in range(8)] == [0, 0, 1, 1, 1, 2, 2, 3]
    # InternVL3-8B (28) to InternVL3-1B (24): the penultimate to the penultimate
    assert same_depth(26, 28, 24) == 22


def test_teacher_layers_match_the_student_by_depth():
    planning = make_signal("attn_tv", teacher_layer=3)
    assert planning.teacher_indices(8) == [3]
    assert planning.student_indices(4, 8) == [1]
    assert planning.pairs(4, 8) == [(1, [3])]
    assert planning.named_layers("student") is None and planning.named_layers("teacher") == (3,)
    group = make_signal("attn_group", teacher_layers=(0, 3))
    # student 0..1 (k=2) <- teacher 0..3 (m=4): windows of g = 3
    assert group.pairs(4, 8) == [(0, [0, 1, 2]), (1, [1, 2, 3])]
    # named on both sides: each side as given
    pinned = make_signal("attn_tv", layer=-1, teacher_layer=3)
    assert pinned.pairs(4, 8) == [(3, [3])]
    assert make_signal("attn_tv", teacher_layer=-2).pairs(24, 28) == [(22, [26])]
    # bound to both depths, a signal says what it reads (a cache's fingerprint is made of this)
    assert planning.bind("s", 4, 8).identity() == {"kind": "attn_tv", "pairs": [[1, [3]]], "reads": "text_rows"}
    assert group.bind("s", 4, 8).identity()["pairs"] == [[0, [0, 1, 2]], [1, [1, 2, 3]]]
    assert group.bind("s", 2, 8).identity()["pairs"] == [[0, [0, 1, 2, 3]]]  # another student depth, other targets
    paper = make_signal("attn_group", layers=(0, -2))
    assert paper.bind("s", 2, 8).identity() != paper.bind("s", 4, 8).identity()
    with pytest.raises(ValueError, match="layer or layers"):
        make_signal("attn_tv", layer=0, layers=(0, 1))


def _slow_tv(student, teacher, valid, visual):
    out = []
    for b in range(student.shape[0]):
        num, den = 0.0, 0
        for i in range(student.shape[1]):
            for j in range(student.shape[2]):
                if valid[b, i] and valid[b, j] and not visual[b, i] and visual[b, j]:
                    num += float(student[b, i, j] - teacher[b, i, j]) ** 2
                    den += 1
        out.append(num / max(den, 1))
    return torch.tensor(out, dtype=torch.float64)


def test_tv_block_mse_against_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(2, 7, 7, generator=g, dtype=torch.float64), torch.rand(2, 7, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    visual = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pos = Positions(valid, visual, torch.zeros_like(valid))
    got = map_distance(s, t, pos.pair_mask("tv"), "mse")
    assert torch.allclose(got, _slow_tv(s, t, valid, visual))
    full = map_distance(s, t, pos.pair_mask("full"), "mse")
    assert torch.allclose(full[1], ((s[1, :5, :5] - t[1, :5, :5]) ** 2).mean())
    assert torch.allclose(
        map_distance(s, s, pos.pair_mask("tv"), "cosine"), torch.zeros(2, dtype=torch.float64), atol=1e-12
    )


def test_group_loss_uses_window_means():
    g = torch.Generator().manual_seed(1)
    smaps = {i: torch.rand(1, 4, 4, generator=g) for i in range(3)}
    tmaps = {i: torch.rand(1, 4, 4, generator=g) for i in range(7)}
    pos = Positions(
        torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)
    )
    sig = make_signal("attn_group", layers=(0, -2))
    windows = group_windows(sig.student_indices(4, 8), sig.teacher_indices(8))
    got = sig.loss(
        Internals(smaps), [torch.stack([tmaps[t] for t in w]).mean(0) for _, w in windows], pos, [s for s, _ in windows]
    )
    # student 0..2 (k=3) <- teacher 0..6 (m=7): g = 5
    want = torch.stack(
        [((smaps[i] - torch.stack([tmaps[j] for j in range(i, i + 5)]).mean(0)) ** 2).mean() for i in range(3)]
    ).mean()
    assert torch.allclose(got, want.reshape(1))


def test_tv_signal_on_text_rows_equals_the_block_mse_of_whole_maps():
    g = torch.Generator().manual_seed(2)
    s, t = torch.rand(2, 7, 7, generator=g, dtype=torch.float64), torch.rand(2, 7, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    visual = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    index, row_valid = text_rows(valid.long(), visual)
    pos = Positions(valid, visual, torch.zeros_like(valid), row_valid)
    sig = make_signal("attn_tv", layer=0)
    teacher = Internals({0: t}, row_index=index)
    targets = sig.targets(teacher, 1, 1)
    assert targets[0].shape == (2, 5, 7)  # the most text rows of the batch (sample 0: 5) x positions
    got = sig.loss(Internals({0: s}, row_index=index), targets, pos, [0])
    assert torch.allclose(got, _slow_tv(s, t, valid, visual))
    # the student's rows captured as rows give the same loss
    rows_only = Internals({}, rows={0: Internals({0: s}, row_index=index).text_rows(0)}, row_index=index)
    assert torch.allclose(sig.loss(rows_only, targets, pos, [0]), got)


def test_tv_cache_keeps_the_block_and_restores_the_rows():
    g = torch.Generator().manual_seed(3)
    full = torch.rand(6, 6, generator=g)
    visual = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    index, _ = text_rows(torch.ones(1, 6, dtype=torch.long), visual[None])
    rows = full[index[0]]  # (3 text rows, 6)
    padded = torch.cat([rows, torch.rand(2, 6, generator=g)])  # a batch's padding rows after them
    sig = make_signal("attn_tv", layer=0)
    stored = sig.stored(padded, 6, visual)
    assert stored.shape == (3, 3) and stored.numel() == sig.stored_elements(6, 3, 0, 0)
    assert torch.equal(stored, full[~visual][:, visual])
    restored = sig.restored(stored, visual)
    assert torch.equal(restored[:, visual], stored) and restored[:, ~visual].abs().sum() == 0


# Computed before attn_full and attn_group became one class (AttnMaps): what caches and run.json
# identify a signal by must not change with it.
PINNED = {
    ("attn_full", (("layer", 1), ("capability", "perception"))): (
        {"kind": "attn_full", "pairs": [[1, [1]]], "reads": "maps"},
        {"kind": "attn_full", "layer": 1, "capability": "perception"},
        ("full", "5698f1c8cf1ada64"),
    ),
    ("attn_full", (("layers", (0, 2)), ("teacher_layers", (0, 6)), ("capability", "reasoning"))): (
        {
            "kind": "attn_full",
            "pairs": [[0, [0, 1, 2, 3, 4]], [1, [1, 2, 3, 4, 5]], [2, [2, 3, 4, 5, 6]]],
            "reads": "maps",
        },
        {"kind": "attn_full", "layers": [0, 2], "teacher_layers": [0, 6], "capability": "reasoning"},
        ("full_range", "4febc67996c8769b"),
    ),
    ("attn_group", (("layers", (0, -2)), ("capability", "planning"))): (
        {
            "kind": "attn_group",
            "pairs": [[0, [0, 1, 2, 3, 4]], [1, [1, 2, 3, 4, 5]], [2, [2, 3, 4, 5, 6]]],
            "reads": "maps",
        },
        {"kind": "attn_group", "layers": [0, -2], "capability": "planning"},
        ("group", "ad1481cc200e142c"),
    ),
    ("attn_group", (("layer", 1), ("capability", "planning"))): (
        {"kind": "attn_group", "pairs": [[1, [1]]], "reads": "maps"},
        {"kind": "attn_group", "layer": 1, "capability": "planning"},
        ("group_one", "97fd9a104813d861"),
    ),
    ("attn_group", (("teacher_layers", (0, 3)), ("capability", "all"), ("distance", "cosine"), ("share", 0.2))): (
        {"kind": "attn_group", "pairs": [[0, [0, 1, 2]], [1, [1, 2, 3]]], "reads": "maps"},
        {"kind": "attn_group", "teacher_layers": [0, 3], "distance": "cosine", "share": 0.2, "capability": "all"},
        ("group_teacher", "9fee8704c22b3d7d"),
    ),
}


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize(("kind", "fields"), list(PINNED), ids=[f"{k}-{i}" for i, (k, _) in enumerate(PINNED)])
def test_attn_full_and_attn_group_keep_their_identities(tmp_path, kind, fields):
    identity, entry, (name, digest) = PINNED[kind, fields]
    sig = make_signal(kind, **dict(fields))
    bound = sig.bind(name, 4, 8)
    assert bound.identity() == identity and sig.kind == kind
    assert _digest({name: bound.identity()}) == digest  # the cache fingerprint's recipe part hashes this
    assert sig.recipe_entry() == entry and list(sig.recipe_entry()) == list(entry)
    (tmp_path / "r.yaml").write_text(json.dumps({name: entry}))  # the round trip, through a recipe file
    assert load_recipe(str(tmp_path / "r.yaml")) == {name: sig}


def test_attn_full_and_attn_group_are_one_signal_under_two_names():
    full, group = make_signal("attn_full", layers=(0, -2)), make_signal("attn_group", layers=(0, -2))
    assert type(full) is type(group) and full != group  # one class; each keeps the name it was given
    assert full.bind("s", 4, 8).pairs == group.bind("s", 4, 8).pairs
    g = torch.Generator().manual_seed(4)
    smaps = {i: torch.rand(1, 4, 4, generator=g) for i in range(3)}
    targets = [torch.rand(1, 4, 4, generator=g) for _ in range(3)]
    pos = Positions(
        torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)
    )
    assert torch.equal(
        full.loss(Internals(smaps), targets, pos, [0, 1, 2]), group.loss(Internals(smaps), targets, pos, [0, 1, 2])
    )
    # the shipped recipes' cache identities
    bound = {n: s.bind(n, 4, 8) for n, s in load_recipe("drive-kd").items()}
    assert _digest({n: b.identity() for n, b in bound.items()}) == "4534ba6bc95c9274"
