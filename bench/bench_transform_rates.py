"""Benchmark: the training and evaluation transforms' CPU cost per sample, on a prepared dataset.

    python bench/bench_transform_rates.py --dataset DS [--files 3] [--repeats 30]

For each of the M5 and multimodal inputs, `rayvid.train.kfold.transforms` (the fold's own
training transform with `--repeats` draws per clip, and the held-out qFF transform) runs
over the first `--files` Parquet files of train in this process, one 512-clip batch at a
time. Baseline, same run: reading the same batches with the same columns and nothing else.
Prints rows per CPU-second (samples for training, clips for qFF) and the ratio
transform / read (clips/s with the transform over clips/s of the read alone). These are the
per-CPU rates docs/cluster.md sizes a GPU node's Ray Data CPUs from. A benchmark, not a test.
"""

import argparse
import dataclasses
import glob
import time

import pyarrow as pa
import pyarrow.parquet as pq

from _common import REPO  # noqa: F401  (the checkout on sys.path)

from rayvid.config import load_config
from rayvid.train.config import TrainJobConfig
from rayvid.train.kfold import transforms


def run(files: list[str], columns: list[str], fn) -> tuple[int, int, float]:
    """(rows out, clips read, CPU seconds) of fn over every 512-clip batch of files."""
    rows = clips = 0
    t0 = time.process_time()
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=512, columns=columns):
            out = fn(pa.Table.from_batches([b]))
            rows += len(out["y"]) if out is not None else b.num_rows
            clips += b.num_rows
    return rows, clips, time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="a prepared dataset (jobs/prepare.py)")
    ap.add_argument("--files", type=int, default=3, help="train Parquet files to read")
    ap.add_argument("--repeats", type=int, default=30,
                    help="training draws per clip (the full recipe: 150 passes / 5 epochs)")
    args = ap.parse_args()
    cfg = load_config(TrainJobConfig, None, [])
    files = sorted(glob.glob(f"{args.dataset}/train/*.parquet"))[:args.files]
    if not files:
        raise SystemExit(f"{args.dataset}/train has no Parquet file")
    print(f"{'input':10} {'transform':12} {'rows':>8} {'clips':>7} {'CPU s':>6} "
          f"{'rows/CPU-s':>11} {'read alone clips/CPU-s':>23} {'ratio':>6}")
    for arch in ("M5", "multimodal"):
        train, heldout = transforms(cfg, 0, arch)
        for name, tf in ((f"train x{args.repeats}", dataclasses.replace(train, repeats=args.repeats)),
                         ("held-out qFF", dataclasses.replace(heldout, folds=None))):
            cols = tf.columns()
            _, read_clips, read_s = run(files, cols, lambda t: None)
            rows, clips, secs = run(files, cols, tf)
            ratio = (clips / secs) / (read_clips / read_s)
            print(f"{arch:10} {name:12} {rows:>8} {clips:>7} {secs:>6.1f} {rows / secs:>11,.0f} "
                  f"{read_clips / read_s:>23,.0f} {ratio:>6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
