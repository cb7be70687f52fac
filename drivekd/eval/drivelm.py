"""The DriveLM challenge score (`drivekd score --protocol drivelm`), as OpenDriveLab/DriveLM's
`challenge/evaluation.py` computes it, from its QA file and a prediction file.

The QA file is the challenge's `test_eval.json` layout: `{scene: {"key_frames": {frame: {"QA":
{"perception", "prediction", "planning", "behavior": [{"Q", "A", "tag": [..]}]}}}}}`. A frame's
questions are taken in that order of the four lists; the i-th has the challenge id `scene_frame_i`
(drivekd's DriveLM reader calls the same question `frame:list:k`; both are accepted).

Predictions are the challenge's `[{"id", "answer"[, "question", "gt_answer"]}]` (or a submission
`{"results": [...]}`), or drivekd prediction JSONL (`id`, `prediction`, `reference`, ...).

Rules, as the challenge applies them:

- **Object graph.** A frame's first question is always scored, and the points of its answer that match
  the reference's (`match_points`) become the frame's graph. Every later question whose text names a
  point (`<c1,CAM_BACK,1088.3,497.5>`) is scored only if all its points are in the graph: questions
  about an object the model did not find are left out, not scored 0 (counted in `left_out_by_graph`).
- **Tags** route a question to parts (one question can feed several): 0 accuracy (the answer string
  equals the reference exactly: `B.` is not `B`), 1 ChatGPT score, 2 language score, 3 match score.
- **Match**: points are the `d.d` numbers in the text taken in pairs (an odd one out at the end of an
  answer is dropped); each answer point in order takes the nearest unmatched reference point if their
  L1 distance is below 16 pixels; F1 with the challenge's 1e-8 guards, times 100. The match part is
  the mean of that F1 and the ChatGPT score of the same questions.
- **Language**: BLEU-1..4, ROUGE-L and CIDEr from coco-caption over all tag-2 questions, and the
  language part is the mean of (mean BLEU), ROUGE-L and CIDEr / 10.
- **Final** = 0.4 * ChatGPT / 100 + 0.2 * language + 0.2 * match / 100 + 0.2 * accuracy, in 0..1.

The ChatGPT score asks an OpenAI-compatible judge (`drivekd.eval.judge.Judge`) the challenge's own
prompt and reads the number it answers. Without a judge that part is missing: the result says so,
`final` is None and `final_partial` gives the weighted sum of the parts there are and the weight they
carry (0.5 of 1: language, accuracy and match's F1 half). A part with no question (no tag-3 question
left, say) is missing the same way; nothing missing is ever counted as 0.

Language metrics have two paths (`language_path`): `exact` runs coco-caption itself (pycocoevalcap's
PTBTokenizer, which needs Java, and its BLEU, ROUGE-L and CIDEr scorers), as the challenge does through
language-evaluation; `java-free` uses `metrics.ptb_tokenize` with drivekd's coco-style scorers. `auto`
takes `exact` when Java and pycocoevalcap are there.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from drivekd.data.readers.json_source import JsonLines, file_content, read_json
from drivekd.errors import DataError, DriveKDError
from drivekd.eval import metrics

QA_LISTS: tuple[str, ...] = ("perception", "prediction", "planning", "behavior")
WEIGHTS: dict[str, float] = {"chatgpt": 0.4, "language": 0.2, "match": 0.2, "accuracy": 0.2}
MATCH_DISTANCE = 16.0  # pixels, L1, strict: the challenge's `closest_distance < 16`
LANGUAGE_KEYS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
LANGUAGE_PATHS: tuple[str, ...] = ("auto", "exact", "java-free")
_DECIMAL = re.compile(r"\d+\.\d+")  # the challenge reads points as the decimals in a text, nothing else
# The challenge's ChatGPT prompt, word for word (spaces included): its scores depend on the wording.
GPT_INSTRUCTION = (
    "Rate my answer based on the correct answer out of 100, with higher scores indicating that the answer is "
    "closer to the correct answer, and you should be accurate to single digits like 62, 78, 41,etc. "
    "Output the number only"
)
# ...asked as the challenge asks it: with this system message, sampled at temperature 0.6
JUDGE_SYSTEM_PROMPT = "an evaluator who rates my answer based on the correct answer"
JUDGE_TEMPERATURE = 0.6
_THINK = re.compile(r"<think>[\s\S]*?</think>\s*")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass
class Question:
    """One QA of the QA file, with where it is and both ids it can be predicted under."""

    challenge_id: str
    drivekd_id: str
    scene: str
    frame: str
    question: str
    answer: str
    tags: tuple[int, ...]
    first_of_frame: bool
    where: str


@dataclass
class JudgeReply:
    """What a judge said about one prompt: `score` None when it failed or gave no number (`error` says why)."""

    score: float | None
    error: str | None = None


class JudgeLike(Protocol):
    """`drivekd.eval.judge.Judge`, or a stand-in with the same `judge(prompt)` and `config.workers`."""

    config: Any

    def judge(self, prompt: str) -> Any: ...


# ---------------------------------------------------------------- reading


def read_qa(path: str | Path) -> list[Question]:
    """The questions of a challenge QA file in the challenge's order; DataError on any malformed entry."""
    file = Path(path)
    data = read_json(file)  # a scene written twice is refused, not silently merged into one
    if not isinstance(data, dict):
        raise DataError(f"{file}: a DriveLM QA file is one JSON object keyed by scene id, got {type(data).__name__}")
    out: list[Question] = []
    for scene, scene_data in data.items():
        frames = scene_data.get("key_frames") if isinstance(scene_data, dict) else None
        if not isinstance(frames, dict):
            raise DataError(f"{file}: scene {scene!r}: missing 'key_frames' (an object of frames)")
        for frame, frame_data in frames.items():
            fwhere = f"{file}: scene {scene!r} frame {frame!r}"
            qa = frame_data.get("QA") if isinstance(frame_data, dict) else None
            if not isinstance(qa, dict):
                raise DataError(f"{fwhere}: missing 'QA' (an object of question lists)")
            flat: list[tuple[str, int, Any]] = []
            for name in QA_LISTS:
                # The challenge reads all four lists; a frame without one would crash it.
                if not isinstance(qa.get(name), list):
                    raise DataError(f"{fwhere}: QA has no list {name!r} (the challenge reads {', '.join(QA_LISTS)})")
                flat += [(name, k, item) for k, item in enumerate(qa[name])]
            for i, (name, k, item) in enumerate(flat):
                where = f"{fwhere} {name}[{k}]"
                out.append(_question(item, scene, frame, name, k, i, where))
    if not out:
        raise DataError(f"{file}: no questions")
    return out


def _question(item: Any, scene: str, frame: str, name: str, k: int, i: int, where: str) -> Question:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'Q', 'A' and 'tag'")
    for key in ("Q", "A"):
        if not isinstance(item.get(key), str):
            raise DataError(f"{where}: field {key!r} must be a string")
    tags = item.get("tag")
    if not isinstance(tags, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        raise DataError(f"{where}: field 'tag' must be a list of integers (0 accuracy, 1 ChatGPT, 2 language, 3 match)")
    if unknown := sorted(set(tags) - {0, 1, 2, 3}):
        raise DataError(f"{where}: unknown tag(s) {unknown}; the challenge knows 0, 1, 2 and 3")
    if len(_DECIMAL.findall(item["Q"])) % 2:
        raise DataError(f"{where}: the question has an odd number of decimal numbers, so its points cannot be paired")
    if (i == 0 or 3 in tags) and len(_DECIMAL.findall(item["A"])) % 2:
        raise DataError(f"{where}: the answer has an odd number of decimal numbers, so its points cannot be paired")
    return Question(
        challenge_id=f"{scene}_{frame}_{i}",
        drivekd_id=f"{frame}:{name}:{k}",
        scene=scene,
        frame=frame,
        question=item["Q"],
        answer=item["A"],
        tags=tuple(tags),
        first_of_frame=i == 0,
        where=where,
    )


def read_answers(path: str | Path) -> dict[str, tuple[str, str | None, str]]:
    """`{id: (answer, reference or None, where)}` from a challenge prediction file or drivekd JSONL."""
    file = Path(path)
    data = file_content(file)
    if isinstance(data, JsonLines):  # drivekd's prediction records
        data = None
    if isinstance(data, dict) and "results" in data:
        data = data["results"]  # the challenge's submission.json wraps output.json
    if isinstance(data, list):
        return _challenge_answers(file, data)
    from drivekd.eval.scoring import read_predictions

    answers: dict[str, tuple[str, str | None, str]] = {}
    for pred in read_predictions(file):  # checks JSON, fields and duplicate ids itself
        answers[pred.id] = (pred.prediction, pred.reference, pred.where)
    return answers


def _challenge_answers(file: Path, data: list[Any]) -> dict[str, tuple[str, str | None, str]]:
    if not data:
        raise DataError(f"{file}: no predictions (an empty list)")
    answers: dict[str, tuple[str, str | None, str]] = {}
    for n, item in enumerate(data):
        where = f"{file}: item {n}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with 'id' and 'answer', got {type(item).__name__}")
        pid = item.get("id")
        if not isinstance(pid, str) or not pid:
            raise DataError(f"{where}: field 'id' must be a non-empty string")
        where = f"{file}: item {n} (id {pid!r})"
        if not isinstance(item.get("answer"), str):
            raise DataError(f"{where}: field 'answer' must be a string")
        if pid in answers:
            raise DataError(f"{where}: duplicate id (also at {answers[pid][2]})")
        gt = item.get("gt_answer")
        answers[pid] = (item["answer"], gt if isinstance(gt, str) else None, where)
    return answers


# ---------------------------------------------------------------- rules


def points(text: str, drop_odd: bool = False) -> list[tuple[float, float]]:
    """The `d.d` numbers of a text in pairs, as the challenge reads object points."""
    nums = [float(x) for x in _DECIMAL.findall(text)]
    if len(nums) % 2:
        if not drop_odd:
            raise ValueError(f"odd number of decimals in {text[:80]!r}")
        nums = nums[:-1]
    return list(zip(nums[0::2], nums[1::2], strict=True))


def match_points(answer: str, reference: str) -> tuple[list[tuple[float, float]], float]:
    """(reference points matched, F1 in 0..1): each answer point in order takes the nearest reference
    point left (first on ties) if their L1 distance is below `MATCH_DISTANCE`."""
    left = points(reference)
    n_reference = len(left)
    matched: list[tuple[float, float]] = []
    false_positives = 0
    for x, y in points(answer, drop_odd=True):
        best, best_distance = None, float("inf")
        for i, (gx, gy) in enumerate(left):
            distance = abs(x - gx) + abs(y - gy)
            if distance < best_distance:
                best, best_distance = i, distance
        if best is not None and best_distance < MATCH_DISTANCE:
            matched.append(left.pop(best))
        else:
            false_positives += 1
    true_positives = len(matched)
    # The challenge's 1e-8 guards: a perfect answer scores 0.99999998..., kept for identical numbers.
    precision = true_positives / (true_positives + false_positives + 1e-8)
    recall = true_positives / (n_reference + 1e-8)
    return matched, 2 * precision * recall / (precision + recall + 1e-8)


def gpt_prompt(answer: str, reference: str) -> str:
    """The challenge's ChatGPT prompt for one answer (it has no spaces between the parts)."""
    return GPT_INSTRUCTION + "This is the correct answer: " + reference + "This is my answer: " + answer


def parse_gpt_score(reply: str | None) -> float | None:
    """The score in a reply to `gpt_prompt`: the reply is the number (the challenge calls float() on it);
    a reply with text around exactly one number in 0..100 is read too; anything else is None."""
    if reply is None:
        return None
    text = _THINK.sub("", reply).strip()
    try:
        value = float(text)
    except ValueError:
        found = _NUMBER.findall(text)
        if len(found) != 1:
            return None
        value = float(found[0])
    return value if 0.0 <= value <= 100.0 else None


def ask_judge(
    judge: JudgeLike, pairs: Sequence[tuple[str, str]], progress: Callable[[int], object] | None = None
) -> list[JudgeReply]:
    """One reply per (answer, reference), in order; the same prompt is asked once."""
    prompts = [gpt_prompt(a, r) for a, r in pairs]
    unique = list(dict.fromkeys(prompts))
    replies: dict[str, JudgeReply] = {}
    with ThreadPoolExecutor(max_workers=max(1, int(getattr(judge.config, "workers", 1)))) as pool:
        for prompt, verdict in zip(unique, pool.map(judge.judge, unique), strict=True):
            # Judge parses its own rubric's "Total Score: N"; this prompt asks for the bare number.
            score = parse_gpt_score(verdict.reply)
            error = (
                verdict.error
                if verdict.reply is None
                else (None if score is not None else "no number 0..100 in the reply")
            )
            replies[prompt] = JudgeReply(score, error)
            if progress is not None:
                progress(1)
    return [replies[p] for p in prompts]


def java_available() -> bool:
    return shutil.which("java") is not None


def pycocoevalcap_available() -> bool:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_language_path(requested: str) -> str:
    """`exact` or `java-free` for `auto`, `exact` or `java-free`; DriveKDError if `exact` cannot run."""
    if requested not in LANGUAGE_PATHS:
        raise DriveKDError(f"language path {requested!r} is not one of {', '.join(LANGUAGE_PATHS)}")
    ready = java_available() and pycocoevalcap_available()
    if requested == "exact" and not ready:
        missing = [n for n, ok in (("java", java_available()), ("pycocoevalcap", pycocoevalcap_available())) if not ok]
        raise DriveKDError(
            f"the exact language path needs {' and '.join(missing)} (pip install pycocoevalcap; a Java runtime "
            "such as Debian's default-jre-headless); use --language-path java-free to score without them"
        )
    if requested == "auto":
        return "exact" if ready else "java-free"
    return requested


def language_metrics(answers: Sequence[str], references: Sequence[str], path: str) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L (0-1) and CIDEr (0-10) of tag-2 answers, as the challenge's CocoEvaluator."""
    # language-evaluation rewrites this token in the references before scoring; so do we.
    references = [r.replace("_UNK", "_UNKNOWN") for r in references]
    if path == "exact":
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": a}] for i, a in enumerate(answers)})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        values = [*bleu, rouge, cider]
    else:
        cands = [metrics.ptb_tokenize(a) for a in answers]
        refs = [[metrics.ptb_tokenize(r)] for r in references]
        values = [
            *metrics.coco_bleu(cands, refs),
            metrics.coco_rouge_l(cands, refs),
            metrics.cider_d_tokens(cands, refs)[0],
        ]
    return {k: float(v) for k, v in zip(LANGUAGE_KEYS, values, strict=True)}


def language_score(values: dict[str, float]) -> float:
    """The challenge's language part: mean of (mean BLEU-1..4, ROUGE-L, CIDEr / 10), in its summing order."""
    total = 0.0
    for key in LANGUAGE_KEYS[:4]:
        total += values[key] / 4.0 / 3.0
    total += values["ROUGE_L"] / 3.0
    total += values["CIDEr"] / 10.0 / 3.0
    return total


# ---------------------------------------------------------------- scoring


@dataclass
class Prepared:
    """A prediction file checked against its QA file: each question's answer (None: no prediction)."""

    predictions: str
    qa_file: str
    questions: list[Question]
    answers: dict[str, str]  # challenge id -> answer
    missing: int


def prepare(predictions: str | Path, qa_file: str | Path, allow_missing: bool = False) -> Prepared:
    """Read and check both files: every problem is a DataError naming the file, the item and what is wrong."""
    questions = read_qa(qa_file)
    answers = read_answers(predictions)
    by_id: dict[str, Question] = {}
    for q in questions:
        for key in (q.challenge_id, q.drivekd_id):
            if key in by_id:
                raise DataError(f"{q.where}: id {key!r} is also the id of {by_id[key].where}")
            by_id[key] = q
    found: dict[str, tuple[str, str]] = {}  # challenge id -> (answer, where)
    for pid, (answer, reference, where) in answers.items():
        q = by_id.get(pid)
        if q is None:
            raise DataError(
                f"{where}: id {pid!r} is not a question of {qa_file} (ids are scene_frame_i or frame:list:k)"
            )
        if q.challenge_id in found:
            raise DataError(
                f"{where}: {pid!r} is the same question as {found[q.challenge_id][1]} (two ids, one question)"
            )
        if reference is not None and reference != q.answer:
            raise DataError(
                f"{where}: its reference {reference[:60]!r} differs from the QA file's answer {q.answer[:60]!r} "
                f"({q.where}): were the predictions made on another version of the QA file?"
            )
        found[q.challenge_id] = (answer, where)
    missing = [q for q in questions if q.challenge_id not in found]
    if missing and not allow_missing:
        raise DataError(
            f"{predictions}: no prediction for {len(missing)} of the {len(questions)} questions of {qa_file} "
            f"(first: {missing[0].challenge_id!r} at {missing[0].where}); the challenge needs every one "
            "(--allow-missing scores the others and counts these)"
        )
    return Prepared(str(predictions), str(qa_file), questions, {k: a for k, (a, _) in found.items()}, len(missing))


def score_drivelm(
    predictions: str | Path,
    qa_file: str | Path,
    judge: JudgeLike | None = None,
    language_path: str = "auto",
    allow_missing: bool = False,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Score one prediction file by the DriveLM challenge's rules (module docstring). Every input problem
    is a DataError raised before anything is scored; the result is a JSON-ready dict."""
    path = resolve_language_path(language_path)
    return score_prepared(prepare(predictions, qa_file, allow_missing), judge, path, progress)


def score_prepared(
    prepared: Prepared,
    judge: JudgeLike | None,
    language_path: str,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Score checked files (`prepare`); `language_path` is `exact` or `java-free`."""
    path = resolve_language_path(language_path)
    questions, found, missing = prepared.questions, prepared.answers, prepared.missing
    accuracy: list[float] = []
    gpt_pairs: list[tuple[str, str]] = []
    judged_ids: list[str] = []  # challenge ids of gpt_pairs then match_pairs, to name judge failures
    language: tuple[list[str], list[str]] = ([], [])
    match_f1: list[float] = []
    match_pairs: list[tuple[str, str]] = []
    match_ids: list[str] = []
    left_out = 0
    graph: list[tuple[float, float]] = []
    for q in questions:
        answer = found.get(q.challenge_id)
        if q.first_of_frame:
            # A frame whose first question has no prediction (--allow-missing) has found no object.
            graph = match_points(answer, q.answer)[0] if answer is not None else []
        elif any(p not in graph for p in points(q.question)):
            left_out += answer is not None
            continue
        if answer is None:
            continue
        if 0 in q.tags:
            accuracy.append(1.0 if answer == q.answer else 0.0)
        if 1 in q.tags:
            gpt_pairs.append((answer, q.answer))
            judged_ids.append(q.challenge_id)
        if 2 in q.tags:
            language[0].append(answer)
            language[1].append(q.answer)
        if 3 in q.tags:
            match_f1.append(match_points(answer, q.answer)[1] * 100)
            match_pairs.append((answer, q.answer))
            match_ids.append(q.challenge_id)

    notes: list[str] = []
    result: dict[str, Any] = {
        "file": prepared.predictions,
        "qa_file": prepared.qa_file,
        "protocol": "drivelm",
        "language_path": path,
        "questions": len(questions),
        "scored": len(found) - left_out,
        "left_out_by_graph": left_out,
        "missing_predictions": missing,
        "counts": {
            "accuracy": len(accuracy),
            "chatgpt": len(gpt_pairs),
            "language": len(language[0]),
            "match": len(match_f1),
        },
    }
    if missing:
        notes.append(f"{missing} question(s) had no prediction and were left out (--allow-missing)")
    result["accuracy"] = sum(accuracy) / len(accuracy) if accuracy else None
    if language[0]:
        values = language_metrics(language[0], language[1], path)
        result["language_metrics"] = values
        result["language"] = language_score(values)
    else:
        result["language_metrics"] = None
        result["language"] = None
    result["match_f1"] = sum(match_f1) / len(match_f1) if match_f1 else None

    if judge is not None:
        replies = ask_judge(judge, gpt_pairs + match_pairs, progress)
        gpt_replies, match_replies = replies[: len(gpt_pairs)], replies[len(gpt_pairs) :]
        failures = [
            {"id": qid, "error": r.error}
            for qid, r in zip(judged_ids + match_ids, replies, strict=True)
            if r.score is None
        ]
        result["judge"] = {
            "model": getattr(judge.config, "model", None),
            "judged": len(replies) - len(failures),
            "failed": len(failures),
            "failures": failures,
        }
        if failures:
            notes.append(
                f"the judge failed on {len(failures)} of {len(replies)} answers: ChatGPT means are over the rest"
            )
        result["chatgpt"] = _mean_scores(gpt_replies)
        result["match_chatgpt"] = _mean_scores(match_replies)
    else:
        result["judge"] = None
        result["chatgpt"] = None
        result["match_chatgpt"] = None
        notes.append("no judge (--judge-url/--judge-model): the ChatGPT part and the ChatGPT half of match are missing")
    result["match"] = (
        (result["match_f1"] + result["match_chatgpt"]) / 2.0
        if result["match_f1"] is not None and result["match_chatgpt"] is not None
        else None
    )
    _final(result, notes)
    result["notes"] = notes
    return result


def _mean_scores(replies: Sequence[JudgeReply]) -> float | None:
    scores = [r.score for r in replies if r.score is not None]
    return sum(scores) / len(scores) if scores else None


def _final(result: dict[str, Any], notes: list[str]) -> None:
    """`final` when all four parts are there, else `final_partial` {value, weight, missing}."""
    normalised = {
        "chatgpt": None if result["chatgpt"] is None else result["chatgpt"] / 100.0,
        "language": result["language"],
        "match": None if result["match"] is None else result["match"] / 100.0,
        "accuracy": result["accuracy"],
    }
    failed = (result.get("judge") or {}).get("failed", 0)
    if all(v is not None for v in normalised.values()) and not failed:
        # Summed in the challenge's order (chatgpt, language, match, accuracy) for identical rounding.
        result["final"] = sum(normalised[k] * w for k, w in WEIGHTS.items())  # type: ignore[operator]
        result["final_partial"] = None
        return
    if all(v is not None for v in normalised.values()):
        # every part is there, but the ChatGPT means leave out the answers the judge failed on (which
        # may be the long ones): a number beside a leaderboard's only once those are judged (rerun
        # with --judge-cache asks only for them)
        value = sum(normalised[k] * w for k, w in WEIGHTS.items())  # type: ignore[operator]
        missing = [f"the judge's score of {failed} answers"]
        result["final"] = None
        result["final_partial"] = {"value": value, "weight": 1.0, "missing": missing}
        notes.append(
            f"final score is partial: {value:.4f} with the judge's failures left out of the ChatGPT means; "
            "rerun to judge them before comparing with a leaderboard's final"
        )
        return
    value, weight, missing = 0.0, 0.0, []
    for key, w in WEIGHTS.items():
        if normalised[key] is not None:
            value += normalised[key] * w  # type: ignore[operator]
            weight += w
        elif key == "match" and result["match_f1"] is not None:
            value += result["match_f1"] / 100.0 * w / 2  # F1 is half of match
            weight += w / 2
            missing.append(f"match's ChatGPT half ({w / 2:g})")
        else:
            missing.append(f"{key} ({w:g})")
    result["final"] = None
    result["final_partial"] = {"value": value, "weight": round(weight, 10), "missing": missing}
    notes.append(
        f"final score is partial: {value:.4f} from parts weighing {weight:g} of 1 (missing: {', '.join(missing)}); "
        "not comparable with a leaderboard's final"
    )


# ---------------------------------------------------------------- markdown


def render_markdown(results: Sequence[dict[str, Any]]) -> str:
    """One column per prediction file: the final score (or its partial sum), each part and its counts."""
    from drivekd.eval.scoring import _column_names

    names = _column_names(results)

    def cell(value: Any, digits: int = 4) -> str:
        if value is None:
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    def final_cell(r: dict[str, Any]) -> str:
        if r["final"] is not None:
            return cell(r["final"])
        part = r["final_partial"]
        return f"{part['value']:.4f} (partial, weight {part['weight']:g})"

    rows: list[tuple[str, list[str]]] = [
        ("**Final** (0-1)", [final_cell(r) for r in results]),
        ("ChatGPT (0-100)", [cell(r["chatgpt"], 2) for r in results]),
        ("Language (0-1)", [cell(r["language"]) for r in results]),
        ("Match (0-100)", [cell(r["match"], 2) for r in results]),
        ("Accuracy (0-1)", [cell(r["accuracy"]) for r in results]),
        ("Match F1 (0-100)", [cell(r["match_f1"], 2) for r in results]),
        ("Match ChatGPT (0-100)", [cell(r["match_chatgpt"], 2) for r in results]),
    ]
    for key in LANGUAGE_KEYS:
        rows.append((key, [cell((r["language_metrics"] or {}).get(key)) for r in results]))
    rows += [
        ("Questions", [str(r["questions"]) for r in results]),
        ("Scored", [str(r["scored"]) for r in results]),
        ("Left out (object not found)", [str(r["left_out_by_graph"]) for r in results]),
        ("Missing predictions", [str(r["missing_predictions"]) for r in results]),
        ("Language path", [r["language_path"] for r in results]),
    ]
    lines = ["| DriveLM | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    notes = [f"- {name}: {note}" for name, r in zip(names, results, strict=True) for note in r["notes"]]
    return "\n".join([*lines, "", *notes] if notes else lines)
