"""The training job end to end: data -> K-fold x archs -> ensemble -> predict -> score.

`run_training(cfg, run_dir)` is what `jobs/train.py` calls. Data comes from
`data.dataset` (prepared), `data.release` (prepared into the run folder), or neither:
the embedded default simulates a small release into the run folder first. Every step
is skipped when its output is already complete, so rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rayvid.core.atomic import write_json
from rayvid.train import baseline
from rayvid.config import dump_yaml, to_dict
from rayvid.release.schema import read_meta
from rayvid.train.kfold import train_kfold
from rayvid.train.report import plot_history
from rayvid.train.config import TrainJobConfig

log = logging.getLogger(__name__)

SIMULATOR_KEY = Path("_simulator") / "test_gt.txt"


def resolve_dataset(cfg: TrainJobConfig, run_dir: Path) -> tuple[Path, Path | None]:
    """(prepared dataset, release folder or None): simulate and/or prepare as configured."""
    from rayvid.release.prepare import prepare_release
    from rayvid.release.simulator import simulate_release

    if cfg.data.dataset:
        dataset = Path(cfg.data.dataset)
        meta = read_meta(dataset)  # fails clearly when missing or incomplete
        source = meta.get("source")
        return dataset, Path(source) if source and Path(source).is_dir() else None
    release = Path(cfg.data.release) if cfg.data.release else run_dir / "release"
    if not cfg.data.release and not (release / "val_gt.txt").exists():
        log.info("simulating a %d-identity release into %s", cfg.data.simulate_ids, release)
        simulate_release(release, cfg.data.simulate_ids, cfg.data.simulate_seed,
                         faces_per_clip=cfg.data.simulate_faces_per_clip)
    dataset = run_dir / "dataset"
    if not (dataset / "_rayvid_dataset.json").exists():
        log.info("preparing %s -> %s", release, dataset)
        prepare_release(release, dataset, on_bad_clip=cfg.data.on_bad_clip)
    return dataset, release


def gt_for(split: str, release: Path | None) -> Path | None:
    """The ground truth of a split when one exists (val_gt.txt; a simulator's test key)."""
    if release is None:
        return None
    path = release / "val_gt.txt" if split == "val" else release / SIMULATOR_KEY
    return path if split in ("val", "test") and path.exists() else None


def run_training(cfg: TrainJobConfig, run_dir: str | Path) -> dict:
    """Train, predict the eval split, score it and the baseline; write summary + plot."""
    from rayvid.infer.predict import predict_split

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    dataset, release = resolve_dataset(cfg, run_dir)
    meta = read_meta(dataset)
    results = train_kfold(cfg, dataset, run_dir)
    split = cfg.data.eval_split
    gt = gt_for(split, release)
    part = cfg.eval_part(split)
    if split in cfg.fold_splits and part is None:
        log.warning("the eval split %s was trained on (folds over %s, openset.unseen=0): its "
                    "mAP is not an honest measurement", split, list(cfg.fold_splits))
    pred = predict_split(run_dir, dataset, split, run_dir / f"submission_{split}.txt",
                         per_clip_path=run_dir / f"per_clip_{split}.parquet", gt_path=gt,
                         part=part, unseen_fraction=cfg.openset.unseen,
                         fusion=cfg.data.eval_fusion)
    base = None
    if gt is not None and split in ("val", "test") and (split not in cfg.fold_splits or part):
        base = baseline.baseline_map(str(dataset), cfg.fold_splits, split,
                                     meta["num_classes"], cfg.fusion.weighting,
                                     rows=cfg.row_filters(), part=part,
                                     unseen_fraction=cfg.openset.unseen)
    summary = {
        "run_dir": str(run_dir), "dataset": str(dataset), "config": to_dict(cfg),
        "folds": [{k: v for k, v in r.items() if k != "plan"} for r in results],
        "members": len(results),
        "eval": {"split": split, "part": part, "fusion": pred.get("fusion"),
                 "map": pred.get("map"),
                 "gt": str(gt) if gt else None, "clips": pred.get("clips"),
                 "honest": split not in cfg.fold_splits or part is not None},
        "baseline_map": base, "seconds": round(time.perf_counter() - t0, 1),
        "submission": str(run_dir / f"submission_{split}.txt"),
        "per_clip": str(run_dir / f"per_clip_{split}.parquet"),
        "plot": str(plot_history(results, run_dir / "training.png", title=cfg.name)),
        "summary": str(run_dir / "summary.json"),
    }
    write_json(run_dir / "summary.json", summary, default=str)
    return summary
