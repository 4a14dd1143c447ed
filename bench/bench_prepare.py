"""Benchmark: `jobs/prepare.py` against stock `pickle.load` of the same 12 pickles, same run.

    python bench/bench_prepare.py --release /tmp/rv/sim1000          # an existing release
    python bench/bench_prepare.py --ids 100                           # simulate one in a temp dir
    python bench/bench_prepare.py --release R --workers 1,default     # which prepare runs

The baseline: a fresh subprocess runs stock `pickle.load(f, encoding="bytes")` on each of
the release's 12 pickles in turn (loads timed, interpreter start not counted; stock pickle
is fine here because rayvid's own simulator wrote the files). Then `jobs/prepare.py` runs
in a fresh subprocess per `--workers` entry (`default`: no `--workers` flag, the job's own
default), timed as the whole process (interpreter, imports and worker start-up included).
Printed per row: seconds, faces/s, the ratio prepare/pickle.load in faces/s (target >= 0.5,
never below 0.26), and peak RSS: the process and its reaped descendants (`os.wait4`), and
the parent and children as prepare's meta reports them. Outputs go to `--out-dir` (default:
a temp dir), removed at the end unless `--keep`. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, MiB, run_child, simulate

from rayvid.release.layout import Release
from rayvid.release.schema import META_FILE

_LOAD_ALL = r"""
import json, pickle, sys, time
out = {}
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        d = pickle.load(f, encoding="bytes")
        out[path] = time.perf_counter() - t0
    del d
print(json.dumps(out))
"""


def pickle_baseline(release: Release) -> tuple[float, int, dict[str, float]]:
    """(seconds of the 12 loads, peak RSS bytes, {file: seconds})."""
    paths = [str(p) for ms in release.pickles.values() for p in ms.values()]
    output, rss, _ = run_child([sys.executable, "-c", _LOAD_ALL, *paths])
    per_file = json.loads(output.strip().splitlines()[-1])
    return sum(per_file.values()), rss, {Path(p).name: s for p, s in per_file.items()}


def prepare(release: Path, out: Path, workers: str, bucket_mib: int) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "prepare.py"), "--release", str(release),
           "--out", str(out), "--force", "--bucket-mib", str(bucket_mib)]
    if workers != "default":
        cmd += ["--workers", workers]
    output, rss, wall = run_child(cmd)
    meta = json.loads((out / META_FILE).read_text())
    return {"workers": workers, "meta": meta, "rss": rss, "wall": wall, "output": output}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", help="an existing release folder (else --ids simulates one)")
    ap.add_argument("--ids", type=int, default=100, help="identities to simulate without --release")
    ap.add_argument("--faces-per-clip", type=float, default=None, help="default: the simulator's")
    ap.add_argument("--workers", default="1,default",
                    help="comma-separated --workers values to run; 'default' passes none")
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--out-dir", help="where the datasets go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared datasets")
    args = ap.parse_args()
    work = Path(args.out_dir or tempfile.mkdtemp(prefix="rayvid-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.release:
            release_dir = Path(args.release)
        else:
            release_dir = work / f"release-{args.ids}"
            t0 = time.perf_counter()
            simulate(release_dir, args.ids, args.faces_per_clip)
            print(f"simulated {args.ids} ids in {time.perf_counter() - t0:.0f} s", flush=True)
        release = Release.discover(release_dir)
        size = sum(release.split_bytes(s) for s in release.splits)
        load = os.getloadavg()[0]
        base_s, base_rss, per_file = pickle_baseline(release)
        print(f"stock pickle.load: {base_s:.1f} s for {len(per_file)} files "
              f"({size / MiB:.0f} MiB), peak RSS {base_rss / MiB:.0f} MiB", flush=True)
        rows = []
        for w in args.workers.split(","):
            row = prepare(release_dir, work / f"dataset-w{w}", w.strip(), args.bucket_mib)
            print(f"prepare --workers {w}: {row['wall']:.1f} s", flush=True)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(work / f"dataset-w{w}", ignore_errors=True)
        load_after = os.getloadavg()[0]
    finally:
        if not (args.out_dir or args.keep):
            shutil.rmtree(work, ignore_errors=True)
    faces = sum(s["faces"] for s in rows[0]["meta"]["splits"].values())
    print(f"\nrelease {release_dir}: {size / MiB:.0f} MiB, {faces} faces; "
          f"load average {load:.1f} before, {load_after:.1f} after; {os.cpu_count()} CPUs")
    head = ("run", "workers", "seconds", "faces/s", "ratio", "peak RSS MiB (wait4)",
            "parent MiB", "children MiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print(f"| stock pickle.load | - | {base_s:.1f} | {faces / base_s:,.0f} | 1.00 | "
          f"{base_rss / MiB:.0f} | | |")
    for r in rows:
        meta = r["meta"]
        parent = meta.get("peak_rss_parent_bytes", meta.get("peak_rss_bytes", 0))
        children = meta.get("peak_rss_children_bytes")
        kids = f"{children / MiB:.0f}" if children is not None else "-"
        print(f"| jobs/prepare.py | {meta.get('workers', r['workers'])} | {r['wall']:.1f} "
              f"(in-job {meta['seconds']:.1f}) | {faces / r['wall']:,.0f} | "
              f"**{base_s / r['wall']:.2f}** | {r['rss'] / MiB:.0f} | {parent / MiB:.0f} | "
              f"{kids} |")
    print("ratio = prepare faces/s / pickle.load faces/s (target >= 0.5, never below 0.26)")


if __name__ == "__main__":
    main()
