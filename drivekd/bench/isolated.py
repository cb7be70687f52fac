"""Run one measurement in a fresh Python process and read back its JSON result.

A benchmark's peak memory and timings must not include what an earlier measurement allocated or
compiled, so each runs alone: `run_isolated("module:function", *args)` starts
`python -m drivekd.bench.isolated`, which calls the function and prints one `RESULT <json>` line.
A failure comes back as one line (the last line of the worker's stderr, or the signal that killed
it), never as a traceback or a half-parsed output.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

RESULT = "RESULT "


class IsolatedFailure(Exception):
    """The worker process failed: `returncode` and a one-line reason."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        if returncode < 0:
            reason = f"killed by signal {-returncode} (out of memory?)"
        else:
            tail = [line for line in stderr.strip().splitlines() if line.strip()]
            reason = tail[-1] if tail else f"exit {returncode} with no output"
        super().__init__(reason)


def run_isolated(target: str, *args: Any, env: dict[str, str] | None = None) -> Any:
    """`target(*args)` ("package.module:function", JSON-serialisable arguments) in a new process; its
    JSON-serialisable result. Raises IsolatedFailure when the process fails or prints no result."""
    proc = subprocess.run(
        [sys.executable, "-m", "drivekd.bench.isolated"],
        input=json.dumps({"target": target, "args": list(args)}),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode == 0:
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT):
                return json.loads(line.removeprefix(RESULT))
    raise IsolatedFailure(proc.returncode, proc.stderr)


def _serve() -> None:
    request = json.loads(sys.stdin.read())
    module, function = request["target"].split(":")
    result = getattr(importlib.import_module(module), function)(*request["args"])
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    _serve()
