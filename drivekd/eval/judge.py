"""Optional LLM judge: DriveBench-style 0-100 rubrics through any OpenAI-compatible endpoint.

Standard library only (urllib). Every request has a socket timeout and a deadline for the whole
reply, at most `retries` attempts with exponential backoff, and a failure after the last attempt
becomes a null score carrying the error: an unreachable judge never hangs or crashes a scoring run
(DriveBench's own retry loop spins forever, docs/method.md §7).

Replies are appended to a JSONL cache keyed by sha256(model, prompt) as soon as they arrive, so an
interrupted run resumes where it stopped and nothing is asked twice. Only replies are cached, and
the score is re-read from them on load; transport failures are not cached, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from drivekd.data.choices import format_options
from drivekd.data.sample import CAPABILITIES
from drivekd.errors import DriveKDError
from drivekd.eval.scoring import Prediction

_CRITERIA = {
    "perception": """1. Answer Correctness (50 points): 50 if the predicted answer chooses the same option as (or states the
   same fact as) the correct answer, 0 otherwise, however good the explanation.
2. Object Recognition (10 points): the objects mentioned are identified correctly; none is hallucinated.
3. Object Location and Orientation (15 points): positions, lanes, distances and headings are accurate.
4. Environmental Condition Awareness (15 points): road layout, traffic and conditions that matter are
   described accurately.
5. Clarity of Reasoning (10 points): the explanation is clear, concise and supports the answer.""",
    "behavior": """1. Answer Correctness (50 points): 50 if the predicted answer chooses the same option as (or states the
   same behaviour as) the correct answer, 0 otherwise, however good the explanation.
2. Behaviour Understanding (15 points): the motion of the ego vehicle or the object (speed, lane keeping
   or changing, braking) is understood correctly.
3. Reasoning (15 points): the causes and consequences given are logical and consistent with the scene.
4. Contextual Relevance (10 points): the answer uses the relevant surrounding traffic and road context.
5. Clarity (10 points): the answer is clear and unambiguous.""",
    "planning": """1. Action Accuracy (40 points): the proposed actions match the correct answer; deduct for each missing,
   extra or wrong action.
2. Reasoning (20 points): the justification is logical and consistent with the scene and the correct answer.
3. Probability and Confidence (15 points): likelihoods or risks (e.g. of a collision) are judged sensibly.
4. Context and Safety (15 points): the answer accounts for surrounding vehicles, lanes and safe driving.
5. Conciseness (10 points): the answer is direct, without irrelevant content.""",
}
_INTRO = (
    "Evaluate the predicted answer to a {kind} question about a driving scene on a scale from 0 to 100, "
    "where a higher score reflects precise alignment with the correct answer and well-supported reasoning. "
    "Be strict and conservative: award full points only when every criterion is fully met without error, and "
    "deduct points for minor inaccuracies, omissions or lack of clarity. Distribute the Total Score across "
    "these criteria, giving 0 to a criterion the answer does not address:"
)
_KINDS = {"perception": "perception", "behavior": "behaviour or prediction", "planning": "planning"}
_TAIL = """Question: {question}
Correct answer: {reference}
Predicted answer: {prediction}

Score each criterion with a one-line justification, then end with one line exactly of the form
Total Score: N
where N is an integer from 0 to 100."""
SYSTEM_PROMPT = "You are a strict, consistent evaluator of autonomous-driving question answering."
_TOTAL = re.compile(r"total\s*score\W{0,6}?\s*(\d{1,3}(?:\.\d+)?)", re.IGNORECASE)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def rubric_for(capability: str, question_type: str = "") -> str:
    """`perception`, `behavior` or `planning`: which of the paper's rubrics judges this question."""
    qt = question_type.lower()
    if capability == "planning" or "plan" in qt:
        return "planning"
    if capability == "reasoning" or "behav" in qt or "predict" in qt:
        return "behavior"
    return "perception"


def build_prompt(pred: Prediction) -> str:
    """The judge prompt for one prediction: the rubric, then question, correct and predicted answers."""
    rubric = rubric_for(pred.capability, pred.question_type)
    kind = _KINDS[rubric] + (" multiple-choice" if pred.is_choice else "")
    question = pred.question or "(not given)"
    if pred.choices and (pred.question is None or "A." not in pred.question):
        question += " Options: " + format_options(pred.choices)
    tail = _TAIL.format(question=question, reference=pred.reference, prediction=pred.prediction)
    return f"{_INTRO.format(kind=kind)}\n\n{_CRITERIA[rubric]}\n\n{tail}"


def parse_total_score(reply: str) -> float | None:
    """The last `Total Score: N` in `reply` (markdown bold allowed), if it is within 0..100."""
    matches = _TOTAL.findall(reply or "")
    if not matches:
        return None
    value = float(matches[-1])
    return value if 0.0 <= value <= 100.0 else None


@dataclass
class JudgeConfig:
    """Where and how to ask. `retries` counts attempts; waits between them are backoff_s, 2x, 4x, ..."""

    base_url: str
    model: str
    cache: Path | None = None
    key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    workers: int = 4
    # a protocol's own judge settings (the DriveLM challenge asks with its system message at 0.6)
    system_prompt: str = SYSTEM_PROMPT
    temperature: float = 0.0


@dataclass
class Verdict:
    """A judged prompt: `score` is None when the judge failed (`error` says why) or gave no score."""

    score: float | None
    reply: str | None
    error: str | None
    cached: bool = False


class _Failure(Exception):
    """A request that failed; `retry` is False when the server refused for good (bad key, unknown model)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Judge:
    """Asks the judge, through the cache. Thread-safe; `requests` counts HTTP requests actually sent."""

    def __init__(self, config: JudgeConfig) -> None:
        parsed = urllib.parse.urlparse(config.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DriveKDError(f"judge URL {config.base_url!r} must be http(s)://host[:port][/path]")
        if config.retries < 1:
            raise DriveKDError("judge retries must be at least 1")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.requests = 0
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        # A local judge (vLLM, llama.cpp) is never reached through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        if config.cache is not None:
            self._load_cache(config.cache)

    def _load_cache(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DriveKDError(f"{path}: cannot read the judge cache: {e}") from e
        for line in lines:
            try:
                entry = json.loads(line)
                self._cache[str(entry["key"])] = str(entry["reply"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short when a previous run was killed

    def key(self, prompt: str) -> str:
        c = self.config
        asked = [c.model, c.system_prompt, prompt] + ([] if c.temperature == 0 else [c.temperature])
        return hashlib.sha256(json.dumps(asked).encode()).hexdigest()

    def judge(self, prompt: str) -> Verdict:
        """Score one prompt: from the cache, or by asking (with retries)."""
        key = self.key(prompt)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return _verdict(cached, cached=True)
        try:
            reply = self._ask(prompt)
        except _Failure as e:
            return Verdict(None, None, str(e))
        with self._lock:
            self._cache[key] = reply
            if self.config.cache is not None:
                self.config.cache.parent.mkdir(parents=True, exist_ok=True)
                with self.config.cache.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "model": self.config.model, "reply": reply}) + "\n")
        return _verdict(reply)

    def _ask(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.config.model,
                "temperature": self.config.temperature,
                "messages": [
                    {"role": "system", "content": self.config.system_prompt},
                    {"role": "user", "content": prompt},
                ],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.config.key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        error = "no attempt made"
        for attempt in range(self.config.retries):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(body, headers)
            except _Failure as e:
                if not e.retry:
                    raise
                error = str(e)
        raise _Failure(f"failed after {self.config.retries} attempt(s): {error}")

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        with self._lock:
            self.requests += 1
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = self.config.timeout_s
        deadline = time.monotonic() + timeout
        try:
            with self._opener.open(request, timeout=timeout) as response:
                # The socket timeout bounds each read; the deadline bounds a server that trickles bytes.
                chunks = []
                while chunk := response.read(65536):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise _Failure(f"reply took longer than {timeout:g} s")
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Failure(f"HTTP {e.code} {e.reason}") from None
            raise _Failure(f"HTTP {e.code} {e.reason} (not retried)", retry=False) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Failure(f"{type(reason).__name__}: {reason}") from None
        try:
            return str(json.loads(b"".join(chunks))["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Failure(f"malformed reply ({type(e).__name__}: {e})") from None


def _verdict(reply: str, cached: bool = False) -> Verdict:
    score = parse_total_score(reply)
    return Verdict(score, reply, None if score is not None else "no 'Total Score: N' in the reply", cached)


def judge_items(
    preds: Sequence[Prediction], judge: Judge, progress: Callable[[int], object] | None = None
) -> list[Verdict]:
    """One verdict per prediction, in order; identical prompts are asked once. `progress(1)` per prompt."""
    prompts = [build_prompt(p) for p in preds]
    unique = list(dict.fromkeys(prompts))
    verdicts: dict[str, Verdict] = {}
    with ThreadPoolExecutor(max_workers=max(1, judge.config.workers)) as pool:
        for prompt, verdict in zip(unique, pool.map(judge.judge, unique), strict=True):
            verdicts[prompt] = verdict
            if progress is not None:
                progress(1)
    return [verdicts[p] for p in prompts]


def judge_summary(preds: Sequence[Prediction], verdicts: Sequence[Verdict], model: str) -> dict[str, Any]:
    """`{"model", "capabilities", "average", "judged", "failed", "failures": [{"id", "error"}]}`.

    Capability means are over the samples that got a score; failed ones are listed, not counted as 0.
    """
    caps: dict[str, float | None] = {}
    for cap in CAPABILITIES:
        scores = [v.score for p, v in zip(preds, verdicts, strict=True) if p.capability == cap and v.score is not None]
        caps[cap] = round(sum(scores) / len(scores), 4) if scores else None
    present = [v for v in caps.values() if v is not None]
    failures = [{"id": p.id, "error": v.error} for p, v in zip(preds, verdicts, strict=True) if v.score is None]
    return {
        "model": model,
        "capabilities": caps,
        "average": round(sum(present) / len(present), 4) if present else None,
        "judged": len(preds) - len(failures),
        "failed": len(failures),
        "failures": failures,
    }
