"""Benchmark: vectorised qFF (rayvid.core.fusion.qff) against a per-clip Python loop.

The baseline is the shape of the 4th place's inference code: for every clip, loop over its
face items (as the pickle gives them: [frame, bbox, det, quality, feat]), weight each face
by q * d * W(q), accumulate, divide. Both run single-threaded in this process on the same
faces; times are this process's CPU seconds (`process_time`, best of `--repeats`: other
load on a shared machine barely moves them); the ratio is what to read.

    python bench/bench_qff.py [--clips 20000] [--repeats 3]
"""

import argparse
import os

from _common import ratio_line, timed

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per core: process_time then is one core's time

import numpy as np  # noqa: E402

from rayvid.core import fusion  # noqa: E402


def band(q: float) -> float:
    return 0.0 if q < 0 else 0.2 if q < 20 else 0.3 if q < 30 else 0.6 if q < 40 else 1.0


def per_clip_loop(clips: list) -> np.ndarray:
    """The per-clip, per-face loop (their inference code's structure)."""
    out = np.zeros((len(clips), 512), np.float32)
    for c, faces in enumerate(clips):
        acc, total = np.zeros(512, np.float32), 0.0
        for _frame, _bbox, det, q, feat in faces:
            w = q * det * band(q)
            acc += w * feat.astype(np.float32)
            total += w
        if total > 0:
            out[c] = acc / total
        elif faces:
            out[c] = np.mean([f[4].astype(np.float32) for f in faces], axis=0)
    return out


def make(n_clips: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.lognormal(3.0, 0.8, n_clips).astype(np.int64), 500)
    offsets = fusion.offsets_from_counts(counts)
    n = int(offsets[-1])
    feat = (rng.standard_normal((n, 512)) * 2).astype(np.float16)
    det = rng.uniform(0.5, 1.0, n).astype(np.float32)
    quality = rng.gamma(4.0, 10.0, n).astype(np.float32) - 10
    clips = [[(b"0", [0, 0, 1, 1], float(det[i]), float(quality[i]), feat[i])
              for i in range(offsets[c], offsets[c + 1])] for c in range(n_clips)]
    return feat, det, quality, offsets, clips


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=20000)
    p.add_argument("--loop-clips", type=int, default=2000, help="the loop is slow: a subset")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    feat, det, quality, offsets, clips = make(args.clips)
    n_faces = int(offsets[-1])
    vec = timed(lambda: fusion.qff(feat, det, quality, offsets), args.repeats)
    m = args.loop_clips
    loop = timed(lambda: per_clip_loop(clips[:m]), 1)
    (t_vec, fused), (t_loop, looped) = (vec.best_cpu, vec.result), (loop.best_cpu, loop.result)
    loop_faces = int(offsets[m])
    np.testing.assert_allclose(looped, fused[0][:m], rtol=1e-3, atol=1e-3)  # same function
    vec_rate, loop_rate = n_faces / t_vec, loop_faces / t_loop
    print(f"qFF vectorised : {n_faces:>10,} faces in {t_vec:7.3f} s = {vec_rate / 1e6:6.2f} M faces/s")
    print(f"per-clip loop  : {loop_faces:>10,} faces in {t_loop:7.3f} s = {loop_rate / 1e6:6.3f} M faces/s")
    ratio_line("qFF, single thread, same faces, same result", vec_rate, loop_rate, "faces/s",
               names=("vectorised", "loop"))


if __name__ == "__main__":
    main()
