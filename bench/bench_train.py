"""Benchmark: samples/s of the whole Ray Data -> Ray Train path against the bare loop.

- bare loop (the ceiling): the same model (M5), batch, optimizer, loss and training step
  (`rayvid.train.worker.train_step`, bf16 autocast on CUDA as the worker does) in a tight
  loop over one batch already on the device (no data loading at all), in this process;
- rayvid: `rayvid.train.kfold.train_fold` on fold 0 of a prepared dataset (Ray Data reads the
  Parquet files and draws qFDA fresh every epoch; Ray Train runs the loop with DDP), with
  the training-phase samples/s each epoch reports, and the fit() overhead: the wall time
  of `fit()` minus the time the workers spent in training epochs.
Prints the ratio rayvid/bare loop (issue 3's GPU target: >= 0.5). `--use-gpu` needs CUDA
(it stops with an error without it: a CPU number is never reported as a GPU one).

    python bench/bench_train.py --ids 300                        # CPU, 1 worker
    python bench/bench_train.py --ids 300 --arch M5,multimodal,attention   # each kind vs M5
    python bench/bench_train.py --dataset DS --use-gpu --steps 3000   # a GPU host
    bench/gpu_check.sh                                           # the GPU check (see bench/README.md)
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import dataset_arg, ray_env, ratio_line, timed

ray_env()

import torch  # noqa: E402

from rayvid.config import load_config  # noqa: E402
from rayvid.model.architectures import build_model  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402
from rayvid.train.worker import (build_criterion, make_optimizer, model_kwargs,  # noqa: E402
                                 train_step, use_bf16)


def ceiling(cfg: TrainJobConfig, num_classes: int, steps: int, device: torch.device,
            arch: str = "M5", dims: tuple[int, int, int] = (512, 512, 512)) -> float:
    """Samples/s of the worker's own step (forward + loss + backward + Adam) on a resident
    batch of `arch`'s input kind: no data path. Best of 3 repeats of `steps // 3` steps,
    after a warm-up."""
    from rayvid.model.architectures import input_kind_of

    model = build_model(arch, num_classes=num_classes, **model_kwargs(cfg, arch, dims)).to(device)
    opt = make_optimizer(cfg, model)
    criterion, schedule = build_criterion(cfg, arch)
    criterion.set_weights(schedule.at(0.0))
    b, chunk = cfg.optim.batch_size, max(1, steps // 3)
    kind, k = input_kind_of(arch), cfg.inputs.face_set_size
    if kind == "face_set":
        x = (torch.randn(b, k, 514, device=device), torch.ones(b, k, dtype=torch.bool, device=device))
    elif kind == "multimodal":
        x = (torch.randn(b, 512 + sum(dims), device=device) / 22,
             torch.ones(b, 4, dtype=torch.bool, device=device))
    else:
        x = torch.randn(b, 512, device=device) * 5
    y = torch.randint(0, num_classes, (b,), device=device)
    bf16 = use_bf16(cfg, device)

    def run() -> None:
        for _ in range(chunk):
            train_step(model, opt, criterion, x, y, bf16)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return chunk * b / timed(run, repeats=3, warmup=1, sync=sync).best_wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", help="a prepared dataset (default: simulate --ids and prepare)")
    p.add_argument("--ids", type=int, default=300, help="identities to simulate without --dataset")
    p.add_argument("--faces-per-clip", type=float, default=None, help="default: the simulator's")
    p.add_argument("--work", help="keep the simulated release and dataset here (reused on a rerun)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of the Ray run")
    p.add_argument("--ceiling-steps", type=int, default=300, help="steps of the bare loop")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true", help="train on CUDA (an error without it)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--json", help="also write the result here (JSON)")
    p.add_argument("--set", action="append", default=[], help="extra config override")
    p.add_argument("--arch", default="M5", help="architecture(s), comma-separated: each is "
                   "measured in turn, and the table compares their Ray rates with the first's")
    args = p.parse_args()
    if args.use_gpu and not torch.cuda.is_available():
        sys.exit("--use-gpu: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    ds = dataset_arg(args.dataset, args.ids, args.work, args.faces_per_clip)
    from rayvid.release.schema import read_meta

    num_classes = read_meta(ds)["num_classes"]
    cfg = load_config(TrainJobConfig, None, [
        "openset.noise=none", f"data.dataset={ds}", "folds.run=[0]", f"optim.min_steps={args.steps}",
        f"optim.max_steps={args.steps}", f"train.epochs={args.epochs}",
        f"train.num_workers={args.num_workers}", f"train.use_gpu={str(args.use_gpu).lower()}",
        *args.set])
    device = torch.device("cuda" if args.use_gpu else "cpu")
    if device.type == "cpu":  # one Ray Train CPU worker gets one thread's worth of cores
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker or 1)))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    from rayvid.train.kfold import dataset_dims

    dims = dataset_dims(read_meta(ds))
    archs = [a for a in args.arch.split(",") if a]
    results = []
    for arch in archs:
        top = ceiling(cfg, num_classes, args.ceiling_steps, device, arch, dims)
        print(f"bare loop on {name}, {arch}: {top:,.0f} samples/s", flush=True)
        out = {"dataset": ds, "arch": arch, "num_classes": num_classes, "device": device.type,
               "device_name": name, "bf16": use_bf16(cfg, device),
               **ray_run(cfg, ds, args.num_cpus, arch), "ceiling_samples_per_s": round(top)}
        out["ratio"] = round(out["rayvid_samples_per_s_last_epoch"] / top, 3)
        print(json.dumps(out, indent=2))
        results.append(out)
        print(f"\n{name} ({device.type}), {cfg.train.num_workers} worker(s), {arch}, "
              f"C={num_classes}, batch {cfg.optim.batch_size}, bf16 {out['bf16']}: fit() "
              f"{out['fit_wall_s']} s of which training {out['train_s']} s: overhead "
              f"{out['fit_overhead_s']} s")
        ratio_line(f"training samples/s, {device.type}, {arch}",
                   out["rayvid_samples_per_s_last_epoch"], top, "samples/s", target=0.5,
                   names=("ray", "bare"))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
        tmp.replace(args.json)
    if len(results) > 1:
        first = results[0]
        for r in results[1:]:
            ratio_line(f"Ray Data -> Ray Train samples/s, {r['arch']} vs {first['arch']}",
                       r["rayvid_samples_per_s_last_epoch"],
                       first["rayvid_samples_per_s_last_epoch"], "samples/s",
                       names=(r["arch"], first["arch"]))
    return 0


def ray_run(cfg: TrainJobConfig, ds: str, num_cpus: int | None, arch: str = "M5") -> dict:
    """Fold 0 of `arch` through Ray Data -> Ray Train; its samples/s and fit() overhead."""
    import ray

    from rayvid.train.kfold import train_fold

    address = os.environ.get("RAY_ADDRESS") or "local"  # a fresh local Ray unless told
    ray.init(address=address, num_cpus=num_cpus if address == "local" else None,
             logging_level="WARNING")
    with tempfile.TemporaryDirectory(prefix="rayvid-bench-train-") as run:
        t0 = time.perf_counter()
        result = train_fold(cfg, ds, run, 0, arch)
        wall = time.perf_counter() - t0
    ray.shutdown()
    hist, b, world = result["history"], cfg.optim.batch_size, cfg.train.num_workers
    rates = [h["samples_per_s"] for h in hist]  # per worker, training phase of each epoch
    steps_per_epoch = [hist[0]["step"]] + [c["step"] - a["step"] for a, c in zip(hist, hist[1:])]
    train_s = sum(n * b / r for n, r in zip(steps_per_epoch, rates))
    return {"workers": world, "batch": b, "steps": hist[-1]["step"],
            "samples": hist[-1]["step"] * b * world,
            "rayvid_samples_per_s_last_epoch": round(rates[-1] * world),
            "rayvid_samples_per_s_per_epoch": [round(r) for r in rates],
            "fit_wall_s": round(wall, 1), "train_s": round(train_s, 1),
            "fit_overhead_s": round(wall - train_s, 1), "fold_map": result["best_map"]}


if __name__ == "__main__":
    sys.exit(main())
