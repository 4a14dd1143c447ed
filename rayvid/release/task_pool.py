"""Run independent tasks in this process or in a pool of spawned processes; first error wins.

    with TaskPool(workers=4, on_event=print) as pool:
        for task, result in pool.run(spill_file, tasks):   # results as tasks complete
            ...

`fn(task, ctx)` must be a module-level function and `task`/its result picklable. `ctx` is
a `TaskContext`: `ctx.report(event)` passes a progress dict to the parent's `on_event`
(forwarded through a queue from a worker), `ctx.check_cancelled()` raises `Cancelled` once
another task has failed, so long tasks stop early.

workers=1 runs every task in this process, in order (no pool, no pickling). workers > 1
starts a `ProcessPoolExecutor` with the "spawn" context: workers are direct children (their
peak RSS reaches `RUSAGE_CHILDREN` once they are joined) and inherit no state of the parent.
The first exception of any task is re-raised in the caller as the same exception type (the
worker's traceback chained as its cause); the other tasks are cancelled and every worker
has exited before it propagates. rayvid's own errors define `__reduce__` so that they make
the trip; an exception that cannot arrives as `WorkerError` with the original type,
message and traceback in its text.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

POLL_SECONDS = 0.5
Event = dict


class Cancelled(Exception):
    """A task stopped because another task failed."""


class WorkerError(RuntimeError):
    """An exception from a worker that could not be pickled back as itself."""


class TaskContext:
    """What a task may call: `report(event)`, `check_cancelled()`."""

    def __init__(self, report: Callable[[Event], None], is_cancelled: Callable[[], bool]):
        self.report, self._is_cancelled = report, is_cancelled

    def check_cancelled(self) -> None:
        if self._is_cancelled():
            raise Cancelled("another task failed")


def _transportable(e: BaseException) -> BaseException:
    """`e` if it pickles back as itself, else a WorkerError describing it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception as why:  # noqa: BLE001 - anything that fails the trip is described
        text = "".join(traceback.format_exception(e))
        return WorkerError(f"{type(e).__module__}.{type(e).__qualname__}: {e} (not picklable "
                           f"across processes: {why})\n{text}")


_worker_context: TaskContext | None = None


def _init_worker(events: multiprocessing.Queue, cancel: Any, initializer, initargs) -> None:
    global _worker_context
    _worker_context = TaskContext(events.put, cancel.is_set)
    if initializer is not None:
        initializer(*initargs)


def _call_in_worker(fn: Callable, task: Any) -> Any:
    try:
        return fn(task, _worker_context)
    except BaseException as e:
        raise _transportable(e) from None


class TaskPool:
    """See the module docstring. Use as a context manager; `run` may be called repeatedly
    until a task fails (the pool is then cancelled for good)."""

    def __init__(self, workers: int, on_event: Callable[[Event], None] | None = None, *,
                 context: str = "spawn", initializer: Callable | None = None,
                 initargs: tuple = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.on_event = workers, on_event or (lambda event: None)
        self._context, self._initializer, self._initargs = context, initializer, initargs
        self._executor: ProcessPoolExecutor | None = None
        self._events = self._cancel = None
        self._local = TaskContext(self.on_event, lambda: False)

    def __enter__(self) -> "TaskPool":
        if self.workers > 1:
            ctx = multiprocessing.get_context(self._context)
            self._events, self._cancel = ctx.Queue(), ctx.Event()
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker,
                initargs=(self._events, self._cancel, self._initializer, self._initargs))
        elif self._initializer is not None:
            self._initializer(*self._initargs)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)

    def close(self, cancel: bool = False) -> None:
        """Wait for every worker to exit (after cancelling what is left if `cancel`)."""
        if self._executor is None:
            return
        if cancel:
            self._cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        self._executor = None
        self._drain()
        self._events.close()
        self._events.join_thread()

    def run(self, fn: Callable[[Any, TaskContext], Any], tasks: Iterable[Any]
            ) -> Iterator[tuple[Any, Any]]:
        """(task, result) per task as they complete (in order when workers=1)."""
        if self._executor is None:
            for task in tasks:
                yield task, fn(task, self._local)
            return
        futures: dict[Future, Any] = {self._executor.submit(_call_in_worker, fn, t): t
                                      for t in tasks}
        try:
            while futures:
                done, _ = wait(futures, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                self._drain()
                for f in done:
                    task = futures.pop(f)
                    yield task, f.result()
        except BaseException:
            self._cancel.set()
            for f in futures:
                f.cancel()
            wait(futures)  # running tasks see the cancel flag and stop
            self._drain()
            raise

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self.on_event(event)
