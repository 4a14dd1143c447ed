"""The official iQIYI-VID-2019 metric: AP and mAP (the files are read by `rayvid.core.formats`).

The spec is `shared/docs/iqiyi-vid-2019.md` ("Submission and metric"), as the official
script does it: duplicate clips in a submission line are dropped (first kept) and then at
most 100 may remain; AP_i = (1/|G_i|) * sum over hits, the k-th hit at 1-based rank r_k,
of k / r_k, with |G_i| not capped at 100; mAP divides by the number of gt lines, so an
identity missing from the submission scores 0 but counts.

`map_from_scores` is the array version used for fold mAP during training. It ranks with the
same rule as `rayvid.core.submission.TopKPerIdentity` (`rank_keys`: float32 score descending,
ties by lower clip index), so it equals the file scorer on the submission predict would write.

    score_files("val_gt.txt", "submission.txt")   # official mAP, a float in [0, 1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rayvid.core.formats import (MAX_RANK, NUM_IDENTITIES, check_ranking_length, clip_stem,
                                 dedupe_ranking, iter_submission, read_gt, read_submission)

_CHUNK_BYTES = 64 << 20  # working-set budget of one identity chunk in map_from_scores
_LOW32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class MAPResult:
    """mAP and the AP of every gt identity (0.0 for those missing from the submission)."""

    map: float
    per_id: dict[int, float]

    def worst(self, n: int = 5) -> list[tuple[int, float]]:
        """The n lowest-AP identities as (id, AP), lowest first, ties by id."""
        return sorted(self.per_id.items(), key=lambda item: (item[1], item[0]))[:n]


# ------------------------------------------------------------------------------ mAP


def average_precision(ranked: Sequence[str], relevant: AbstractSet[str]) -> float:
    """AP = (1/|G|) * sum over hits, the k-th hit at 1-based rank r_k, of k / r_k.

    ranked: clip names best first (repeats are dropped, first kept); relevant: G, not capped
    at 100, must be non-empty.
    """
    if not relevant:
        raise ValueError("average_precision: the relevant set is empty")
    hits = 0
    total = 0.0
    for rank, clip in enumerate(dedupe_ranking(ranked), 1):
        if clip in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def score_identities(
    gt: Mapping[int, Sequence[str]],
    submission: Mapping[int, Sequence[str]],
    max_rank: int = MAX_RANK,
) -> MAPResult:
    """mAP over the gt identities, with the AP of each.

    An identity missing from the submission scores 0 but counts; submission ids not in the
    gt are ignored. A ranking with more than `max_rank` distinct clips raises SubmissionError.
    """
    if not gt:
        raise ValueError("score_identities: the ground truth has no identities")
    per_id: dict[int, float] = {}
    for identity, clips in gt.items():
        ranking = dedupe_ranking(submission.get(identity, ()))
        check_ranking_length(identity, ranking, max_rank)
        per_id[identity] = average_precision(ranking, set(clips))
    return MAPResult(map=sum(per_id.values()) / len(gt), per_id=per_id)


def mean_average_precision(
    gt: Mapping[int, Sequence[str]], submission: Mapping[int, Sequence[str]]
) -> float:
    """The official mAP: sum of AP_i over the gt identities / number of gt identities."""
    return score_identities(gt, submission).map


def score_files(
    gt_path: str | Path, submission_path: str | Path, max_id: int = NUM_IDENTITIES,
    clips: AbstractSet[str] | None = None,
) -> float:
    """The official mAP of a submission file against a `val_gt.txt`-format file.

    clips: score a part of the split only (the unseen part of val): the gt keeps these
    clips, and an identity none of whose gt clips is among them drops out. The submission
    must then rank only these clips (a prediction of that part). The submission is read
    one line at a time (`iter_submission`, the same checks as `read_submission`)."""
    gt = read_gt(gt_path, max_id)
    if clips is not None:
        gt = restrict_gt(gt, clips)
    if not gt:
        raise ValueError(f"score_files: {gt_path} has no identities to score")
    total = 0.0
    for identity, ranking in iter_submission(submission_path):
        if identity in gt:
            total += average_precision(ranking, set(gt[identity]))
    return total / len(gt)  # an identity missing from the submission adds 0


def restrict_gt(gt: Mapping[int, Sequence[str]], clips: AbstractSet[str]
                ) -> dict[int, list[str]]:
    """The gt of a part of a split: each identity's clips among `clips` (names with or
    without `.mp4`); identities left with none are dropped (nothing to find in that part)."""
    keys = {clip_stem(c) for c in clips}
    out = {i: [c for c in cs if clip_stem(c) in keys] for i, cs in gt.items()}
    return {i: cs for i, cs in out.items() if cs}


SCORE_ROWS_BYTES = 32 << 20  # an (n, C) float32 score block of a scoring loop stays below this


def score_rows(num_classes: int, cap: int = 4096, budget: int = SCORE_ROWS_BYTES) -> int:
    """Rows per scoring step so that one (rows, num_classes) float32 block fits `budget`:
    a loop that scores clips against every identity then holds the same memory whatever the
    number of identities (2048 rows at 1,001 classes with cap 2048; 836 at 10,035)."""
    return max(1, min(cap, budget // (4 * max(int(num_classes), 1))))


# ----------------------------------------------------------------- ranking as uint64 keys


def rank_keys(scores: np.ndarray, clip_index: np.ndarray) -> np.ndarray:
    """Pack (score, clip index) into uint64 keys whose descending order is the ranking.

    scores: (..., n) float, compared as float32 (wider input is rounded; -0.0 == 0.0;
    NaN raises ValueError); clip_index: (n,) or broadcastable, int in [0, 2**32).
    Returns (..., n) uint64: high 32 bits = the float32 bits mapped to an order-preserving
    unsigned integer, low 32 bits = 2**32 - 1 - index, so a larger key is a higher score,
    then a lower clip index. Real keys are never 0: 0 marks an empty slot.
    """
    values = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    if np.isnan(values).any():
        raise ValueError("rank_keys: scores contain NaN")
    index = np.asarray(clip_index)
    if index.size and (index.min() < 0 or index.max() > 0xFFFFFFFF):
        raise ValueError("rank_keys: clip indices must lie in [0, 2**32)")
    bits = values.view(np.uint32)
    ordered = np.where(bits >= 0x80000000, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    return (ordered << np.uint64(32)) | (_LOW32 - index.astype(np.uint64))


def unpack_rank_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `rank_keys`: keys (...) uint64 -> (clip_index int64, score float32)."""
    keys = np.asarray(keys, dtype=np.uint64)
    ordered = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered >= 0x80000000, ordered ^ np.uint32(0x80000000), ~ordered)
    index = (_LOW32 - (keys & _LOW32)).astype(np.int64)
    return index, bits.astype(np.uint32).view(np.float32)


def top_keys(keys: np.ndarray, k: int, *, sort: bool = True) -> np.ndarray:
    """The k largest keys of every row: keys (r, m) uint64 -> (r, min(k, m)) uint64.

    Sorted best first when `sort`, else in partition order (cheaper for running state).
    """
    m = keys.shape[1]
    if k < m:
        keys = np.partition(keys, m - k, axis=1)[:, m - k :]
    return np.sort(keys, axis=1)[:, ::-1] if sort else keys


def _ap_from_hits(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """hits: (r, k) bool, ranks 1..k per row; n_relevant: (r,) |G|. Returns (r,) float64 AP."""
    found = np.cumsum(hits, axis=1)
    precision = found / np.arange(1, hits.shape[1] + 1)
    return np.where(hits, precision, 0.0).sum(axis=1) / n_relevant


def score_arrays(
    scores: np.ndarray, labels: np.ndarray, top_k: int = MAX_RANK, *, chunk_size: int | None = None
) -> MAPResult:
    """Per-identity AP and mAP from a score matrix (see `map_from_scores`)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    n_clips, n_classes = scores.shape
    if labels.shape != (n_clips,):
        raise ValueError(f"labels shape {labels.shape} does not match scores {scores.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    counts = np.bincount(labels, minlength=n_classes)
    ids = np.flatnonzero(counts[1:]) + 1
    if not ids.size:
        raise ValueError("score_arrays: no identity (label >= 1) among the labels")
    k = min(top_k, n_clips)
    step = chunk_size or max(1, _CHUNK_BYTES // (48 * n_clips))  # ~48 B/element of temporaries
    order = np.arange(n_clips)
    aps = []
    for lo in range(0, ids.size, step):
        chunk = ids[lo : lo + step]
        keys = top_keys(rank_keys(scores[:, chunk].T, order), k)  # (c, k), best first
        ranked, _ = unpack_rank_keys(keys)
        aps.append(_ap_from_hits(labels[ranked] == chunk[:, None], counts[chunk]))
    ap = np.concatenate(aps)
    return MAPResult(map=float(ap.mean()), per_id=dict(zip(ids.tolist(), ap.tolist())))


def map_from_scores(
    scores: np.ndarray, labels: np.ndarray, top_k: int = MAX_RANK, *, chunk_size: int | None = None
) -> float:
    """Fold mAP from a score matrix, equal to the file scorer on the same ranking.

    scores: (n_clips, C) float, column c = identity c (column 0, "other", is never a query);
    labels: (n_clips,) int in 0..C-1, 0 = noise. For every identity id >= 1 present in
    labels, G = the clips labelled id; clips are ranked by scores[:, id] descending as
    float32, ties by lower clip index (`rank_keys`), the top_k kept, AP as in
    `average_precision` (|G| not capped). Returns the mean over the identities present.
    chunk_size: identities per chunk (default: a ~64 MiB working set), bounding memory at
    10,035 classes x 50k clips.
    """
    return score_arrays(scores, labels, top_k, chunk_size=chunk_size).map


def map_from_topk(topk, label_of: np.ndarray) -> float:
    """Fold mAP from a running top-k (rayvid.core.submission.TopKPerIdentity) without a score
    matrix: label_of[clip_index] is every fed clip's label (0 = noise), which also gives
    |G| per identity (all clips fed, not only the kept ones). Mean over identities present.
    """
    counts = np.bincount(label_of, minlength=topk.num_classes)[: topk.num_classes]
    ids = np.flatnonzero(counts[1:]) + 1
    if not ids.size:
        return 0.0
    keys = top_keys(topk.keys[ids], topk.k)  # (n_ids, k) best first, empty slots (0) last
    index, _ = unpack_rank_keys(keys)
    filled = keys != 0
    hits = filled & (label_of[np.where(filled, index, 0)] == ids[:, None])
    return float(_ap_from_hits(hits, counts[ids]).mean())
