"""Ray Train for one (fold, architecture): DDP over the qFDA pipeline, fold mAP each epoch.

`train_fold` plans the run on the driver (how many clips survive the gate, how many steps
the size-invariant schedule wants, how many qFDA draws per clip an epoch needs), builds
the Ray Data pipelines and runs a `TorchTrainer`. `train_loop_per_worker` is the worker
side: `prepare_model` (DDP), bf16 autocast on GPU, the staged loss and LR schedules,
validation on the held-out fold by the official metric (running top-100 per identity,
merged across ranks), a checkpoint every epoch and the best one copied to
`RUN/folds/<fold>/<arch>/best`. A dead worker restarts from the last checkpoint
(`FailureConfig`); rerunning the same command resumes a stopped run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayvid.model.checkpoints import save_checkpoint, unwrap_model
from rayvid.config import from_dict, to_dict
from rayvid.model.losses import LossSchedule, MixedLoss, OpenSetLoss
from rayvid.core.metrics import map_from_topk, score_rows
from rayvid.core.inputs import COLUMNS
from rayvid.model.architectures import COSINE_HEADS, MLP_ARCHS, build_model, input_kind_of
from rayvid.model.schedules import LRSchedule, apply
from rayvid.core.atomic import write_json
from rayvid.core.submission import TopKPerIdentity
from rayvid.release.memory import release_memory
from rayvid.train.config import TrainJobConfig

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"  # rank 0's latest step and finished epochs (see _Progress)


@dataclass(frozen=True)
class FoldPlan:
    """What one fold's run does, decided on the driver before `fit()`."""

    fold: int
    arch: str
    num_classes: int
    n_train: int
    repeats: int  # qFDA samples per clip per epoch
    epochs: int
    steps_per_epoch: int
    out_dir: str  # RUN/folds/<fold>/<arch>
    dims: tuple[int, int, int] = (512, 512, 512)  # head, body, audio feature dims

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def plan_fold(cfg: TrainJobConfig, n_train: int, num_classes: int, fold: int, arch: str,
              out_dir: Path, dims: tuple[int, int, int] = (512, 512, 512)) -> FoldPlan:
    """Size-invariant plan: total steps from `optim`, spread over `train.epochs` epochs."""
    if n_train <= 0:
        raise ValueError(f"fold {fold}: no training clip survives the gate")
    world = cfg.train.num_workers
    total = cfg.optim.total_steps(n_train, world)
    epochs = max(1, min(cfg.train.epochs, total))
    want_per_epoch = math.ceil(total / epochs)
    repeats = max(1, round(want_per_epoch * cfg.optim.batch_size * world / n_train))
    per_epoch = math.ceil(n_train * repeats / (cfg.optim.batch_size * world))
    return FoldPlan(fold, arch, num_classes, n_train, repeats, epochs, per_epoch, str(out_dir),
                    tuple(dims))


def model_kwargs(cfg: TrainJobConfig, arch: str, dims: tuple[int, int, int] = (512, 512, 512)
                 ) -> dict[str, Any]:
    """The constructor options `arch` takes from the config: the MLPs' head bias and
    dropout, the cosine heads' scale (= the margin loss's s), the attention and multimodal
    widths, and the multimodal model's head/body/audio dims (the dataset's)."""
    m = cfg.model
    if arch in MLP_ARCHS:
        kwargs: dict[str, Any] = {"head_bias": m.head_bias}
        if m.dropout is not None:
            kwargs["dropout"] = m.dropout
        return kwargs
    if arch == "cosine_mlp":
        return {"scale": cfg.loss.margin_scale}
    if arch == "attention":
        width = m.width or 128
        return {"d_model": width, "num_heads": max(1, min(8, width // 32)),
                "scale": cfg.loss.margin_scale}
    if arch == "multimodal":
        kwargs = {"head_dim": dims[0], "body_dim": dims[1], "audio_dim": dims[2],
                  "d_model": m.width or 512, "head_bias": m.head_bias}
        if m.dropout is not None:
            kwargs["dropout"] = m.dropout
        return kwargs
    return {}


def lr_schedule(cfg: TrainJobConfig) -> LRSchedule:
    o = cfg.optim
    return LRSchedule(base_lr=o.lr, kind=o.schedule, warmup_fraction=o.warmup_fraction,
                      warmup_lr=o.warmup_lr, warmup=o.warmup, step_fraction=o.step_fraction,
                      min_lr=o.min_lr)


def build_criterion(cfg: TrainJobConfig, arch: str = "M5"
                    ) -> tuple[MixedLoss | OpenSetLoss, LossSchedule]:
    """The loss mix and its schedule for `arch`: `loss.cosine_stages` for a cosine head (with
    `loss.margin_scale` and `loss.margin`), else `loss.stages`; wrapped in the `openset`
    recipe (`OpenSetLoss`: noise as class 0, the UIR term, or both) when one is on."""
    stages = cfg.loss.cosine_stages if arch in COSINE_HEADS else cfg.loss.stages
    schedule = LossSchedule([(s.start, s.weights) for s in stages])
    options: dict[str, dict[str, float]] = {}
    if "uir" in schedule.names:
        options["uir"] = {"lam": cfg.loss.uir_lambda}
    for name in ("arcface", "cosface"):
        if name in schedule.names:
            options[name] = {"s": cfg.loss.margin_scale}
            if cfg.loss.margin is not None:
                options[name]["m"] = cfg.loss.margin
    if "margin" in schedule.names:
        options["margin"] = {"s": cfg.loss.margin_scale}
    mix = MixedLoss({n: 1.0 for n in schedule.names}, options or None)
    o = cfg.openset
    if o.noise == "none":
        return mix, schedule
    scale = cfg.loss.margin_scale if arch in COSINE_HEADS else 1.0
    return OpenSetLoss(mix, o.noise, o.uir_weight, o.uir_start, scale), schedule


def input_columns(arch: str) -> tuple[str, ...]:
    """The batch columns `arch`'s forward takes, in order (`rayvid.core.inputs.COLUMNS`)."""
    return COLUMNS[input_kind_of(arch)]


# How each input column is handed to the model (face sets travel as float16).
COLUMN_DTYPES = {"x": torch.float32, "faces": torch.float32, "face_mask": torch.bool,
                 "mm": torch.float32, "mm_mask": torch.bool, "y": torch.int64}


def make_optimizer(cfg: TrainJobConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The `optim` section's optimizer over `model`'s parameters."""
    return torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def use_bf16(cfg: TrainJobConfig, device: torch.device) -> bool:
    """bf16 autocast: when the config asks for it (`train.bf16`) and only on CUDA."""
    return cfg.train.bf16 and device.type == "cuda"


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, criterion: MixedLoss,
               x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor,
               bf16: bool) -> torch.Tensor:
    """One optimizer step, the worker's and the benchmarks' own: forward under bf16
    autocast when `bf16`, the loss on float32 logits, backward, `opt.step()`.

    x: the model's inputs on its device: (batch, 512) float32 clip features, or a tuple
    (features, mask) for face-set and multimodal models; y: (batch,) int64 labels.
    Returns the loss, detached and left on the device (no host sync per step).
    """
    args = x if isinstance(x, tuple) else (x,)
    with torch.autocast(device_type=y.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(*args)
    loss = criterion(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the latest Ray checkpoint (after a failure or on a rerun), else a fresh state."""
    import ray.train

    state = {"epoch": 0, "step": 0, "best_map": -1.0, "history": [], "restores": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        unwrap_model(model).load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu"))
        saved = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    opt.load_state_dict(saved.pop("optimizer"))
    state.update(saved)
    state["restores"] = state.get("restores", []) + [state["epoch"]]  # resumed after epoch N
    log.info("resumed from checkpoint at epoch %d, step %d", state["epoch"], state["step"])
    return state


def evaluate(model: torch.nn.Module, shard, num_classes: int, device: torch.device,
             columns: tuple[str, ...] = ("x",)) -> dict:
    """Fold mAP (official metric) and top-1 accuracy on this rank's held-out shard, merged
    across ranks: each rank keeps a running top-100 per identity, never a score matrix."""
    import torch.distributed as dist
    from ray.train import get_context

    rank, world = get_context().get_world_rank(), get_context().get_world_size()
    topk, index, labels, correct, n, pos = TopKPerIdentity(num_classes), [], [], 0, 0, 0
    model.eval()
    with torch.inference_mode():
        # Every rank is handed the whole (materialized) held-out set, not a split of it: a
        # streaming split into equal parts would drop up to world - 1 clips. Rank r scores
        # batches r, r + world, ...; a clip's index is its position in the set.
        # rows per batch bounded by the (rows, C) score block: the same memory at 10,035
        # identities as at 1,000 (score_rows)
        for i, b in enumerate(shard.iter_batches(batch_size=score_rows(num_classes, 2048),
                                                 batch_format="numpy")):
            start, pos = pos, pos + len(b["y"])
            if i % world != rank:
                continue
            args = [torch.from_numpy(np.asarray(b[c])).to(device, COLUMN_DTYPES[c])
                    for c in columns]
            scores = unwrap_model(model).score_outputs(model(*args)).cpu().numpy()
            idx = np.arange(start, pos, dtype=np.int64)
            topk.update(idx, scores)
            index.append(idx), labels.append(b["y"])
            correct += int((scores.argmax(1) == b["y"]).sum())
            n += len(scores)
    release_memory()
    local = (topk, np.concatenate(index) if index else np.zeros(0, np.int64),
             np.concatenate(labels) if labels else np.zeros(0, np.int64), correct, n)
    parts = [local]
    if world > 1 and dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, local)
    merged = parts[0][0]
    for p in parts[1:]:
        merged.merge(p[0])
    all_index = np.concatenate([p[1] for p in parts])
    label_of = np.zeros(int(all_index.max()) + 1 if all_index.size else 0, np.int64)
    label_of[all_index] = np.concatenate([p[2] for p in parts])
    total = sum(p[4] for p in parts)
    return {"fold_map": map_from_topk(merged, label_of) if total else 0.0,
            "fold_acc": sum(p[3] for p in parts) / max(total, 1), "val_clips": total,
            "rank_val_clips": [int(p[4]) for p in parts]}


def gather_objects(x: Any) -> list:
    """`x` of every rank, in rank order (one all_gather; [x] on a single worker)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [x]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return parts


def gather_counts(n: int) -> list[int]:
    """`n` of every rank, in rank order."""
    return [int(p) for p in gather_objects(int(n))]


class _Progress:
    """Rank 0's progress, every `every_s` seconds and at each epoch's end: a line in the
    worker's log (Ray keeps it: the job's console shows only the driver) and
    `<out_dir>/progress.json`, which the driver turns into the console's bar
    (`rayvid.train.kfold.FoldWatch`). step/total, loss, samples/s, lr, the epochs done (each
    written after its checkpoint was reported), and the worker's pid."""

    def __init__(self, tag: str, out_dir: str, total: int, every_s: float, start_step: int,
                 history: list[dict]):
        self.tag, self.total, self.every_s = tag, total, every_s
        self.path = Path(out_dir) / PROGRESS_FILE
        self.t0 = self.last = time.perf_counter()
        self.step0, self.samples, self.loss_sum, self.loss_n = start_step, 0, 0.0, 0
        self.state: dict[str, Any] = {"step": start_step, "total": total, "pid": os.getpid(),
                                      "epochs": [_epoch_row(h) for h in history]}

    def update(self, step: int, epoch: str, loss: "torch.Tensor | float", n: int, lr: float) -> None:
        """loss: this step's loss; a device tensor is only read (synced) when a line prints."""
        self.samples += n
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        now = time.perf_counter()
        if now - self.last < self.every_s and step != self.total:
            return
        rate = self.samples / max(now - self.t0, 1e-9)
        steps_rate = (step - self.step0) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / max(steps_rate, 1e-9)
        loss_avg = float(self.loss_sum) / self.loss_n
        log.info("[%s] epoch %s step %d/%d loss %.4f %.0f samples/s lr %.2e ETA %s", self.tag,
                 epoch, step, self.total, loss_avg, rate, lr,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
        self.state.update(step=step, epoch=epoch, loss=loss_avg, samples_per_s=rate, lr=lr)
        self._write()
        self.last, self.loss_sum, self.loss_n = now, 0.0, 0

    def epoch_done(self, metrics: dict) -> None:
        """metrics: the epoch's report (epoch, step, loss, fold_map, best_map, fold_acc)."""
        self.state["epochs"] = self.state["epochs"] + [_epoch_row(metrics)]
        self.state["step"] = int(metrics.get("step", self.state["step"]))
        self._write()

    def _write(self) -> None:
        try:
            write_json(self.path, self.state, indent=None)
        except OSError as e:  # progress is for people: never fail a run over it
            log.warning("could not write %s: %s", self.path, e)


def _epoch_row(metrics: dict) -> dict:
    keep = ("epoch", "loss", "fold_map", "best_map", "fold_acc")
    return {k: float(metrics[k]) for k in keep if k in metrics}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: see the module docstring. config: {"job": dict, "plan": dict}."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainJobConfig, config["job"])
    plan = FoldPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed * 1000 + plan.fold)
    model = ray.train.torch.prepare_model(
        build_model(plan.arch, in_dim=512, num_classes=plan.num_classes,
                    **model_kwargs(cfg, plan.arch, tuple(plan.dims))))
    device = ray.train.torch.get_device()
    opt = make_optimizer(cfg, model)
    state = _restore(model, opt)
    criterion, loss_schedule = build_criterion(cfg, plan.arch)
    columns = input_columns(plan.arch)
    lrs = lr_schedule(cfg)
    bf16 = use_bf16(cfg, device)
    progress = _Progress(f"fold {plan.fold} {plan.arch}", plan.out_dir, plan.total_steps,
                         cfg.train.log_every_s, state["step"], state["history"]) \
        if rank == 0 else None
    # where each rank runs (Ray node ids), in the history: a multi-node run can be checked
    rank_nodes = gather_objects(ray.get_runtime_context().get_node_id())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    step = state["step"]
    for epoch in range(state["epoch"], plan.epochs):
        model.train()
        t0, seen, loss_sum, n_batches = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_torch_batches(
                batch_size=cfg.optim.batch_size, local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                dtypes={c: COLUMN_DTYPES[c] for c in (*columns, "y")}, device=device):
            lr = lrs.lr_at(min(step, plan.total_steps - 1), plan.total_steps)
            apply(opt, lr)
            criterion.set_weights(loss_schedule.at(min(step / plan.total_steps, 1.0)))
            if isinstance(criterion, OpenSetLoss):
                criterion.set_progress(min(step / plan.total_steps, 1.0))
            loss_d = train_step(model, opt, criterion, tuple(batch[c] for c in columns),
                                batch["y"], bf16)
            step += 1
            seen += len(batch["y"])
            loss_sum, n_batches = loss_sum + loss_d, n_batches + 1
            if progress is not None:
                progress.update(step, f"{epoch + 1}/{plan.epochs}", loss_d, len(batch["y"]), lr)
        train_s = time.perf_counter() - t0
        rank_rows = gather_counts(seen)  # each rank's own shard of the epoch
        metrics = evaluate(model, val_shard, plan.num_classes, device, columns)
        metrics.update(epoch=epoch + 1, step=step, loss=float(loss_sum) / max(n_batches, 1),
                       samples_per_s=sum(rank_rows) / max(train_s, 1e-9),
                       lr=lr if n_batches else 0.0, fold=plan.fold, arch=plan.arch,
                       rank_rows=rank_rows, rank_nodes=rank_nodes)
        improved = metrics["fold_map"] > state["best_map"]
        state.update(epoch=epoch + 1, step=step, best_map=max(state["best_map"], metrics["fold_map"]))
        state["history"] = state["history"] + [metrics]
        metrics["best_map"] = state["best_map"]
        _report(cfg, plan, model, opt, state, metrics, improved, rank)
        if progress is not None:
            progress.epoch_done(metrics)


def _report(cfg, plan: FoldPlan, model, opt, state: dict, metrics: dict, improved: bool,
            rank: int) -> None:
    import ray.train

    if rank == 0:
        log.info("[fold %d %s] epoch %d/%d loss %.4f fold mAP %.4f (best %.4f) acc %.4f",
                 plan.fold, plan.arch, metrics["epoch"], plan.epochs, metrics["loss"],
                 metrics["fold_map"], state["best_map"], metrics["fold_acc"])
    extra = {"fold": plan.fold, "epoch": metrics["epoch"], "fold_map": metrics["fold_map"],
             "weighting": dataclasses.asdict(cfg.fusion.weighting)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt_dir = save_checkpoint(Path(tmp) / "ckpt", model, job_config=to_dict(cfg), extra=extra)
            plain = json.loads(json.dumps(state, default=float))  # no numpy scalars: the
            torch.save({**plain, "optimizer": opt.state_dict()},  # weights_only loader reads it
                       ckpt_dir / TRAIN_STATE_FILE)
            if improved:  # the best one is kept outside Ray's rotation, on the run's storage
                save_checkpoint(Path(plan.out_dir) / "best", model, job_config=to_dict(cfg),
                                extra=extra)
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
        # per-rank lists stay in the checkpoint's history: Tune's loggers want scalars
        ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)},
                         checkpoint=checkpoint)
