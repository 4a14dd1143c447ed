"""Benchmark: samples/s of the whole Ray Data -> Ray Train path against the bare ceiling.

- ceiling: the same model (M5), batch, optimizer and loss in a tight loop over one tensor
  already on the device (no data loading at all), in this process;
- rayvid: `rayvid.train.kfold.train_fold` on fold 0 of a prepared dataset (Ray Data reads the
  Parquet files and draws qFDA fresh every epoch; Ray Train runs the loop with DDP), with
  the training-phase samples/s each epoch reports, and the fit() overhead: the wall time
  of `fit()` minus the time the workers spent in training epochs.
Prints the ratio rayvid/ceiling (issue 3's GPU target: >= 0.5).

    python bench/bench_train.py --ids 300                        # CPU, 1 worker
    python bench/bench_train.py --dataset DS --use-gpu --steps 3000   # an H100 host
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_pipeline import dataset_dir  # noqa: E402  (simulate + prepare when no --dataset)
from rayvid.config import load_config  # noqa: E402
from rayvid.model.architectures import build_model  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402
from rayvid.train.worker import build_criterion, model_kwargs  # noqa: E402


def ceiling(cfg: TrainJobConfig, num_classes: int, steps: int, device: str) -> float:
    """Samples/s of forward + loss + backward + Adam on a resident batch (no data path)."""
    model = build_model("M5", num_classes=num_classes, **model_kwargs(cfg, "M5")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    criterion, schedule = build_criterion(cfg)
    criterion.set_weights(schedule.at(0.0))
    b = cfg.optim.batch_size
    x = torch.randn(b, 512, device=device) * 5
    y = torch.randint(0, num_classes, (b,), device=device)
    bf16 = device == "cuda" and cfg.train.bf16

    def step():
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu",
                            dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = criterion(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(min(20, steps)):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset")
    p.add_argument("--ids", type=int, default=300)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of the Ray run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="extra config override")
    args = p.parse_args()
    ds = dataset_dir(args)
    from rayvid.release.schema import read_meta

    num_classes = read_meta(ds)["num_classes"]
    cfg = load_config(TrainJobConfig, None, [
        f"data.dataset={ds}", "folds.run=[0]", f"optim.min_steps={args.steps}",
        f"optim.max_steps={args.steps}", f"train.epochs={args.epochs}",
        f"train.num_workers={args.num_workers}", f"train.use_gpu={str(args.use_gpu).lower()}",
        *args.set])
    device = "cuda" if args.use_gpu else "cpu"
    if device == "cpu":  # one Ray Train CPU worker gets one thread's worth of cores
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    top = ceiling(cfg, num_classes, min(args.steps, 300), device)

    import ray

    from rayvid.train.kfold import train_fold

    ray.init(num_cpus=args.num_cpus, logging_level="WARNING")
    with tempfile.TemporaryDirectory(prefix="rayvid-bench-train-") as run:
        t0 = time.perf_counter()
        result = train_fold(cfg, ds, run, 0, "M5")
        wall = time.perf_counter() - t0
    ray.shutdown()
    hist = result["history"]
    steps = hist[-1]["step"]
    samples = steps * cfg.optim.batch_size * cfg.train.num_workers
    rates = [h["samples_per_s"] for h in hist]  # per worker, training phase of each epoch
    train_s = sum(steps_e * cfg.optim.batch_size / r for steps_e, r in
                  zip([hist[0]["step"]] + [b["step"] - a["step"] for a, b in zip(hist, hist[1:])],
                      rates))
    steady = rates[-1] * cfg.train.num_workers
    out = {"dataset": ds, "num_classes": num_classes, "device": device,
           "workers": cfg.train.num_workers, "batch": cfg.optim.batch_size, "steps": steps,
           "ceiling_samples_per_s": round(top), "rayvid_samples_per_s_last_epoch": round(steady),
           "rayvid_samples_per_s_per_epoch": [round(r) for r in rates],
           "ratio": round(steady / top, 3), "fit_wall_s": round(wall, 1),
           "train_s": round(train_s, 1), "fit_overhead_s": round(wall - train_s, 1),
           "samples": samples, "fold_map": result["best_map"]}
    print(json.dumps(out, indent=2))
    print(f"\n{device}, {cfg.train.num_workers} worker(s), M5, C={num_classes}, batch "
          f"{cfg.optim.batch_size}: ceiling {top:,.0f} samples/s; Ray Data -> Ray Train "
          f"{steady:,.0f} samples/s (last epoch): ratio {steady / top:.2f}. fit() {wall:.1f} s "
          f"of which training {train_s:.1f} s: overhead {wall - train_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
