"""`strat_rank`: the stratification key that makes folds computable per batch.

Within each label (0 = noise, 1..10034 = identity), the train+val clips are ordered by a
seeded hash of their name and numbered 0, 1, 2, ...; the fold of a clip for K folds is
`(strat_rank + label) % K` (`schema.fold_of`). Ranks are dense within a label, so every
label's clips spread over the K folds with counts differing by at most 1, for any K; adding
the label staggers where each label's remainder falls so folds stay equal in size overall.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from rayvid.release.schema import NOISE_LABEL

STRAT_SEED = 0


def strat_key(clip: str, seed: int = STRAT_SEED) -> bytes:
    """Seeded 64-bit hash of a clip name: the order of clips within a label."""
    return hashlib.blake2b(clip.encode("utf-8"), digest_size=8,
                           key=seed.to_bytes(8, "little")).digest()


def strat_ranks(splits: dict[str, tuple[set[str], dict[str, int]]],
                seed: int = STRAT_SEED) -> dict[str, int]:
    """{clip: rank within its label} over all given splits together.

    splits: split -> (clip names present, {clip: label} from gt); a present clip not in
    gt is noise. Holds names only: ~30 MB for the real train+val.
    """
    by_label: dict[int, list[str]] = defaultdict(list)
    for present, labels in splits.values():
        for clip in present:
            by_label[labels.get(clip, NOISE_LABEL)].append(clip)
    ranks: dict[str, int] = {}
    for clips in by_label.values():
        clips.sort(key=lambda c: (strat_key(c, seed), c))
        ranks.update((c, r) for r, c in enumerate(clips))
    return ranks


# ------------------------------------------------------------------ the unseen part of val

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def name_hash(names: np.ndarray | list[str]) -> np.ndarray:
    """64-bit FNV-1a of each clip name's UTF-8 bytes, vectorised over clips (one pass per
    byte position, not per clip), then murmur3's fmix64 finaliser so that names that
    differ in their last digit (the release's numbering) differ in every bit: a stable,
    seedless key that depends on the name alone, so any process, batch order or file
    layout gives a clip the same value. names: (n,) str. Returns (n,) uint64."""
    raw = np.char.encode(np.asarray(names, dtype=str), "utf-8") if len(names) else \
        np.zeros(0, "S1")
    lengths = np.char.str_len(raw) if len(raw) else np.zeros(0, np.int64)
    width = max(raw.dtype.itemsize, 1)
    data = np.frombuffer(raw.tobytes(), np.uint8).reshape(len(raw), width)
    h = np.full(len(raw), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            live = lengths > j
            h = np.where(live, (h ^ data[:, j].astype(np.uint64)) * _FNV_PRIME, h)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def unseen_mask(names: np.ndarray | list[str], fraction: float) -> np.ndarray:
    """(n,) bool: the clips of the *unseen part* of val, a `fraction` of its clips chosen by
    `name_hash` alone (independent of the label and of the folds). When training folds val
    in (the open-set recipes, `rayvid.train.config.OpenSetSection`), these clips are never
    trained on, never in a fold, and the final val mAP is scored on them only."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"unseen fraction must lie in [0, 1], got {fraction}")
    u = (name_hash(names) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction
