"""Submission files and the running top-100 per identity that feeds them.

`TopKPerIdentity` keeps, for every identity, the k best (score, clip) pairs seen so far
over a stream of score batches, so no process ever holds all clips' scores (50k test clips
x 10,035 classes is 2 GB as float32). Parallel workers each keep one and `merge` them.
Ranking is `rayvid.core.metrics.rank_keys`: float32 score descending, ties by lower clip index,
the same rule `rayvid.core.metrics.map_from_scores` uses for fold mAP.

    acc = TopKPerIdentity(num_classes=10035)
    for clip_index, scores in batches:          # (n,) int64, (n, 10035) float32
        acc.update(clip_index, scores)
    write_submission("submission.txt", acc.ranked_clips(clip_names))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from rayvid.core.atomic import atomic_path
from rayvid.core.formats import MAX_RANK, submission_line
from rayvid.core.metrics import rank_keys, top_keys, unpack_rank_keys

_CHUNK_BYTES = 64 << 20  # working-set budget of one column chunk in TopKPerIdentity.update


def write_submission(
    path: str | Path,
    ranked: Mapping[int, Sequence[str]] | Iterable[tuple[int, Sequence[str]]],
    top_k: int = MAX_RANK,
) -> None:
    """Write a submission: one line `<id> <clip>.mp4 ...` per identity, ids ascending.

    ranked: {id: clip names best first, with or without `.mp4` (appended when missing)}, or
    (id, names) pairs in ascending id order (streamed: `TopKPerIdentity.iter_ranked_clips`,
    never the whole ranking in memory); repeats are dropped (first kept) and at most top_k
    clips written per id (`rayvid.core.formats.submission_line`). Written whole or not at
    all (`core.atomic`).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pairs = ((i, ranked[i]) for i in sorted(ranked)) if isinstance(ranked, Mapping) else ranked
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        last = None
        for i, clips in pairs:
            if last is not None and int(i) <= last:
                raise ValueError(f"write_submission: ids must ascend, got {i} after {last}")
            last = int(i)
            f.write(submission_line(int(i), clips, top_k) + "\n")


class TopKPerIdentity:
    """Running top-k clips per identity over a stream of score batches.

    State: (num_classes, k) uint64 `rank_keys` per class (0 = empty slot), about 8 MB for
    10,035 classes x 100. Row 0 ("other") is never filled. Every clip index must be fed
    once across all updates and merged accumulators (a repeat would take two slots).
    """

    def __init__(self, num_classes: int, k: int = MAX_RANK, chunk_bytes: int = _CHUNK_BYTES):
        if num_classes < 2 or k < 1:
            raise ValueError(f"need num_classes >= 2 and k >= 1, got {num_classes}, {k}")
        self.num_classes = num_classes
        self.k = k
        self.chunk_bytes = chunk_bytes
        self._keys = np.zeros((num_classes, k), dtype=np.uint64)

    def update(self, clip_index: np.ndarray, scores: np.ndarray) -> None:
        """Fold one batch in.

        clip_index: (n,) int64 in [0, 2**32), global clip numbers; scores: (n, num_classes)
        float32 (others cast; NaN raises), column 0 ignored. Columns are processed in
        chunks so the working set stays near `chunk_bytes`.
        """
        clip_index, scores = np.asarray(clip_index), np.asarray(scores)
        n = clip_index.shape[0] if clip_index.ndim == 1 else -1
        if scores.shape != (n, self.num_classes):
            raise ValueError(
                f"want clip_index (n,), scores (n, {self.num_classes}); "
                f"got {clip_index.shape}, {scores.shape}"
            )
        if not n:
            return
        step = max(1, self.chunk_bytes // (48 * (clip_index.size + self.k)))
        for lo in range(1, self.num_classes, step):
            hi = min(lo + step, self.num_classes)
            batch = rank_keys(scores[:, lo:hi].T, clip_index)  # (c, n)
            both = np.concatenate([self._keys[lo:hi], batch], axis=1)
            self._keys[lo:hi] = top_keys(both, self.k, sort=False)

    def update_sparse(self, clip_index: np.ndarray, class_ids: np.ndarray,
                      scores: np.ndarray) -> None:
        """Fold flat (clip, identity, score) triples in, as `update` would fold the dense
        matrix they come from when the absent pairs cannot reach the top-k (batch
        inference sends only each batch's per-identity candidates).

        clip_index: (m,) int64 global clip numbers; class_ids: (m,) int in 1..C-1; scores:
        (m,) float32. Each (clip, identity) pair at most once over the whole stream.
        """
        class_ids = np.asarray(class_ids, np.int64)
        if not class_ids.size:
            return
        if class_ids.min() < 1 or class_ids.max() >= self.num_classes:
            raise ValueError(f"class ids must lie in 1..{self.num_classes - 1}")
        keys = rank_keys(scores, clip_index)
        order = np.argsort(class_ids, kind="stable")
        class_ids, keys = class_ids[order], keys[order]
        counts = np.bincount(class_ids, minlength=self.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(class_ids.size) - starts[class_ids]
        dense = np.zeros((self.num_classes, int(counts.max())), np.uint64)  # 0 = empty slot
        dense[class_ids, slot] = keys
        both = np.concatenate([self._keys, dense], axis=1)
        self._keys = np.ascontiguousarray(top_keys(both, self.k, sort=False))

    @property
    def keys(self) -> np.ndarray:
        """(num_classes, k) uint64 rank keys in partition order (0 = empty slot)."""
        return self._keys

    def merge(self, other: TopKPerIdentity) -> None:
        """Fold in another accumulator that saw different clips (e.g. a parallel worker)."""
        if (other.num_classes, other.k) != (self.num_classes, self.k):
            raise ValueError("merge: accumulators differ in num_classes or k")
        both = np.concatenate([self._keys, other._keys], axis=1)
        self._keys = np.ascontiguousarray(top_keys(both, self.k, sort=False))

    def ranked(self) -> dict[int, list[tuple[int, float]]]:
        """{id: [(clip_index, score), ...] best first, ties by lower clip index} for ids
        1..num_classes-1, each with min(k, clips seen) entries; scores are float32 values."""
        keys = top_keys(self._keys, self.k)  # sorted best first; empty slots (0) last
        index, score = unpack_rank_keys(keys)
        filled = (keys != 0).sum(axis=1)
        return {
            i: list(zip(index[i, : filled[i]].tolist(), score[i, : filled[i]].tolist()))
            for i in range(1, self.num_classes)
        }

    def ranked_clips(self, clip_names: Sequence[str]) -> dict[int, list[str]]:
        """`ranked()` with clip indices mapped to names: clip_names[clip_index]."""
        return {i: [clip_names[c] for c, _ in pairs] for i, pairs in self.ranked().items()}

    def iter_ranked_clips(self, clip_names: Sequence[str], chunk: int = 1024
                          ) -> Iterator[tuple[int, list[str]]]:
        """(id, clip names best first) for ids 1..num_classes-1 ascending, as `ranked_clips`
        gives them, sorted `chunk` identities at a time: at 10,035 identities the whole
        ranking as Python objects (~1M names and tuples) is never built."""
        for lo in range(1, self.num_classes, chunk):
            keys = top_keys(self._keys[lo:lo + chunk], self.k)
            index, _ = unpack_rank_keys(keys)
            filled = (keys != 0).sum(axis=1)
            for j in range(keys.shape[0]):
                yield lo + j, [clip_names[c] for c in index[j, : filled[j]].tolist()]
