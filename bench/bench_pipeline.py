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

from _common import dataset_arg, ray_env, ratio_line, timed

ray_env()

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


def samples_per_s(epoch, epochs: int) -> float:
    """Samples/s over `epochs` timed epochs after a warm-up one (imports, worker start-up)."""
    t = timed(epoch, repeats=epochs, warmup=1)
    return t.result * epochs / t.total_wall  # every epoch hands out the same samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset")
    p.add_argument("--ids", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="qFDA samples per clip per epoch")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = p.parse_args()
    ds_dir = dataset_arg(args.dataset, args.ids)
    files = rdata.split_paths(ds_dir, ["train"])
    tf = transform(args.repeats)
    bare = samples_per_s(lambda: bare_epoch(files, tf), args.epochs)

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, logging_level="ERROR", log_to_driver=False)
    ds = rdata.clip_dataset(ds_dir, ["train"], tf, shuffle=True, batch_size=BATCH)
    through_ray = samples_per_s(lambda: ray_epoch(ds), args.epochs)
    ray.shutdown()
    n_files = len(glob.glob(f"{ds_dir}/train/*.parquet"))
    print(f"dataset {ds_dir} ({n_files} train files), {args.num_cpus} CPUs, batch {BATCH}")
    ratio_line("training read path", through_ray, bare, "samples/s", target=0.5,
               names=("ray", "bare"))


if __name__ == "__main__":
    main()
