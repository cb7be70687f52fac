"""Language metrics in pure Python: BLEU-4 (sacrebleu's defaults), ROUGE-L (rouge-score), CIDEr-D (coco-caption).

Each metric keeps the tokenisation of the implementation it reproduces, so numbers are comparable
with papers that used those tools: BLEU uses mteval-v13a tokenisation and keeps case, ROUGE-L
lowercases and keeps only [a-z0-9] runs, CIDEr lowercases and drops punctuation (coco-caption runs
the Java PTBTokenizer first; ours is a regex approximation of it, see `cider_tokenize`).

The DriveLM challenge scores with coco-caption itself (BLEU-1..4, ROUGE-L, CIDEr-D on PTB tokens).
`ptb_tokenize`, `coco_bleu`, `coco_rouge_l` and `cider_d_tokens` are its Java-free counterparts: the
three scorers give coco-caption's numbers to rounding on the same tokens (tested against pycocoevalcap),
and `ptb_tokenize` approximates Stanford's PTBTokenizer as coco-caption runs it (lowercased, its
punctuation list removed), so the only gap left without Java is where the tokenisation differs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_ORDER = 4
CIDER_SIGMA = 6.0

# mteval-v13a, in the order the reference script applies them.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and ASCII punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)
_ROUGE_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CIDER_WORD = re.compile(r"\w+(?:[.'\-]\w+)*")

# coco-caption drops these tokens after PTB tokenisation. The bracket names never match: the tokenizer
# runs with -lowerCase, so `(` comes out as `-lrb-` and stays, as it does in the challenge's numbers.
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB splits these words into two tokens ("gonna" -> "gon na").
_PTB_SPLIT_WORDS = {"gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
# A lone letter with a period ("A. Going ahead") stays one token unless a word that usually starts a
# sentence follows, then the period ends the sentence ("plan B. The car" -> "b"): as Stanford's lexer does.
_SENTENCE_STARTERS = frozenset(
    "a an and but he i if in it its she so that the then there these they this we what when you".split()
)
_PTB_TOKEN = re.compile(
    r"""
    (?P<initials>(?:[A-Za-z]\.){2,})                       # U.S. e.g. p.m. keep their periods
    | (?P<letter>[A-Za-z]\.)(?=\s+(?P<next>\w+)|\s*$)      # a lone letter with a period, decided below
    | (?P<number>[-+]?\d*(?:[.,:]\d+)+(?:/\d+)?|[-+]?\d+/\d+|[-+]\d+)  # 24.1  3,000  ,812.5,505.0 (after a tag's camera)  1/2
    | (?P<negation>n't)(?![A-Za-z])
    | (?P<clitic>'(?:s|re|ve|ll|d|m))(?![A-Za-z])
    | (?P<abbrev>(?:mr|mrs|ms|dr|st|fig|cf|etc|vs|ave|rd|jr|sr|inc|corp|ltd|jan|feb|aug|sept|oct|nov|dec)\.)
    | (?P<word>@?\w+(?:[-./]\w+)*)                          # cam_front  e-mail  m/s  world.next
    | (?P<dots>\.\.\.|--)
    | (?P<other>\S)
    """,
    re.VERBOSE | re.IGNORECASE,
)


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenisation as sacrebleu applies it (after stripping trailing whitespace)."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _closest_ref_len(hyp_len: int, ref_lens: Sequence[int]) -> int:
    # Ties go to the shorter reference, as in sacrebleu.
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def bleu_stats(hypothesis: str, references: Sequence[str]) -> list[int]:
    """BLEU's sufficient statistics of one segment: [hyp_len, ref_len, correct_1..4, total_1..4].

    Summed over segments they give corpus BLEU (`bleu_from_stats`).
    """
    hyp = tokenize_13a(hypothesis)
    hyp_counts = _ngrams(hyp, MAX_ORDER)
    ref_max: Counter[tuple[str, ...]] = Counter()
    ref_lens = []
    for ref in references:
        tokens = tokenize_13a(ref)
        ref_lens.append(len(tokens))
        for gram, count in _ngrams(tokens, MAX_ORDER).items():
            ref_max[gram] = max(ref_max[gram], count)
    correct = [0] * MAX_ORDER
    total = [0] * MAX_ORDER
    for gram, count in hyp_counts.items():
        total[len(gram) - 1] += count
        correct[len(gram) - 1] += min(count, ref_max.get(gram, 0))
    return [len(hyp), _closest_ref_len(len(hyp), ref_lens), *correct, *total]


def bleu_from_stats(stats: Sequence[int], effective_order: bool = False) -> float:
    """BLEU-4 (0-100) from (summed) `bleu_stats`; `effective_order` as sacrebleu's sentence BLEU."""
    hyp_len, ref_len = stats[0], stats[1]
    correct, total = stats[2 : 2 + MAX_ORDER], stats[2 + MAX_ORDER :]
    if not any(correct):
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    # 'exp' smoothing (NIST / mteval-v13a): each zero-match order gets 1 / (2^k * total).
    log_sum, orders, smooth = 0.0, MAX_ORDER, 1.0
    for n in range(MAX_ORDER):
        if total[n] == 0:
            if effective_order:
                orders = n
            else:
                return 0.0  # an order with no n-grams at all has precision 0 -> BLEU 0
            break
        if correct[n] == 0:
            smooth *= 2
            precision = 100.0 / (smooth * total[n])
        else:
            precision = 100.0 * correct[n] / total[n]
        log_sum += math.log(precision)
    return bp * math.exp(log_sum / orders)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0-100) as sacrebleu's `corpus_bleu` defaults: 13a, cased, exp smoothing, brevity penalty.

    `references[i]` is the list of references of `hypotheses[i]` (sacrebleu takes them transposed).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return 0.0
    sums = [0] * (2 + 2 * MAX_ORDER)
    for hyp, refs in zip(hypotheses, references, strict=True):
        sums = [a + b for a, b in zip(sums, bleu_stats(hyp, refs), strict=True)]
    return bleu_from_stats(sums, effective_order=False)


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """Sentence BLEU-4 (0-100) as sacrebleu's `sentence_bleu`: as corpus BLEU but with effective order."""
    return bleu_from_stats(bleu_stats(hypothesis, references), effective_order=True)


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokeniser without stemming: lowercase, runs of [a-z0-9]."""
    return _ROUGE_NON_ALNUM.sub(" ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) of one pair, as `RougeScorer(['rougeL']).score(reference, prediction)`."""
    pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence ROUGE-L F-measure (0-1), the usual corpus figure (DriveLM, coco-caption)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    return sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


def cider_tokenize(text: str) -> list[str]:
    """Lowercase words with punctuation dropped; numbers like 24.1 and words like lane_left stay whole."""
    return _CIDER_WORD.findall(text.lower())


def ptb_tokenize(text: str) -> list[str]:
    """Stanford PTBTokenizer as coco-caption runs it (-lowerCase, then `COCO_PUNCTUATION` dropped), in regex.

    Covers what driving answers contain: object tags (`<c1,CAM_FRONT,812.5,505.0>` -> `< c1 cam_front
    ,812.5,505.0 >`), clitics (`vehicle's` -> `vehicle 's`, `isn't` -> `is n't`), numbers with `.,:/`,
    hyphenated words, brackets as `-lrb-`-style names, common abbreviations (`Mr.`, `St.`, `Fig.`, `etc.`)
    keeping their period. Not covered: the rest of PTB's abbreviation list (`approx.` happens to lose
    its period in PTB too), its SGML and URL rules; tests/test_drivelm_score.py measures what is left.
    """
    text = re.sub(r"(\w)(n't)(?![A-Za-z])", r"\1 \2", text, flags=re.IGNORECASE)
    tokens: list[str] = []
    for match in _PTB_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if match.group("letter") is not None:
            kind = "letter"
            token = match.group("letter")
            following = match.group("next")
            # A period that ends the sentence is dropped, unless the letter is the whole text ("B." stays "b.").
            ends = (following is None and bool(tokens)) or (
                following is not None and following.lower() in _SENTENCE_STARTERS
            )
            if ends:
                tokens.append(token[0])
                continue
        elif kind == "word" and token.lower() in _PTB_SPLIT_WORDS:
            tokens.extend(_PTB_SPLIT_WORDS[token.lower()])
            continue
        elif kind == "other":
            token = _PTB_BRACKETS.get(token, token)
            if token in ('"', "\u201c", "\u201d"):
                continue  # PTB turns quotes into `` and '', both dropped
        tokens.append(token)
    return [t for t in (t.lower() for t in tokens) if t not in COCO_PUNCTUATION]


def coco_bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> list[float]:
    """Corpus BLEU-1..4 (0-1) as coco-caption's BleuScorer: tokens as given, clipped counts, the reference
    length closest to each candidate (ties to the shorter), no smoothing but its 1e-15 / 1e-9 guards."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    tiny, small = 1e-15, 1e-9
    test_len = ref_len = 0
    guess = [0] * MAX_ORDER
    correct = [0] * MAX_ORDER
    for cand, refs in zip(candidates, references, strict=True):
        ref_max: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            for gram, count in _ngrams(ref, MAX_ORDER).items():
                ref_max[gram] = max(ref_max[gram], count)
        test_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for k in range(MAX_ORDER):
            guess[k] += max(0, len(cand) - k)
        for gram, count in _ngrams(cand, MAX_ORDER).items():
            correct[len(gram) - 1] += min(ref_max.get(gram, 0), count)
    scores = []
    product = 1.0
    for k in range(MAX_ORDER):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def coco_rouge_l(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """Mean ROUGE-L (0-1) as coco-caption's Rouge: LCS F-measure with beta 1.2, best precision and best
    recall over the references taken separately."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0
    beta = 1.2
    total = 0.0
    for cand, refs in zip(candidates, references, strict=True):
        # coco splits on " ", so an empty text is one empty token: length 1, never a zero division.
        cand_len = max(1, len(cand))
        lcs = [_lcs_length(ref, cand) for ref in refs]
        precision = max(x / cand_len for x in lcs)
        recall = max(x / max(1, len(ref)) for x, ref in zip(lcs, refs, strict=True))
        if precision != 0 and recall != 0:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(candidates)


def _cider_vector(
    counts: Counter[tuple[str, ...]], doc_freq: Counter[tuple[str, ...]], log_docs: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_ORDER)]
    norm = [0.0] * MAX_ORDER
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        vec[n][gram] = weight
        norm[n] += weight * weight
        if n == 1:
            # coco-caption measures length in bigrams (its `if n == 1`), kept for identical numbers.
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D as coco-caption computes it: (corpus mean, per-candidate scores), each 0-10.

    n = 1..4, tf-idf weights with document frequencies from the references of *this* corpus (so a
    corpus of one item scores 0), clipped cosine similarity, Gaussian length penalty with sigma 6,
    averaged over n-gram orders and references, times 10.
    """
    return cider_d_tokens(
        [cider_tokenize(c) for c in candidates], [[cider_tokenize(r) for r in rs] for rs in references]
    )


def cider_d_tokens(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> tuple[float, list[float]]:
    """`cider_d` on texts already tokenised (by `ptb_tokenize` or coco-caption's PTBTokenizer)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0, []
    cands = [_ngrams(c, MAX_ORDER) for c in candidates]
    refs = [[_ngrams(r, MAX_ORDER) for r in rs] for rs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for rs in refs:
        doc_freq.update({gram for r in rs for gram in r})
    log_docs = math.log(len(refs))
    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        if not rs:
            scores.append(0.0)
            continue
        vec, norm, length = _cider_vector(cand, doc_freq, log_docs)
        total = 0.0
        for r in rs:
            rvec, rnorm, rlength = _cider_vector(r, doc_freq, log_docs)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_ORDER):
                if norm[n] == 0 or rnorm[n] == 0:
                    continue
                dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in vec[n].items())
                total += dot / (norm[n] * rnorm[n]) * penalty
        scores.append(10.0 * total / MAX_ORDER / len(rs))
    return sum(scores) / len(scores), scores
