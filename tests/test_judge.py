import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from click.testing import CliRunner

from drivekd.cli import main
from drivekd.eval.judge import (
    Judge,
    JudgeConfig,
    build_prompt,
    judge_items,
    judge_summary,
    parse_total_score,
    rubric_for,
)
from drivekd.eval.scoring import Prediction

from .conftest import reply_chat


class Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback that replays scripted behaviours, one per request."""

    script: ClassVar[list[str]] = []
    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        mode = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if mode == "sleep":
            time.sleep(2.0)
        if mode in ("500", "401"):
            self.send_response(int(mode))
            self.end_headers()
            return
        content = {"ok": "Correctness 50/50 ...\nTotal Score: 85", "noscore": "Looks fine to me."}.get(
            mode, "Total Score: 85"
        )
        reply_chat(self, content)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    Stub.script, Stub.seen = ["ok"], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _config(url, **kw):
    return JudgeConfig(base_url=url, model="judge-m", **{"timeout_s": 5.0, "backoff_s": 0.01, **kw})


def _pred(i, cap, qt="q", pred="Final: {A. Going ahead.}"):
    return Prediction(
        id=f"p{i}", capability=cap, question_type=qt, prediction=pred, reference="Final: {A. Going ahead.}"
    )


def test_normal_reply_request_shape(stub, monkeypatch):
    _, url = stub
    monkeypatch.setenv("DRIVEKD_TEST_JUDGE_KEY", "sekrit")
    judge = Judge(_config(url, key_env="DRIVEKD_TEST_JUDGE_KEY"))
    v = judge.judge("rate this")
    assert (v.score, v.error, judge.requests) == (85.0, None, 1)
    req = Stub.seen[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekrit"
    assert req["body"]["model"] == "judge-m" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][-1] == {"role": "user", "content": "rate this"}


def test_reply_without_score_is_null_not_retried(stub, monkeypatch):
    _, url = stub
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    Stub.script = ["noscore"]
    judge = Judge(_config(url))
    v = judge.judge("rate this")
    assert v.score is None and "Total Score" in v.error and v.reply == "Looks fine to me."
    assert judge.requests == 1 and Stub.seen[0]["auth"] is None


def test_server_slower_than_timeout_fails_fast(stub):
    _, url = stub
    Stub.script = ["sleep"]
    judge = Judge(_config(url, timeout_s=0.2, retries=2))
    start = time.monotonic()
    v = judge.judge("rate this")
    assert time.monotonic() - start < 1.5
    assert v.score is None and "failed after 2 attempt(s)" in v.error and "timed out" in v.error.lower()
    assert judge.requests == 2


def test_server_error_then_success_is_retried(stub):
    _, url = stub
    Stub.script = ["500", "500", "ok"]
    judge = Judge(_config(url, retries=3))
    assert judge.judge("rate this").score == 85.0
    assert judge.requests == 3


def test_refusal_is_not_retried_and_unreachable_server_is_bounded(stub):
    _, url = stub
    Stub.script = ["401"]
    judge = Judge(_config(url, retries=3))
    v = judge.judge("rate this")
    assert v.score is None and "401" in v.error and judge.requests == 1
    server, _ = stub
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    dead = Judge(_config(f"http://127.0.0.1:{port}", retries=2, timeout_s=0.5))
    v = dead.judge("rate this")
    assert v.score is None and "failed after 2 attempt(s)" in v.error


def test_cache_makes_rerun_free_and_skips_failures(stub, tmp_path):
    _, url = stub
    cache = tmp_path / "cache" / "judge.jsonl"
    preds = [
        _pred(1, "perception"),
        _pred(2, "reasoning"),
        _pred(3, "planning", pred="Final: {B}"),
        _pred(4, "planning"),
    ]
    first = Judge(_config(url, cache=cache, workers=2))
    verdicts = judge_items(preds, first)
    # p1 and p4 differ only in capability, and so in rubric: four distinct prompts.
    assert [v.score for v in verdicts] == [85.0] * 4 and first.requests == 4
    with cache.open("a") as f:
        f.write('{"key": "trunc')  # a line cut short by a killed run is ignored
    again = Judge(_config(url, cache=cache))
    verdicts = judge_items(preds, again)
    assert again.requests == 0 and all(v.cached and v.score == 85.0 for v in verdicts)
    # Transport failures are not cached: the next run asks again.
    Stub.script = ["500"]
    failing = Judge(_config(url, cache=cache, retries=1))
    assert failing.judge("new prompt").score is None
    Stub.script = ["ok"]
    retry = Judge(_config(url, cache=cache))
    assert retry.judge("new prompt").score == 85.0 and retry.requests == 1


def test_summary_rubrics_and_score_parsing():
    preds = [_pred(1, "perception"), _pred(2, "perception"), _pred(3, "planning")]
    from drivekd.eval.judge import Verdict

    verdicts = [Verdict(80.0, "", None), Verdict(None, None, "boom"), Verdict(40.0, "", None)]
    s = judge_summary(preds, verdicts, "m")
    assert s["capabilities"] == {"perception": 80.0, "reasoning": None, "planning": 40.0}
    assert s["average"] == 60.0 and s["judged"] == 2 and s["failed"] == 1
    assert s["failures"] == [{"id": "p2", "error": "boom"}]
    assert rubric_for("perception", "object_status") == "perception"
    assert rubric_for("reasoning", "behavior") == "behavior"
    assert rubric_for("planning", "safe_actions") == "planning"
    mc = Prediction(
        "x", "perception", "ego_lane", "A", "Final: {A. x}", choices={"A": "x", "B": "y"}, correct_choice="A"
    )
    prompt = build_prompt(mc)
    assert "Answer Correctness (50 points)" in prompt and "Environmental Condition Awareness (15 points)" in prompt
    assert "Options: A. x B. y" in prompt and prompt.rstrip().endswith("integer from 0 to 100.")
    assert "Action Accuracy (40 points)" in build_prompt(_pred(1, "planning"))
    assert "Behaviour Understanding (15 points)" in build_prompt(_pred(1, "reasoning"))
    assert parse_total_score("**Total Score:** 85") == 85.0
    assert parse_total_score("Total Score: 20\n...\nTotal score: 70.5") == 70.5
    assert parse_total_score("Total Score: 150") is None
    assert parse_total_score("no score") is None


def test_cli_with_judge(stub, tmp_path):
    _, url = stub
    f = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "capability": "perception", "question_type": "q", "prediction": "x", "reference": "x"},
        {"id": "b", "capability": "planning", "question_type": "q", "prediction": "y", "reference": "z"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cache = tmp_path / "c.jsonl"
    args = [str(f), "--judge-url", url, "--judge-model", "m", "--judge-cache", str(cache), "--json"]
    res = CliRunner().invoke(main, ["score", *args])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["judge"]["capabilities"] == {"perception": 85.0, "reasoning": None, "planning": 85.0}
    assert len(Stub.seen) == 2
    res = CliRunner().invoke(main, ["score", *args[:-1]])
    assert res.exit_code == 0 and "| Judge avg | 85.00* |" in res.stdout and len(Stub.seen) == 2
