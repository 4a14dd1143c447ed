"""The no-training baseline: qFF clip features, nearest class mean (prototype) by cosine.

With ~6 training clips per identity a prototype classifier is strong, and it needs no
training, so every run reports it beside the trained ensemble on the same data. Both
passes stream through Ray Data: the class sums are a (C, 512) float64 array, the ranking a
running top-100 per identity; no process holds the split.
"""

from __future__ import annotations

import numpy as np

from rayvid.data import pipeline as rdata
from rayvid.core.fusion import Weighting
from rayvid.core.metrics import map_from_topk, score_rows
from rayvid.core.submission import TopKPerIdentity


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def class_means(dataset: str, splits: tuple[str, ...], num_classes: int,
                weighting: Weighting, folds: tuple[int, int, str] | None = None,
                rows: dict | None = None) -> np.ndarray:
    """(C, 512) float32 unit-norm mean of the unit qFF features of each identity's clips
    (row 0, noise, and identities without a clip stay zero). rows: `ClipTransform` row
    options (`TrainJobConfig.row_filters`: the training clips of an open-set recipe)."""
    tf = rdata.ClipTransform(mode="qff", weighting=weighting, folds=folds, **(rows or {}))
    sums = np.zeros((num_classes, 512), np.float64)
    for b in rdata.clip_dataset(dataset, splits, tf).iter_batches(batch_size=4096,
                                                                   batch_format="numpy"):
        keep = (b["y"] > 0) & b["ok"]
        np.add.at(sums, b["y"][keep], _unit(b["x"][keep]))
    sums[0] = 0.0
    return _unit(sums).astype(np.float32)


def prototype_scores(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Cosine of unit clip features (n, 512) to class means (C, 512) -> (n, C) float32."""
    return _unit(np.asarray(x, np.float32)) @ means.T


def rank_split(dataset: str, split: str, means: np.ndarray, weighting: Weighting,
               folds: tuple[int, int, str] | None = None, part: str | None = None,
               unseen_fraction: float = 0.5) -> tuple[TopKPerIdentity, list, np.ndarray]:
    """Running top-100 per identity of a split (of its `part` of val, seen or unseen)
    under the prototype scores.
    Returns (top-k, clip names in index order, labels (n,) with -1 for unlabelled)."""
    tf = rdata.ClipTransform(mode="qff", weighting=weighting, folds=folds, with_clip=True,
                             val_part=part, unseen_fraction=unseen_fraction)
    topk, names, labels = TopKPerIdentity(len(means)), [], []
    rows = score_rows(len(means), 2048)  # a (rows, C) score block of bounded size
    for b in rdata.clip_dataset(dataset, [split], tf).iter_batches(batch_size=rows,
                                                                    batch_format="numpy"):
        idx = np.arange(len(names), len(names) + len(b["y"]))
        topk.update(idx, prototype_scores(b["x"], means))
        names.extend(b["clip"].tolist())
        labels.append(b["y"])
    return topk, names, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def baseline_map(dataset: str, train_splits: tuple[str, ...], eval_split: str,
                 num_classes: int, weighting: Weighting, rows: dict | None = None,
                 part: str | None = None, unseen_fraction: float = 0.5) -> float:
    """Official-metric mAP of the prototype baseline on a labelled split (gt from labels),
    or on its seen/unseen `part`, with class means of the `rows` of `train_splits`."""
    means = class_means(dataset, train_splits, num_classes, weighting, rows=rows)
    topk, _, labels = rank_split(dataset, eval_split, means, weighting, part=part,
                                 unseen_fraction=unseen_fraction)
    return map_from_topk(topk, np.maximum(labels, 0))
