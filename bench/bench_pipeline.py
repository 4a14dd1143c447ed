"""Benchmark: the Ray Data training pipeline against a bare loop of the same numpy code.

Both read the same Parquet files and apply the same `rayvid.data.pipeline.ClipTransform`
(fold filter -> gate -> drop empty -> qFDA) and hand out batches of 512 training samples:
- bare: `pyarrow.parquet.ParquetFile.iter_batches` -> transform -> re-batch, one process;
- ray:  `read_parquet -> map_batches(transform) -> iter_batches(512)`, streaming.
Throughput is samples/s per epoch after one warm-up epoch; the ratio ray/bare is the
number to read (target >= 0.5).

    python bench/bench_pipeline.py [--dataset DS | --ids 300] [--epochs 2] [--num-cpus 2]
"""

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from rayvid.data import pipeline as rdata  # noqa: E402

BATCH = 512


def transform(repeats: int) -> rdata.ClipTransform:
    return rdata.ClipTransform(mode="qfda", gate=(0.7, 25.0), folds=(5, 0, "train"),
                               drop_empty=True, repeats=repeats)


def bare_epoch(files: list[str], tf: rdata.ClipTransform) -> int:
    columns = rdata.KEY_COLUMNS + rdata.FACE_COLUMNS
    rows, pending = 0, 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=columns):
            out = tf(pa.Table.from_batches([rb]))
            pending += len(out["y"])
            while pending >= BATCH:  # hand out full batches, as a trainer would consume
                pending -= BATCH
                rows += BATCH
    return rows + pending


def ray_epoch(ds) -> int:
    return sum(len(b["y"]) for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy"))


def timed(fn, epochs: int) -> float:
    fn()  # warm-up epoch (imports, worker start-up)
    t0, rows = time.perf_counter(), 0
    for _ in range(epochs):
        rows += fn()
    return rows / (time.perf_counter() - t0)


def dataset_dir(args) -> str:
    if args.dataset:
        return args.dataset
    from rayvid.release.prepare import prepare_release
    from rayvid.release.simulator import simulate_release

    tmp = Path(tempfile.mkdtemp(prefix="rayvid-bench-"))
    simulate_release(tmp / "release", args.ids, seed=0)
    prepare_release(tmp / "release", tmp / "dataset")
    return str(tmp / "dataset")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset")
    p.add_argument("--ids", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="qFDA samples per clip per epoch")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = p.parse_args()
    ds_dir = dataset_dir(args)
    files = rdata.split_paths(ds_dir, ["train"])
    tf = transform(args.repeats)
    bare = timed(lambda: bare_epoch(files, tf), args.epochs)

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, logging_level="ERROR", log_to_driver=False)
    ds = rdata.clip_dataset(ds_dir, ["train"], tf, shuffle=True, batch_size=BATCH)
    through_ray = timed(lambda: ray_epoch(ds), args.epochs)
    ray.shutdown()
    n_files = len(glob.glob(f"{ds_dir}/train/*.parquet"))
    print(f"dataset {ds_dir} ({n_files} train files), {args.num_cpus} CPUs, batch {BATCH}")
    print(f"bare numpy loop : {bare:>10,.0f} samples/s")
    print(f"Ray Data        : {through_ray:>10,.0f} samples/s")
    print(f"ratio ray/bare  : {through_ray / bare:.2f}  (target >= 0.50)")


if __name__ == "__main__":
    main()
