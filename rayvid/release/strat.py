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
