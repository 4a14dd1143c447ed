"""The official iQIYI-VID-2019 release: its files, its labels, and one clip's validated value.

Spec: `../shared/docs/iqiyi-vid-2019.md`. A release folder holds, per split, four pickled
dicts (face, head, body, audio; clip name bytes -> value) and, for train/val, a gt file.

    release = Release.discover("/data/iqiyi")          # MissingFilesError lists what is missing
    labels = release.labels("val")                      # {clip: id}, ids 1..10034
    faces = parse_detections(value, "face", file=path, clip=clip, feat_dim=512)

Pickles are never unpickled here: `rayvid.release.pickle_reader.iter_dict_items` streams them through
its restricted reader, and the functions below turn one clip's plain value into numpy arrays
or raise `BadClipError` naming the file, the clip and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rayvid.core.formats import NUM_IDENTITIES, clip_stem, read_gt, read_train_gt
from rayvid.release.clip_values import (DETECTION_FIELDS, BadClipError, clip_name, parse_audio,
                                parse_detections)
from rayvid.release.pickle_reader import ReleaseFormatError
from rayvid.release.schema import MODALITIES, SPLITS

__all__ = ["DETECTION_FIELDS", "BadClipError", "MissingFilesError", "Release", "clip_name",
           "parse_audio", "parse_detections"]

GT_FILES = {"train": "train_gt.txt", "val": "val_gt.txt"}
# Accepted file names per (split, modality), in order of preference.
PICKLE_FILES = {
    (split, m): (f"{m}_{split}.pickle",) for split in SPLITS for m in MODALITIES
}
PICKLE_FILES["train", "face"] = ("face_train_v2.pickle",)
PICKLE_FILES["val", "face"] = ("face_val_v2.pickle",)
PICKLE_FILES["test", "face"] = ("face_test.pickle", "face_test_v2.pickle")


class MissingFilesError(ReleaseFormatError):
    """The release folder lacks required files; the message lists all of them."""


@dataclass(frozen=True)
class Release:
    """Paths of one release: `pickles[split][modality]`, `gt[split]` (train, val)."""

    root: Path
    pickles: dict[str, dict[str, Path]]
    gt: dict[str, Path]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.pickles)

    @classmethod
    def discover(cls, root: str | Path) -> "Release":
        """Find the files of every split; train and val are required, test is optional.

        Raises MissingFilesError listing every missing file (for test, only when some but
        not all of its pickles are there), or when both `face_test.pickle` and
        `face_test_v2.pickle` exist (ambiguous).
        """
        root = Path(root)
        if not root.is_dir():
            raise MissingFilesError(f"release folder {root} does not exist")
        pickles: dict[str, dict[str, Path]] = {}
        missing: list[str] = []
        for split in SPLITS:
            found, lacking = {}, []
            for m in MODALITIES:
                names = PICKLE_FILES[split, m]
                hits = [root / n for n in names if (root / n).is_file()]
                if len(hits) > 1:
                    raise MissingFilesError(
                        f"release {root}: both {' and '.join(names)} exist; keep one")
                if hits:
                    found[m] = hits[0]
                else:
                    lacking.append(" or ".join(names))
            if split == "test" and not found:
                continue
            missing += lacking
            pickles[split] = found
        gt = {s: root / n for s, n in GT_FILES.items()}
        missing += [p.name for p in gt.values() if not p.is_file()]
        if missing:
            raise MissingFilesError(f"release {root} is missing: {', '.join(missing)}")
        return cls(root, pickles, gt)

    def split_bytes(self, split: str) -> int:
        """Total size of the split's pickles on disk, in bytes."""
        return sum(p.stat().st_size for p in self.pickles[split].values())

    def labels(self, split: str, num_ids: int = NUM_IDENTITIES) -> dict[str, int]:
        """{clip name without .mp4 (the pickles' key): id} of the split's gt file (empty
        for test); a malformed gt file raises `rayvid.core.formats.GroundTruthError`."""
        if split == "train":
            return {clip_stem(c): i for c, i in read_train_gt(self.gt[split], num_ids).items()}
        if split == "val":
            return {clip_stem(c): i for i, clips in read_gt(self.gt[split], num_ids).items()
                    for c in clips}
        return {}
