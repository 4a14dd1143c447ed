"""Benchmark: prepare's peak memory must not grow with the release (external hash join).

    python bench/bench_prepare_rss.py                     # 150 and 600 ids, ~10 min on 2 cores
    python bench/bench_prepare_rss.py --ids 40 --faces-per-clip 6   # a quick look
    python bench/bench_prepare_rss.py --workers 1                   # all in one process

Simulates releases of `--ids` and `--scale` x `--ids` identities (default faces per clip,
like the real release) in a temp dir, runs `jobs/prepare.py` on each in a fresh
subprocess (`--workers`, default the job's), and prints per size: release MB, clips, faces,
seconds, clips/s, faces/s and the peak RSS of the largest process (ru_maxrss from os.wait4
covers the job and its reaped workers), then the peak RSS ratio largest/1x (target <= 1.2:
memory is bounded per process). A benchmark, not a test; `bench/bench_prepare.py` measures
speed against stock pickle.load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, MiB, run_child, simulate

from rayvid.release.schema import META_FILE


def prepare_in_child(release: Path, out: Path, bucket_mib: int,
                     workers: int | None) -> tuple[dict, int, float]:
    """Run jobs/prepare.py in a fresh process: (meta, peak RSS bytes, wall seconds)."""
    cmd = [sys.executable, str(REPO / "jobs" / "prepare.py"), "--release", str(release),
           "--out", str(out), "--bucket-mib", str(bucket_mib)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    _, rss, wall = run_child(cmd)
    return json.loads((out / META_FILE).read_text()), rss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=150, help="identities of the 1x release")
    ap.add_argument("--scale", type=int, default=4, help="size of the large release, in x")
    ap.add_argument("--faces-per-clip", type=float, default=None, help="default: the simulator's")
    ap.add_argument("--bucket-mib", type=int, default=64, help="prepare's spill bucket size")
    ap.add_argument("--workdir", help="where to simulate (default: a temp dir, removed)")
    ap.add_argument("--workers", type=int, default=None, help="default: the job's default")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayvid-bench-prepare-"))
    rows = []
    try:
        for scale in (1, args.scale):
            ids = args.ids * scale
            release, out = work / f"release-{ids}", work / f"dataset-{ids}"
            t0 = time.perf_counter()
            size = simulate(release, ids, args.faces_per_clip)
            secs = time.perf_counter() - t0
            print(f"simulated {ids} ids: {size / MiB:.0f} MB in {secs:.0f} s", flush=True)
            meta, rss, wall = prepare_in_child(release, out, args.bucket_mib, args.workers)
            splits = meta["splits"].values()
            clips, faces = sum(s["clips"] for s in splits), sum(s["faces"] for s in splits)
            rows.append((f"{scale}x", ids, size / MiB, clips, faces, max(meta["buckets"].values()),
                         meta["seconds"], clips / meta["seconds"], faces / meta["seconds"],
                         rss / MiB, wall))
            shutil.rmtree(out)
            shutil.rmtree(release)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    head = ("size", "ids", "release MB", "clips", "faces", "buckets", "prepare s", "clips/s",
            "faces/s", "peak RSS MiB", "process s")
    fmt = "{:>5} {:>5} {:>10.0f} {:>7} {:>8} {:>7} {:>9.1f} {:>8.0f} {:>8.0f} {:>12.0f} {:>9.1f}"
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 5, 10, 7, 8, 7, 9, 8, 8, 12, 9))))
    for row in rows:
        print(fmt.format(*row))
    ratio = rows[-1][9] / rows[0][9]
    grown = rows[-1][2] / rows[0][2]
    print(f"peak RSS {rows[-1][0]}/1x: {ratio:.2f} (target <= 1.2) for a {grown:.1f}x larger "
          f"release; bucket {args.bucket_mib} MiB; {meta.get('workers', 1)} worker(s)")


if __name__ == "__main__":
    main()
