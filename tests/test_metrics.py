import math
import random
from collections import Counter

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from drivekd.eval.metrics import (
    cider_d,
    cider_tokenize,
    corpus_bleu,
    corpus_rouge_l,
    rouge_l,
    rouge_tokenize,
    sentence_bleu,
    tokenize_13a,
)
from drivekd.eval.parsing import parse_choice

NASTY = [
    "",
    " ",
    "A",
    "Final: {C. Turn right.}",
    "The car is 20-50 m ahead, at 24.1 m/s (1 s ago: 22.9 m/s).",
    "e.g. 1,000.5 cars & trucks; x-y, &amp; &quot;hi&quot; <skipped> end -\nline",
    "LANE_LEFT, IDLE and FASTER...",
    "Ünïcödé straße — “quotes” 'single' `tick` {brace} [bracket] ~tilde~ ^caret^ |pipe| \\back\\",
    "trailing spaces   \t",
    "a.b.c. 3.14. 5,6 ,x .y",
]

CORPORA = [
    (
        ["The vehicle ahead is braking, so slow down.", "Keep going at the same speed.", "Turn left now."],
        [
            "The vehicle ahead is braking; slow down gently.",
            "Keep going at the same speed.",
            "Change to the right lane.",
        ],
    ),
    (["short", "a b"], ["a much longer reference sentence here", "a b c d e f"]),  # brevity penalty
    (["completely different words"], ["nothing shared at all"]),  # zero matches
    (["", "Final: {IDLE, SLOWER}"], ["Final: {IDLE}", "Final: {IDLE, SLOWER}"]),  # empty hypothesis
    (["x-y 3.5, 20-50 m & more (e.g. this)."], ["x-y 3.5 , 20 - 50 m &amp; more ( e.g. this ) ."]),
]


@pytest.mark.parametrize("line", NASTY)
def test_13a_tokenisation_matches_sacrebleu(line):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    assert tokenize_13a(line) == Tokenizer13a()(line.rstrip()).split()


@pytest.mark.parametrize(("hyps", "refs"), CORPORA)
def test_corpus_bleu_matches_sacrebleu(hyps, refs):
    ours = corpus_bleu(hyps, [[r] for r in refs])
    theirs = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert ours == pytest.approx(theirs, abs=1e-9, rel=1e-9)


def test_corpus_bleu_multiple_references_and_random_corpora():
    hyps = ["the car ahead brakes hard", "go left", "keep lane and speed"]
    refs_a = ["the car ahead is braking hard", "go to the left lane", "keep the lane and the speed"]
    refs_b = ["a car in front brakes hard", "turn left", "keep lane and speed"]
    ours = corpus_bleu(hyps, [list(pair) for pair in zip(refs_a, refs_b, strict=True)])
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs_a, refs_b]).score, rel=1e-9)

    rng = random.Random(7)
    words = "the a car truck ahead left right lane is in 20-50 m 3.5 , . & ( ) SLOWER don't".split()
    for _ in range(60):
        n = rng.randint(1, 5)
        hyps = [" ".join(rng.choices(words, k=rng.randint(0, 14))) for _ in range(n)]
        refs = [" ".join(rng.choices(words, k=rng.randint(1, 14))) for _ in range(n)]
        assert corpus_bleu(hyps, [[r] for r in refs]) == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9
        )
        assert sentence_bleu(hyps[0], [refs[0]]) == pytest.approx(
            sacrebleu.sentence_bleu(hyps[0], [refs[0]]).score, abs=1e-9
        )


def test_bleu_known_values():
    assert corpus_bleu(["the car ahead is braking"], [["the car ahead is braking"]]) == pytest.approx(100.0)
    assert corpus_bleu(["red"], [["blue"]]) == 0.0
    assert corpus_bleu([], []) == 0.0
    # 4 of 4 unigrams, 2/3 bigrams, 1/2 trigrams, 0/1 4-grams (exp smoothing: 1/(2*1)); hyp 4 vs ref 5 tokens.
    expected = math.exp(1 - 5 / 4) * math.exp((math.log(1) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert corpus_bleu(["a b c e"], [["a b c d e"]]) == pytest.approx(100 * expected, rel=1e-12)
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


PAIRS = [
    ("The vehicle ahead is braking, so slow down.", "The vehicle ahead is braking; slow down gently."),
    ("Keep going at the same speed.", "keep going at THE same speed!"),
    ("LANE_LEFT, IDLE", "Final: {IDLE, LANE_LEFT}"),
    ("", "something"),
    ("!!!", "???"),
    ("Ünïcödé straße 24.1 m/s", "unicode strasse 24 1 m s"),
    ("a b a b a b c", "b a b c c a"),
]


@pytest.mark.parametrize(("pred", "ref"), PAIRS)
def test_rouge_l_matches_rouge_score(pred, ref):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, rel=1e-9, abs=1e-12)


def test_rouge_tokeniser_and_corpus_mean():
    assert rouge_tokenize("LANE_LEFT, 24.1 m/s!") == ["lane", "left", "24", "1", "m", "s"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)
    assert corpus_rouge_l(preds, refs) == pytest.approx(expected, rel=1e-9)
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a b", "c d") == 0.0


def slow_cider(cands, refs):
    """CIDEr-D written straight from the coco-caption definition, one n-gram order at a time."""
    n_docs = len(refs)

    def grams(s, n):
        w = s.split()
        return Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))

    df = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, 5) for g in grams(r, n)})

    def tfidf(s, n):
        return {g: c * (math.log(n_docs) - math.log(max(1, df[g]))) for g, c in grams(s, n).items()}

    out = []
    for c, rs in zip(cands, refs, strict=True):
        total = 0.0
        for r in rs:
            penalty = math.exp(-((sum(grams(c, 2).values()) - sum(grams(r, 2).values())) ** 2) / (2 * 6.0**2))
            for n in range(1, 5):
                vc, vr = tfidf(c, n), tfidf(r, n)
                nc, nr = math.sqrt(sum(v * v for v in vc.values())), math.sqrt(sum(v * v for v in vr.values()))
                if nc and nr:
                    total += sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items()) / (nc * nr) * penalty
        out.append(10 * total / 4 / len(rs))
    return out


def test_cider_hand_computed_cases():
    # Identical candidate and reference, n-grams found in no other reference: cosine 1 at every order.
    mean, scores = cider_d(
        ["the red car brakes", "a truck turns left"], [["the red car brakes"], ["a truck turns left"]]
    )
    assert scores == pytest.approx([10.0, 10.0]) and mean == pytest.approx(10.0)
    # Nothing shared with the reference: 0.
    assert cider_d(["blue van", "go"], [["red car", "stop now"], ["wait here"]])[1] == [0.0, 0.0]
    # One document: every reference n-gram has idf log(1) - log(1) = 0, so CIDEr is 0 even for a perfect answer.
    assert cider_d(["the red car brakes"], [["the red car brakes"]]) == (0.0, [0.0])
    # "x y" against "x y z" (other document "p q"), idf = log 2 for all: unigram cosine 2/sqrt(6), bigram
    # 1/sqrt(2), no trigrams; length in bigrams 1 vs 2 gives the penalty exp(-1/72).
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d(["x y", "p q"], [["x y z"], ["p q"]])[1][0] == pytest.approx(expected, rel=1e-12)
    # Clipping: repeating a matched word does not raise the score above the un-repeated one.
    once = cider_d(["car", "z"], [["car"], ["z w"]])[1][0]
    thrice = cider_d(["car car car", "z"], [["car"], ["z w"]])[1][0]
    assert thrice < once


def test_cider_matches_slow_reference_on_random_corpora():
    rng = random.Random(3)
    words = "car truck van left right lane ahead brakes slow fast the a in is".split()
    for _ in range(20):
        n = rng.randint(2, 6)
        cands = [" ".join(rng.choices(words, k=rng.randint(0, 10))) for _ in range(n)]
        refs = [
            [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(rng.randint(1, 3))] for _ in range(n)
        ]
        mean, scores = cider_d(cands, refs)
        assert scores == pytest.approx(slow_cider(cands, refs), rel=1e-9, abs=1e-12)
        assert mean == pytest.approx(sum(scores) / n)


def test_cider_tokeniser_drops_punctuation_and_case():
    assert cider_tokenize("The car, at 24.1 m/s: LANE_LEFT! don't 20-50") == [
        "the", "car", "at", "24.1", "m", "s", "lane_left", "don't", "20-50"
    ]  # fmt: skip


def test_metrics_never_raise_on_nasty_text():
    for text in NASTY:
        sentence_bleu(text, [text, "x"])
        rouge_l(text, "x")
        cider_d([text, "y"], [[text], ["x"]])
        parse_choice(text, {"A": "x", "B": "y"})
