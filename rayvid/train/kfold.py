"""K-fold training and the folds x architectures ensemble (driver side).

`train_fold` runs one (fold, architecture) with Ray Train (see `rayvid.train.worker`);
`train_kfold` runs every fold and architecture of the config, one after another or
concurrently (`folds.concurrent`), and writes `RUN/ensemble.json`: the 4th place's blend,
the sum of sigmoid scores over 5 folds x 5 architectures. A finished (fold, arch) leaves
`result.json` and is skipped on a rerun; an unfinished one resumes from its last Ray
checkpoint, so rerunning the same command continues a stopped run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rayvid.console import progress
from rayvid.data import pipeline as rdata
from rayvid.config import to_dict
from rayvid.core.atomic import write_json
from rayvid.model import run_folder
from rayvid.release.schema import read_meta
from rayvid.train.config import TrainJobConfig
from rayvid.core.inputs import INPUT_KINDS, InputSpec
from rayvid.model.architectures import COSINE_HEADS, input_kind_of
from rayvid.train.worker import (COLUMN_DTYPES, PROGRESS_FILE, RESULT_FILE, FoldPlan,
                                 input_columns, plan_fold, train_loop_per_worker)

log = logging.getLogger(__name__)

# A planned worker gets at least this share of a CPU (logical: Ray does not pin cores).
MIN_WORKER_CPUS = 0.05


def dataset_dims(meta: dict) -> tuple[int, int, int]:
    """(head, body, audio) feature dims of a prepared dataset (512 for a modality it lacks)."""
    dims = meta.get("dims") or {}
    return tuple(int(dims.get(m) or 512) for m in ("head", "body", "audio"))  # type: ignore[return-value]


def transforms(cfg: TrainJobConfig, fold: int, arch: str = "M5",
               dims: tuple[int, int, int] = (512, 512, 512)
               ) -> tuple[rdata.ClipTransform, rdata.ClipTransform]:
    """(training, held-out) per-batch transforms of one fold, building `arch`'s input kind."""
    gate = (cfg.gate.det_min, cfg.gate.quality_min) if cfg.gate.enabled else None
    kinds = (input_kind_of(arch),)
    rows = cfg.row_filters()
    common = dict(weighting=cfg.fusion.weighting, kinds=kinds, dims=dims,
                  face_set_size=cfg.inputs.face_set_size, modalities=cfg.inputs.modalities,
                  **{k: v for k, v in rows.items() if k != "noise"})
    train = rdata.ClipTransform(
        mode="qfda" if cfg.qfda.enabled else "qff", gate=gate,
        folds=(cfg.folds.k, fold, "train"), n_draws=cfg.qfda.n_draws, sizes=cfg.qfda.sizes,
        mix=cfg.qfda.mix, drop_empty=True, modality_dropout=cfg.inputs.modality_dropout,
        noise=rows["noise"], **common)
    # Held-out clips are scored as test clips are: every face, no gate, qFF; with their
    # noise clips, which this fold did not train on.
    heldout = rdata.ClipTransform(mode="qff", folds=(cfg.folds.k, fold, "heldout"), noise=True,
                                  **common)
    return train, heldout


def parallel_fits(cfg: TrainJobConfig) -> int:
    """How many (fold, arch) trainings run at once (`folds.concurrent`)."""
    return len(cfg.folds.folds) * len(cfg.model.archs) if cfg.folds.concurrent else 1


def worker_resources(cfg: TrainJobConfig, cluster: Mapping[str, float],
                     parallel: int = 1) -> dict[str, float]:
    """One Train worker's resources, planned so that Ray Data always has CPUs to run on.

    Ray Train v2 reserves its workers' resources and Ray Data schedules its reads and
    transforms in what is left: 2 workers x 1 CPU on a 2-CPU machine leave Data nothing,
    and the run waits forever. On a CPU-only run, `parallel` fits x `train.num_workers`
    workers may hold at most the cluster's CPUs less `train.data_cpus`: with
    `train.cpus_per_worker` unset each worker gets min(1, that room / workers) CPUs, and a
    set value that does not fit is refused here, with the settings named, before anything
    starts. GPU runs take `cpus_per_worker` (default 1) and are not checked against the
    CPUs the cluster has now: an autoscaling cluster adds its GPU nodes (and their CPUs)
    when the workers ask for them."""
    t = cfg.train
    workers = t.num_workers * parallel
    if t.use_gpu:
        return {"CPU": t.cpus_per_worker or 1.0, "GPU": t.gpus_per_worker}
    cpus = float(cluster.get("CPU", 0.0))
    room = cpus - t.data_cpus
    fix = (f"lower train.num_workers, or start Ray with more CPUs"
           + (" (or folds.concurrent=false)" if parallel > 1 else ""))
    if t.cpus_per_worker is None:
        per = min(1.0, room / workers) if room > 0 else 0.0
        if per < MIN_WORKER_CPUS:
            raise ValueError(
                f"the cluster has {cpus:g} CPUs: {workers} Train worker(s) "
                f"(train.num_workers={t.num_workers}"
                + (f" x {parallel} concurrent fits" if parallel > 1 else "")
                + f") cannot get {MIN_WORKER_CPUS} CPU each with train.data_cpus={t.data_cpus:g} "
                f"kept for Ray Data's reads: {fix}, or lower train.data_cpus")
        return {"CPU": round(per, 4)}
    if workers * t.cpus_per_worker > room + 1e-9:
        fit = room / workers
        hint = f"train.cpus_per_worker={fit:.4g} fits" if fit >= MIN_WORKER_CPUS else fix
        raise ValueError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}"
            + (f" x {parallel} concurrent fits" if parallel > 1 else "")
            + f" = {workers * t.cpus_per_worker:g} CPUs, but the cluster has {cpus:g} and "
            f"train.data_cpus={t.data_cpus:g} must stay free for Ray Data's reads, or the "
            f"run would wait forever: {hint} (or leave train.cpus_per_worker unset to plan it)")
    return {"CPU": t.cpus_per_worker}


def _scaling(cfg: TrainJobConfig):
    import ray
    from ray.train import ScalingConfig

    resources = worker_resources(cfg, ray.cluster_resources(), parallel_fits(cfg))
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                         resources_per_worker=resources,
                         placement_strategy=cfg.train.placement_strategy)


def train_fold(cfg: TrainJobConfig, dataset: str | Path, run_dir: str | Path, fold: int,
               arch: str, callbacks: list | None = None) -> dict:
    """Train one (fold, arch); returns its result dict (also saved as result.json)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    out = run_dir / "folds" / str(fold) / arch
    if (out / RESULT_FILE).exists():
        log.info("fold %d %s already finished: %s", fold, arch, out)
        # `best` as it is now: the run folder may have moved (or been copied) since.
        return {**json.loads((out / RESULT_FILE).read_text()), "best": str(out / "best")}
    out.mkdir(parents=True, exist_ok=True)
    check_splits(cfg, dataset)
    meta = read_meta(dataset)
    dims = dataset_dims(meta)
    train_tf, heldout_tf = transforms(cfg, fold, arch, dims)
    counts = rdata.training_counts(dataset, cfg.fold_splits, train_tf)
    n_train = counts["clips"]
    if cfg.openset.noise != "none" and counts["noise"] == 0:
        raise ValueError(
            f"openset.noise={cfg.openset.noise}: fold {fold} has no noise clip (label 0) to "
            f"train on in {list(cfg.fold_splits)} of {dataset}; the release keeps its noise in "
            "val: check openset.unseen and openset.source, or set openset.noise=none")
    plan = plan_fold(cfg, n_train, meta["num_classes"], fold, arch, out, dims)
    columns = [*input_columns(arch), "y"]
    train_tf = dataclasses.replace(train_tf, repeats=plan.repeats)
    what = "qFDA draws" if cfg.qfda.enabled else "copies of its qFF vector"
    log.info("[fold %d %s] %d training clips (%d noise), %d %s per clip per epoch, "
             "%d epochs x %d steps", fold, arch, n_train, counts["noise"], plan.repeats, what,
             plan.epochs, plan.steps_per_epoch)
    # deterministic (qFF): computed once, not re-executed every epoch
    heldout = rdata.clip_dataset(dataset, cfg.fold_splits, heldout_tf
                                 ).select_columns(columns).materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "plan": dataclasses.asdict(plan)},
        scaling_config=_scaling(cfg),
        # the model's input columns and y only
        datasets={"train": rdata.clip_dataset(dataset, cfg.fold_splits, train_tf,
                                              shuffle=True).select_columns(columns),
                  "val": heldout},
        # train: an equal streaming split, one shard per rank; val: whole on every rank,
        # which scores its own batches of it (`worker.evaluate`), so no clip is dropped
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=f"{cfg.name}-fold{fold}-{arch}", storage_path=str(run_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )
    t0 = time.perf_counter()
    with FoldWatch(out, plan, every_s=cfg.train.log_every_s):
        result = trainer.fit()
    calibration = calibrate_member(cfg, out / "best", arch, heldout) \
        if (out / "best").exists() else None
    return _finish(out, plan, result, time.perf_counter() - t0, calibration, counts["noise"])


def check_splits(cfg: TrainJobConfig, dataset: str | Path) -> None:
    """A clear error when the dataset lacks a split the folds need (val, for the default
    open-set recipe), naming the settings that ask for it."""
    have = set(read_meta(dataset).get("splits", {}))
    missing = [s for s in cfg.fold_splits if s not in have]
    if missing:
        why = (f"openset.noise={cfg.openset.noise} folds val's clips in"
               if "val" in missing and "val" not in cfg.folds.splits else
               f"folds.splits={list(cfg.folds.splits)}")
        raise ValueError(f"dataset {dataset} has no split {missing} ({why}); it has "
                         f"{sorted(have)}. Train on train alone with openset.noise=none "
                         "and folds.splits=[train]")


def calibrates(cfg: TrainJobConfig, arch: str) -> bool:
    """Whether `arch`'s members get a score calibration (`model.calibrate`): "auto" when
    the ensemble has a cosine head."""
    return cfg.model.calibrate == "all" or (
        cfg.model.calibrate == "auto" and any(a in COSINE_HEADS for a in cfg.model.archs))


def calibrate_member(cfg: TrainJobConfig, best: Path, arch: str, heldout) -> dict | None:
    """Platt-calibrate the best checkpoint of a (fold, arch) on its held-out clips
    (`rayvid.model.calibration`), when `model.calibrate` asks for it; None otherwise."""
    if not calibrates(cfg, arch):
        return None
    import numpy as np
    import torch

    from rayvid.core.metrics import score_rows
    from rayvid.model.calibration import fit_outputs, write_calibration
    from rayvid.model.checkpoints import load_model

    model, _ = load_model(best)
    columns = input_columns(arch)

    def outputs():
        with torch.inference_mode():
            for b in heldout.iter_batches(batch_size=score_rows(model.num_classes, 2048),
                                          batch_format="numpy"):
                args = [torch.from_numpy(np.array(b[c])).to(COLUMN_DTYPES[c]) for c in columns]
                yield model(*args).float().numpy(), b["y"]

    calibration = fit_outputs(outputs(), seed=cfg.train.seed)
    write_calibration(best, calibration)
    log.info("[%s] calibrated %s: score = sigmoid(%.3f * output %+.3f) (%d positive pairs)",
             best.parent.name, best, calibration["a"], calibration["b"], calibration["positives"])
    return calibration


class FoldWatch:
    """The console's view of one (fold, arch) while `fit()` runs: a bar over its steps and
    a line per finished epoch, read from the rank-0 worker's `progress.json` (the workers'
    own output stays in Ray's log files; see rayvid.console). The run folder is the
    storage the workers already write `best` to, so this works on a cluster too."""

    def __init__(self, out: Path, plan: FoldPlan, every_s: float, poll_s: float = 1.0):
        self.path, self.plan, self.poll_s = Path(out) / PROGRESS_FILE, plan, poll_s
        self.tag = f"fold {plan.fold} {plan.arch}"
        self.bar = progress(total=plan.total_steps, desc=self.tag, unit="step", every_s=every_s,
                            logger=log)
        # A file left by an interrupted run of this fold: its epochs were shown back then.
        before = self._read()
        self.seen_epochs = len(before[1].get("epochs", [])) if before else 0
        self.mtime = before[0] if before else None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{self.tag}", daemon=True)

    def __enter__(self) -> "FoldWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()
        self.bar.close()

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Show what `progress.json` says now, if it changed (a missing or unreadable file
        is skipped: the worker has not written it yet, or is rewriting it)."""
        now = self._read()
        if now is None or now[0] == self.mtime:
            return
        self.mtime, state = now
        epochs = state.get("epochs", [])
        for row in epochs[self.seen_epochs:]:
            self.bar.log.info("[%s] epoch %d/%d loss %.4f fold mAP %.4f (best %.4f) acc %.4f",
                              self.tag, row["epoch"], self.plan.epochs, row["loss"],
                              row["fold_map"], row["best_map"], row["fold_acc"])
        self.seen_epochs = max(self.seen_epochs, len(epochs))
        text = f"loss {state['loss']:.4f} lr {state['lr']:.1e}" if "loss" in state else None
        self.bar.set(int(state.get("step", 0)), text)

    def _read(self) -> tuple[int, dict] | None:
        try:
            return self.path.stat().st_mtime_ns, json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None


def _finish(out: Path, plan: FoldPlan, result, seconds: float,
            calibration: dict | None = None, noise_clips: int = 0) -> dict:
    state = _final_state(result)
    history = state.get("history", [])
    if not (out / "best").exists():
        raise RuntimeError(f"fold {plan.fold} {plan.arch}: training ended without a checkpoint")
    summary = {"fold": plan.fold, "arch": plan.arch, "best": str(out / "best"),
               "best_map": max((h["fold_map"] for h in history), default=None),
               "seconds": round(seconds, 1), "plan": dataclasses.asdict(plan),
               "restores": state.get("restores", []), "history": history,
               "noise_clips": noise_clips}
    if calibration is not None:
        summary["calibration"] = calibration
    write_json(out / RESULT_FILE, summary)
    return summary


def _final_state(result) -> dict:
    """The run's last train state: per-epoch history (trimmed) and the resume points."""
    import torch

    from rayvid.train.worker import TRAIN_STATE_FILE

    ckpt = result.checkpoint
    if ckpt is None:
        return {}
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    keep = ("epoch", "step", "loss", "fold_map", "fold_acc", "samples_per_s", "lr",
            "rank_rows", "rank_val_clips", "rank_nodes")
    return {"history": [{k: h[k] for k in keep if k in h} for h in state["history"]],
            "restores": state.get("restores", [])}


def train_kfold(cfg: TrainJobConfig, dataset: str | Path, run_dir: str | Path) -> list[dict]:
    """Every (fold, arch) of the config, then `RUN/ensemble.json`. Returns their results."""
    check_splits(cfg, dataset)
    jobs = [(f, a) for f in cfg.folds.folds for a in cfg.model.archs]
    if cfg.folds.concurrent and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(lambda j: train_fold(cfg, dataset, run_dir, *j), jobs))
    else:
        results = [train_fold(cfg, dataset, run_dir, f, a) for f, a in jobs]
    meta = read_meta(dataset)
    num_classes = meta["num_classes"]
    proto = fit_prototype(cfg, dataset, run_dir, num_classes) if cfg.model.prototype_weight > 0 else None
    write_ensemble(cfg, run_dir, results, num_classes, proto, dataset_dims(meta))
    return results


def fit_prototype(cfg: TrainJobConfig, dataset: str | Path, run_dir: str | Path,
                  num_classes: int) -> Path:
    """Class means of every training clip (all folds) as a checkpoint: RUN/prototype."""
    from rayvid.train.baseline import class_means
    from rayvid.model.checkpoints import save_checkpoint
    from rayvid.model.architectures import build_model

    out = Path(run_dir).resolve() / "prototype"
    if not (out / "model.pt").exists():
        means = class_means(str(dataset), cfg.fold_splits, num_classes, cfg.fusion.weighting,
                            rows=cfg.row_filters())
        head = build_model("prototype", num_classes=num_classes).set_means(means)
        save_checkpoint(out, head, job_config=to_dict(cfg),
                        extra={"weighting": dataclasses.asdict(cfg.fusion.weighting)})
    return out


def write_ensemble(cfg: TrainJobConfig, run_dir: str | Path, results: list[dict],
                   num_classes: int, prototype: Path | None = None,
                   dims: tuple[int, int, int] = (512, 512, 512)) -> Path:
    """`ensemble.json` (`rayvid.model.run_folder`): members (best checkpoint of every fold x
    arch, plus the prototype head weighted `model.prototype_weight` x the MLPs' total) + the
    qFF weighting."""
    run_dir = Path(run_dir).resolve()
    members = [run_folder.Member(str(Path(r["best"]).resolve().relative_to(run_dir)), 1.0,
                                 fold=r["fold"], arch=r["arch"], fold_map=r["best_map"])
               for r in results]
    if prototype is not None:
        members.append(run_folder.Member(str(prototype.relative_to(run_dir)), arch="prototype",
                                         weight=cfg.model.prototype_weight * max(len(results), 1)))
    kinds = {input_kind_of(r["arch"]) for r in results}
    if prototype is not None:
        kinds.add("clip_vector")
    extra = {"inputs": input_spec(cfg, kinds, dims).to_json(), "trained_on": trained_on(cfg)}
    spec = run_folder.EnsembleSpec(tuple(members), cfg.fusion.weighting, num_classes, extra)
    return run_folder.write_ensemble(run_dir, spec)


def trained_on(cfg: TrainJobConfig) -> dict:
    """What `ensemble.json` records of the clips the members trained on: the folded splits
    and, when val is one, the unseen part that stayed out (prediction warns when a split
    the run trained on is scored whole)."""
    out: dict = {"splits": list(cfg.fold_splits), "openset": cfg.openset.noise}
    if cfg.val_folded and cfg.openset.unseen > 0:
        out["unseen_fraction"] = cfg.openset.unseen
    return out


def input_spec(cfg: TrainJobConfig, kinds, dims: tuple[int, int, int]) -> InputSpec:
    """The inputs the ensemble's members read, as `ensemble.json` records them."""
    return InputSpec(tuple(k for k in INPUT_KINDS if k in kinds), cfg.fusion.weighting,
                     cfg.inputs.face_set_size, tuple(cfg.inputs.modalities), dims=dims)
