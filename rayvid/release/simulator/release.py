"""Write a simulated release in the official iQIYI-VID-2019 layout.

    summary = simulate_release("data/sim", ids=300, seed=0)

Files (docs/iqiyi-vid-2019.md): face_{train,val}_v2.pickle, face_test.pickle,
{head,body,audio}_{train,val,test}.pickle, train_gt.txt, val_gt.txt; plus the simulated
test key and every generator parameter under `_simulator/` (test_gt.txt, params.json),
which no official file mentions. Each pickle is streamed clip by clip through
`rayvid.release.py2_writer.write_dict`: memory holds one clip, one modality's identity centres and
one int per clip, whatever the scale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rayvid.core.atomic import atomic_path
from rayvid.core.formats import train_gt_line, val_gt_line
from rayvid.release.py2_writer import write_dict
from rayvid.release.simulator.features import VALUE, modality
from rayvid.release.simulator.latent import clip_latent
from rayvid.release.simulator.params import GENERATOR_VERSION, MODALITIES, SPLITS, SimParams
from rayvid.release.simulator.world import World, build_world

log = logging.getLogger(__name__)

SIM_DIR = "_simulator"
DETECTIONS = {"face": "faces", "head": "all", "body": "all", "audio": "none"}  # latent needed
FACE_FILES = {"train": "face_train_v2.pickle", "val": "face_val_v2.pickle",
              "test": "face_test.pickle"}


def pickle_name(modality_name: str, split: str) -> str:
    """The official file name of one modality and split."""
    return FACE_FILES[split] if modality_name == "face" else f"{modality_name}_{split}.pickle"


def clip_name(split: str, index: int) -> str:
    """Official-style clip name of 0-based clip `index`, without `.mp4`."""
    return f"IQIYI_VID_{split.upper()}_{index + 1:07d}"


def iter_clips(world: World, modality_name: str, split: str, stats: dict | None = None
               ) -> Iterator[tuple[bytes, object]]:
    """(clip key bytes, pickle value) of every clip of `split` present in that modality's
    pickle, in clip order; `stats` (if given) accumulates counts as items stream by."""
    m = modality(world, modality_name)
    value_of = VALUE[modality_name]
    stats = {} if stats is None else stats
    for index in range(world.clip_gid[split].size):
        lat = clip_latent(world, split, index, DETECTIONS[modality_name])
        value = value_of(world, m, lat, split, index)
        if value is None:
            continue
        stats["clips"] = stats.get("clips", 0) + 1
        if modality_name != "audio":
            stats["items"] = stats.get("items", 0) + len(value)
            stats["empty"] = stats.get("empty", 0) + (len(value) == 0)
        yield clip_name(split, index).encode("ascii"), value


def _write_text(path: Path, lines: Iterator[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def _gt_lines(world: World, split: str) -> Iterator[str]:
    gids = world.clip_gid[split]
    if split == "train":
        for i, g in enumerate(gids.tolist()):
            yield train_gt_line(clip_name(split, i), g + 1)
        return
    known = np.flatnonzero(gids < world.n_known)
    order = known[np.argsort(gids[known], kind="stable")]
    bounds = np.flatnonzero(np.diff(gids[order])) + 1
    for group in np.split(order, bounds) if order.size else []:
        yield val_gt_line(int(gids[group[0]]) + 1, [clip_name(split, int(i)) for i in group])


def _split_counts(world: World, split: str) -> dict:
    gids = world.clip_gid[split]
    noise = int((gids >= world.n_known).sum())
    return {"clips": int(gids.size), "labelled": int(gids.size) - noise, "noise": noise,
            "identities": int(np.unique(gids[gids < world.n_known]).size)}


def simulate_release(out_dir: str | os.PathLike, ids: int, seed: int = 0, **params: object) -> dict:
    """Write a simulated release for `ids` known identities into `out_dir` (created;
    existing files of the same names are replaced).

    `params` override `SimParams` fields (e.g. faces_per_clip=5, noise_fraction=0.4);
    unknown names raise ConfigError. Same (ids, seed, params): byte-identical files.
    Returns a summary: per split clips, faces, bytes and seconds, and the totals.
    """
    world = build_world(ids, seed, SimParams.with_overrides(**params))
    out = Path(out_dir)
    (out / SIM_DIR).mkdir(parents=True, exist_ok=True)
    summary = {"out_dir": str(out), "ids": ids, "seed": seed, "splits": {}}
    counts, files = {}, {}
    with _one_blas_thread():
        for split in SPLITS:
            summary["splits"][split], counts[split] = _write_split(world, out, split, files)
    meta = {"generator": GENERATOR_VERSION, "seed": seed, "ids": ids, "noise_ids": world.n_noise,
            "lookalikes": {"known": int((world.parent[:ids] >= 0).sum()),
                           "noise": int((world.parent[ids:] >= 0).sum())},
            "dims": {n: world.dim(n) for n in MODALITIES}, "params": world.params.as_dict(),
            "counts": counts, "file_bytes": files}
    _write_text(out / SIM_DIR / "params.json", iter([json.dumps(meta, indent=2, sort_keys=True)]))
    for key in ("clips", "faces", "bytes", "seconds"):
        summary[key] = round(sum(r[key] for r in summary["splits"].values()), 3)
    return summary


def _write_split(world: World, out: Path, split: str, files: dict) -> tuple[dict, dict]:
    """The four pickles and the gt of one split; -> (summary row, counts)."""
    start, counts = time.perf_counter(), _split_counts(world, split)
    for name in MODALITIES:
        stats: dict = {}
        path = out / pickle_name(name, split)
        write_dict(path, iter_clips(world, name, split, stats))
        files[path.name] = path.stat().st_size
        counts[name] = stats
    gt = {"train": out / "train_gt.txt", "val": out / "val_gt.txt",
          "test": out / SIM_DIR / "test_gt.txt"}
    _write_text(gt[split], _gt_lines(world, split))
    row = {"clips": counts["clips"], "faces": counts["face"].get("items", 0),
           "bytes": sum(files[pickle_name(n, split)] for n in MODALITIES),
           "seconds": round(time.perf_counter() - start, 3)}
    log.info("%s: %d clips (%d noise), %d faces, %.1f MB, %.1f s", split, row["clips"],
             counts["noise"], row["faces"], row["bytes"] / 1e6, row["seconds"])
    return row, counts


def _one_blas_thread():
    """Single-threaded BLAS for the duration: the per-clip products are tiny, and threads
    that spin on them cost 2-3x the CPU (and make results depend on the thread count)."""
    try:
        from threadpoolctl import threadpool_limits  # ships with scikit-learn
    except ImportError:  # pragma: no cover - the pyproject's dependencies include it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
