"""The benchmarks' one copy of their set-up: the checkout on `sys.path`, quiet Ray, a
simulated and prepared dataset, child processes with their peak RSS, timing with repeats
(wall and this process's CPU), and the ratio line every benchmark ends with.

    from _common import REPO, dataset_arg, ray_env, ratio_line, timed

Imported by the scripts in bench/ (run as `python bench/NAME.py`, so bench/ is on the path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # rayvid from this checkout, installed or not
    sys.path.insert(0, str(REPO))
MiB = 1 << 20


def ray_env() -> None:
    """Before `ray.init`: Ray workers import rayvid from this checkout, and Ray's logs and
    Ray Data's progress bars stay off a benchmark's console."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(filter(None, [str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def one_blas_thread():
    """A context with one BLAS thread: OpenBLAS threads spinning on a busy small box slow the
    simulator ~50x. A no-op where threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1)


def simulate(out: Path, ids: int, faces_per_clip: float | None = None, seed: int = 0) -> int:
    """Simulate a release of `ids` identities into `out` (official layout); its size in bytes."""
    from rayvid.release.simulator import simulate_release

    params = {} if faces_per_clip is None else {"faces_per_clip": faces_per_clip}
    with one_blas_thread():
        return simulate_release(out, ids=ids, seed=seed, **params)["bytes"]


def prepared_dataset(work: Path, ids: int, faces_per_clip: float | None = None) -> tuple[Path, Path]:
    """(WORK/release, WORK/dataset): simulated and prepared unless a previous run left them."""
    from rayvid.release.prepare import prepare_release
    from rayvid.release.schema import META_FILE

    release, dataset = Path(work) / "release", Path(work) / "dataset"
    if not (release / "val_gt.txt").exists():
        t0 = time.perf_counter()
        shutil.rmtree(release, ignore_errors=True)  # a half-written one from a killed run
        simulate(release, ids, faces_per_clip)
        print(f"simulated {ids} ids in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (dataset / META_FILE).exists():
        t0 = time.perf_counter()
        prepare_release(release, dataset)
        print(f"prepared {dataset} in {time.perf_counter() - t0:.0f} s", flush=True)
    return release, dataset


def dataset_arg(dataset: str | None, ids: int, work: str | None = None,
                faces_per_clip: float | None = None) -> str:
    """`--dataset` when given; else WORK/dataset (reused) or one in a new temp folder."""
    if dataset:
        return dataset
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="rayvid-bench-"))
    return str(prepared_dataset(root, ids, faces_per_clip)[1])


def run_child(cmd: list[str], cwd: Path = REPO) -> tuple[str, int, float]:
    """Run `cmd`; (stdout + stderr, peak RSS bytes of it and its reaped children, wall s).
    Exits naming the command when it fails."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=cwd)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({code}):\n{output}")
    return output, usage.ru_maxrss * 1024, wall


@dataclass
class Timing:
    """Seconds of each timed repeat: wall (`perf_counter`) and this process's CPU
    (`process_time`: robust to other load on a shared machine, blind to other processes
    and to a GPU). `result`: the last repeat's return value."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def best_wall(self) -> float:
        return min(self.wall)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu)

    @property
    def total_wall(self) -> float:
        return sum(self.wall)


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0,
          sync: Callable[[], None] | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed.
    sync: called before each clock read (e.g. `torch.cuda.synchronize`, so a repeat
    includes the GPU work it queued)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    out = Timing()
    for _ in range(repeats):
        sync()
        w, c = time.perf_counter(), time.process_time()
        out.result = fn()
        sync()
        out.wall.append(time.perf_counter() - w)
        out.cpu.append(time.process_time() - c)
    return out


def ratio_line(what: str, ours: float, baseline: float, unit: str,
               target: float | None = None, names: tuple[str, str] = ("rayvid", "baseline")) -> str:
    """One comparable line: both rates, their ratio and the target; printed and returned.
    Rates are higher-is-better (samples/s, faces/s); the ratio is ours / baseline."""
    ratio = ours / baseline if baseline else float("nan")
    verdict = "" if target is None else \
        f"  (target >= {target:g}: {'met' if ratio >= target else 'not met'})"
    line = (f"{what}: {names[0]} {ours:,.0f} {unit} vs {names[1]} {baseline:,.0f} {unit}: "
            f"ratio {names[0]}/{names[1]} {ratio:.3f}{verdict}")
    print(line, flush=True)
    return line
