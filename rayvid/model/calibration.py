"""Score calibration of an ensemble member: Platt scaling on its held-out fold.

The 4th place's blend sums sigmoid scores, which works when every member's scores live on
one scale. A cosine head (`cosine_mlp`, `attention`) outputs cosines in [-1, 1]; scored as
`sigmoid(s * cos)` with the margin loss's s = 30, a non-target cosine of 0 is already 0.5
and the member's scores spread over all of (0, 1) on clips of no relevance, where a focal
MLP's stay near 0: summed, the cosine member decides every identity's ranking alone.

So after training, each member gets `(a, b)` with `score = sigmoid(a * output + b)`
fitted by logistic regression of "this clip is this identity" on the raw output, over the
fold's held-out clips (the positives, and a uniform sample of the negative pairs, weighted
back to their true count, so that `b` carries the real prior): the same units as a
calibrated probability. A cosine head alone calibrated is not enough: a focal MLP's own
sigmoid overrates the negatives on a small release, and the calibrated cosine head then
follows it (tests/test_calibration.py measures both). So when an ensemble has a cosine
head, every member is calibrated (`model.calibrate: auto`); a blend of sigmoid heads only
(the 4th place's M1-M5, the multimodal default) keeps its plain sum. The pair is
stored in the checkpoint (`model_config.json` extra.calibration) and `load_model` applies
it (`RayvidModel.logit_scale`, `logit_bias`), so every scorer (Ray Data prediction, Serve,
the index) blends calibrated scores without knowing about it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rayvid.core.atomic import write_json

NEGATIVES_PER_CLIP = 64


def sample_pairs(outputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 negatives: int = NEGATIVES_PER_CLIP
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, target, weight) pairs of one batch for `fit_platt`.

    outputs: (n, C) raw outputs; labels: (n,) with 0 = noise (no positive), 1..C-1 an
    identity. Per clip: its identity's output (target 1, weight 1) when labelled, and
    `negatives` identities drawn uniformly (with replacement) from 1..C-1 other than its
    own (target 0), each weighted (number of its negative identities) / negatives, so
    the weights count every negative pair once in expectation. Class 0 is skipped: it is
    never ranked.
    """
    outputs = np.asarray(outputs)  # indexed first, then widened: never an (n, C) float64 copy
    labels = np.asarray(labels, np.int64)
    n, c = outputs.shape
    if n == 0 or c < 2:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    known = labels > 0
    pos = outputs[known, labels[known]].astype(np.float64)
    # uniform over the clip's negative identities: 1..C-1 without its own (shift past it)
    n_neg = np.where(known, c - 2, c - 1)
    draw = 1 + (rng.random((n, negatives)) * n_neg[:, None]).astype(np.int64)
    draw += known[:, None] & (draw >= labels[:, None])
    neg = outputs[np.repeat(np.arange(n), negatives), draw.ravel()].astype(np.float64)
    w = np.repeat(n_neg / negatives, negatives)
    z = np.concatenate([pos, neg])
    t = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return z, t, np.concatenate([np.ones(len(pos)), w])


def fit_platt(z: np.ndarray, target: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    """Weighted logistic regression of target on z: {"a", "b"} with P = sigmoid(a z + b).
    Raises ValueError without both classes."""
    from sklearn.linear_model import LogisticRegression

    target = np.asarray(target)
    if not (target == 1).any() or not (target == 0).any():
        raise ValueError("calibration needs positive and negative pairs (labelled held-out "
                         "clips and more than one identity)")
    lr = LogisticRegression(C=1e6, max_iter=1000)
    lr.fit(np.asarray(z, np.float64)[:, None], target, sample_weight=np.asarray(weight))
    return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0]),
            "positives": int((target == 1).sum()), "negatives": int((target == 0).sum())}


def fit_outputs(batches: Iterable[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                negatives: int = NEGATIVES_PER_CLIP) -> dict[str, float]:
    """`fit_platt` over (outputs (n, C), labels (n,)) batches: the pairs of every batch."""
    rng = np.random.default_rng(seed)
    parts = [sample_pairs(out, y, rng, negatives) for out, y in batches]
    z, t, w = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return fit_platt(z, t, w)


def write_calibration(checkpoint: str | os.PathLike, calibration: dict[str, float]) -> None:
    """Record `calibration` in a checkpoint's model_config.json (extra.calibration), which
    `rayvid.model.checkpoints.load_model` applies. Written atomically."""
    from rayvid.model.checkpoints import CONFIG_FILE

    path = Path(checkpoint) / CONFIG_FILE
    config = json.loads(path.read_text())
    config.setdefault("extra", {})["calibration"] = dict(calibration)
    write_json(path, config)
