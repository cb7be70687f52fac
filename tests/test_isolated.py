"""The one way benchmarks run a measurement in a fresh process and read its result back."""

import os

import pytest

from drivekd.bench.isolated import IsolatedFailure, run_isolated


def test_a_result_comes_back_as_json_from_another_process():
    assert run_isolated("os:getpid") != os.getpid()
    assert run_isolated("os.path:join", "a", "b") == "a/b"
    assert run_isolated("os:getenv", "DRIVEKD_TEST_VALUE", env={"DRIVEKD_TEST_VALUE": "7"}) == "7"


def test_a_failure_is_one_line():
    with pytest.raises(IsolatedFailure, match="AttributeError: module 'os' has no attribute 'no_such_function'"):
        run_isolated("os:no_such_function")
    with pytest.raises(IsolatedFailure, match=r"killed by signal 6 \(out of memory\?\)") as info:
        run_isolated("os:abort")
    assert info.value.returncode == -6
