"""Benchmark: rayvid's restricted streaming pickle reader against stock ``pickle.load``.

    python bench/bench_pickle_reader.py                    # a 1.7M-face split, CPython protocol 2
    python bench/bench_pickle_reader.py --faces 200000     # a quick look
    python bench/bench_pickle_reader.py --release DIR      # every pickle of a release folder

Writes (or takes) pickles, then reads each one in a fresh child process twice, in the same
run: the baseline ``pickle.load(f, encoding="bytes")`` (benchmarks may run it on files they
wrote themselves; rayvid never does) and ``rayvid.release.pickle_reader.iter_dict_items`` (reference
scan + walk, items dropped as they come, as prepare does). Prints faces (or items) per
second of each, the ratio rayvid/stock, and the peak RSS of each child (VmHWM).
The generated split has the release's shape: 60,566 clips, ~28 faces each with a 512-d
float16 feature, 1-4 digit frame strings, pickled by CPython's C pickler at protocol 2
(bytes as ``_codecs.encode``, numpy's typecode ``b'b'`` memoized once and fetched by every
later array: the case that broke the old reader).
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, MiB

_CHILD = r"""
import json, os, pickle, sys, time
sys.path.insert(0, {repo!r})
path, how = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if how == "stock":
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    items = len(obj)
    faces = sum(len(v) if isinstance(v, list) else 1 for v in obj.values())
else:
    from rayvid.release.pickle_reader import WalkStats, iter_dict_items
    stats, items, faces = WalkStats(), 0, 0
    for _, v in iter_dict_items(path, stats=stats):
        items += 1
        faces += len(v) if isinstance(v, list) else 1
seconds = time.perf_counter() - t0
# VmHWM: this process image's peak RSS (ru_maxrss would include the parent's at fork)
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"items": items, "faces": faces, "seconds": seconds, "rss": rss}}))
"""


def write_split(path: Path, faces: int, clips: int, seed: int = 0) -> None:
    """A release-shaped face split pickled by CPython's C pickler at protocol 2."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(faces, np.full(clips, 1.0 / clips))
    feats = rng.standard_normal((min(faces, 4096), 512)).astype(np.float16)
    d, k = {}, 0
    for c, n in enumerate(counts):
        clip = []
        for i in range(n):
            frame = str(int(rng.integers(1, 3000))).encode()
            clip.append([frame, [int(x) for x in rng.integers(0, 1920, 4)], 0.99, 40.0 + i,
                         feats[k % len(feats)].copy()])  # a distinct array object each
            k += 1
        d[b"IQIYI_VID_TRAIN_%07d" % c] = clip
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def read_in_child(path: Path, how: str) -> dict:
    import json

    code = _CHILD.format(repo=str(REPO))
    res = subprocess.run([sys.executable, "-c", code, str(path), how], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{how} read of {path} failed:\n{res.stderr}")
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=1_700_000, help="faces in the generated split")
    ap.add_argument("--clips", type=int, default=60_566)
    ap.add_argument("--release", help="read every pickle of this folder instead")
    ap.add_argument("--workdir", help="where to write the generated split (default: temp)")
    args = ap.parse_args()
    if args.release:
        paths = sorted(Path(args.release).glob("*.pickle"))
        work = None
    else:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="rayvid-bench-pickle-"))
        paths = [work / "face_train_cpython_p2.pickle"]
        t0 = time.perf_counter()
        write_split(paths[0], args.faces, args.clips)
        print(f"wrote {paths[0]} ({paths[0].stat().st_size / MiB:.0f} MiB, {args.faces} faces) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    head = f"{'file':28} {'MiB':>6} {'items':>7} {'faces':>8} {'stock s':>8} {'rayvid s':>8} " \
           f"{'ratio':>6} {'stock RSS':>10} {'rayvid RSS':>10}"
    print(head)
    totals = np.zeros(2)
    try:
        for path in paths:
            stock, ours = read_in_child(path, "stock"), read_in_child(path, "rayvid")
            assert (stock["items"], stock["faces"]) == (ours["items"], ours["faces"]), path
            totals += (stock["seconds"], ours["seconds"])
            print(f"{path.name:28} {path.stat().st_size / MiB:6.0f} {ours['items']:7d} "
                  f"{ours['faces']:8d} {stock['seconds']:8.2f} {ours['seconds']:8.2f} "
                  f"{stock['seconds'] / ours['seconds']:6.2f} {stock['rss'] / MiB:9.0f}M "
                  f"{ours['rss'] / MiB:9.0f}M", flush=True)
    finally:
        if work is not None and not args.workdir:
            for p in paths:
                p.unlink(missing_ok=True)
            os.rmdir(work)
    print(f"total: stock {totals[0]:.1f} s, rayvid {totals[1]:.1f} s, "
          f"ratio rayvid/stock speed {totals[0] / totals[1]:.2f}")


if __name__ == "__main__":
    main()
