"""The jobs' console: rayvid's progress, its summary, and the warnings a person must act on.

Ray's own chatter (Train's per-report and checkpoint lines, worker and actor output, Ray
Data's INFO lines, deprecations inside Ray) stays in the log files Ray already keeps
under its session folder (`/tmp/ray/session_latest/logs` on a local Ray); errors that
stop a job still reach the console as exceptions, and Ray's own error messages (a worker
killed, out of memory) are printed by the driver as before.

    from rayvid.console import progress, ray_init_options, setup_console

    setup_console()                                     # first thing in a job's main()
    ray.init(address=..., **ray_init_options())         # jobs/ start Ray, never the library
    for item in progress(items, desc="predict", unit="clip"):
        ...

`progress` draws a tqdm bar on a terminal; anywhere else (a log file, `ray job submit`, a
test's pipe) it logs one line every `every_s` seconds and one at the end, so a captured
console stays readable. Nothing here runs at import.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"

# Loggers whose INFO lines are Ray's internals, not a person's business: WARNING and up
# still show. (`ray` is also set by `ray.init(logging_level=...)`; Ray Data reads its
# level from RAY_DATA_LOG_LEVEL, set below, when it configures its loggers.)
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "filelock")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _tqdm():
    """tqdm's class when it is installed (a dependency; absent in a bare environment)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class _ConsoleHandler(logging.StreamHandler):
    """Log lines that do not tear a tqdm bar: on a terminal they go through `tqdm.write`."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = _tqdm() if _is_terminal(self.stream) else None
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def ray_environment() -> dict[str, str]:
    """Environment settings that keep Ray's console quiet, for this process and the Ray
    processes it starts (a local Ray inherits them). A value already set wins.

    RAY_DATA_LOG_LEVEL=WARNING: Ray Data's loggers (console and ray-data.log), read when Ray
        Data configures them. Its progress bars need nothing: Ray Data draws them on a
        terminal and otherwise logs them at INFO, which this level hides. (Disabling them
        with RAY_DATA_DISABLE_PROGRESS_BARS prints a warning of its own.)
    RAY_worker_maximum_startup_concurrency: the raylet's worker start-up limit (Ray's
        config, read from the environment when a local raylet starts), at least 8. Ray
        sets it to the node's cores and warns "N PYTHON worker processes have been
        started ... Nx the maximum expected startup concurrency" every time the count
        passes another multiple of it: one Train fold starts 15-20 processes
        (controller, worker, dataset manager, Ray Data tasks), which on 2 cores printed
        that warning over and over though nothing was wrong. SkyPilot raises it for the
        same reason. A cluster's raylets are started by `ray start` and keep their own.
    """
    return {"RAY_DATA_LOG_LEVEL": "WARNING",
            "RAY_worker_maximum_startup_concurrency": str(max(8, os.cpu_count() or 1))}


def setup_console(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Configure logging and warnings for a job (call once, first thing in `main()`).

    rayvid's loggers at `level` in one format on `stream` (stderr); Ray's loggers at
    WARNING; warnings through logging, minus the deprecations raised inside Ray itself
    (a person running a job cannot act on them; those raised by rayvid's own calls into
    Ray still show). Calling it again replaces the previous setup.
    """
    stream = stream or sys.stderr
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    handler = _ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for key, value in ray_environment().items():
        os.environ.setdefault(key, value)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for a job's `ray.init`: only the driver's own output on the console.

    log_to_driver=False: worker and actor stdout/stderr (Train's controller and workers, Ray
        Data's operators, their C++ log lines) stay in the session's log files instead of
        being copied to the driver; errors still reach it as exceptions.
    logging_level: the `ray` logger of the driver, WARNING.
    """
    return {"log_to_driver": False, "logging_level": logging.WARNING}


class Progress:
    """A progress bar over `total` units (tqdm on a terminal, else periodic log lines).

    Use as an iterator wrapper (`progress(items)`), or by hand: `update(n)`, `set(done)`,
    `note(text)` for the current numbers (loss, rate), then `close()` (or a `with` block).
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", every_s: float = 10.0,
                 stream: TextIO | None = None, logger: logging.Logger | None = None):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.done, self.text = total, 0, ""
        self.log = logger or log
        self.last = time.perf_counter()
        # The rate counts from the first unit done, not from creation: a bar made before a
        # long start-up (Ray starting Train workers) would otherwise read slow for long.
        self.first: tuple[float, int] | None = None
        self.logged: int | None = None  # `done` at the last log line
        stream = stream or sys.stderr
        tqdm = _tqdm() if _is_terminal(stream) else None
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True) \
            if tqdm is not None else None
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.set(self.done + n)

    def set(self, done: int, text: str | None = None) -> None:
        """`done` units done so far; `text`: the numbers to show beside the bar."""
        step, self.done = done - self.done, done
        if text is not None:
            self.note(text)
        if self.bar is not None:
            self.bar.update(step)
            return
        now = time.perf_counter()
        if self.first is None and done > 0:
            self.first = (now, done)
        if now - self.last >= self.every_s:
            self._log_line()

    def note(self, text: str) -> None:
        """Numbers shown beside the bar (and in the log line), e.g. 'loss 0.41 lr 1e-3'."""
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """Finish the bar (or log the last line). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.logged != self.done:  # the last line said it all already
            self._log_line()

    def _log_line(self) -> None:
        self.last, self.logged = time.perf_counter(), self.done
        of = f"/{self.total}" if self.total is not None else ""
        speed = eta = ""
        if self.first is not None and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / max(time.perf_counter() - self.first[0], 1e-9)
            speed = f" ({rate:.1f} {self.unit}/s)"
            if self.total and self.done < self.total:
                eta = f" ETA {time.strftime('%H:%M:%S', time.gmtime((self.total - self.done) / rate))}"
        text = f" {self.text}" if self.text else ""
        self.log.info("%s %d%s %s%s%s%s", self.desc, self.done, of, self.unit, speed, eta, text)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", every_s: float = 10.0, stream: TextIO | None = None,
             logger: logging.Logger | None = None) -> Progress:
    """A `Progress` over `iterable` (or `total` units updated by hand); see `Progress`."""
    return Progress(iterable, total=total, desc=desc, unit=unit, every_s=every_s,
                    stream=stream, logger=logger)
