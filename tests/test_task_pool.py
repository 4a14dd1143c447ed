"""rayvid.release.task_pool: tasks in this process or in spawned workers, first error wins."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from rayvid.release.pickle_reader import PickleFormatError, UnsafePickleError
from rayvid.release.layout import BadClipError
from rayvid.release.task_pool import Cancelled, TaskPool, WorkerError


class _Odd(Exception):
    def __init__(self, a, b):  # default exception pickling calls _Odd(message): TypeError
        super().__init__(f"{a}/{b}")


def square(x, ctx):
    ctx.report({"event": "square", "x": x, "pid": os.getpid()})
    return x * x


def fail_or_wait(x, ctx):
    if x == "fail":
        raise BadClipError("f.pickle", "CLIP_1", "face[0].feat", "NaN")
    if x == "odd":
        raise _Odd(1, 2)
    for _ in range(200):  # a long task: stops once another one failed
        ctx.check_cancelled()
        time.sleep(0.05)
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_and_events_come_back(workers):
    events = []
    with TaskPool(workers, events.append) as pool:
        got = dict(pool.run(square, range(6)))
    assert got == {x: x * x for x in range(6)}
    assert sorted(e["x"] for e in events) == list(range(6))
    pids = {e["pid"] for e in events}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_first_error_cancels_the_rest_and_keeps_its_type():
    t0 = time.perf_counter()
    with pytest.raises(BadClipError) as e:
        with TaskPool(2) as pool:
            list(pool.run(fail_or_wait, ["wait", "fail", "wait", "wait"]))
    assert e.value.file == "f.pickle" and e.value.clip == "CLIP_1" and "NaN" in str(e.value)
    assert "Traceback" in str(e.value.__cause__)  # the worker's traceback
    assert time.perf_counter() - t0 < 8  # the waiting task saw the cancel flag


def test_an_exception_that_cannot_be_pickled_arrives_described():
    with pytest.raises(WorkerError, match="_Odd: 1/2"):
        with TaskPool(2) as pool:
            list(pool.run(fail_or_wait, ["odd"]))


def test_reader_errors_pickle_as_themselves():
    for e in (PickleFormatError("/r/x.pickle", 12, "truncated"),
              UnsafePickleError("/r/x.pickle", 7, "os.system", "not allowed"),
              BadClipError("/r/x.pickle", "C", "face", "bad")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.__dict__ == e.__dict__


def test_cancelled_is_raised_by_check_cancelled():
    from rayvid.release.task_pool import TaskContext

    with pytest.raises(Cancelled):
        TaskContext(print, lambda: True).check_cancelled()
