"""Per-clip latent variables: who is in the clip and where every detection is.

`clip_latent(world, split, index)` re-derives a clip from its own random stream
(seed, CLIP, split, index, 0), so the face, head, body and audio writers each rebuild the
same clip without storing it. It draws scalars only (counts, frames, qualities, boxes);
the 512-d features come from one stream per modality (`rayvid.release.simulator.features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayvid.release.simulator.params import SimParams
from rayvid.release.simulator.world import CLIP, SPLIT_CODE, World, stream

FACES, EMPTY, ABSENT = "faces", "empty", "absent"


COLUMNS = ("frame", "q", "det", "cx", "cy", "side")


@dataclass(frozen=True)
class Track:
    """Detections of one kind in a clip, sorted by frame (stable).

    `table` columns (COLUMNS): frame (1-based, integral), q (quality; a head's is the
    quality of the face it would show), det, cx, cy (box centre, pixels), side (face-box
    width, pixels). One array, so sorting and selecting rows are single operations.
    """

    owner: np.ndarray   # (n,) int8: 0 = the clip's person, 1 = co-star, -1 = false detection
    table: np.ndarray   # (n, 6) float64

    @property
    def n(self) -> int:
        return int(self.owner.size)

    @property
    def frame(self) -> np.ndarray:
        return self.table[:, 0].astype(np.int64)

    q = property(lambda self: self.table[:, 1])
    det = property(lambda self: self.table[:, 2])
    cx = property(lambda self: self.table[:, 3])
    cy = property(lambda self: self.table[:, 4])
    side = property(lambda self: self.table[:, 5])

    def rows(self, keep: np.ndarray) -> "Track":
        return Track(self.owner[keep], self.table[keep])


@dataclass(frozen=True)
class ClipLatent:
    persons: tuple[int, int]   # gids of the person and the co-star (-1: no co-star)
    outfits: tuple[int, int]   # wardrobe index per person, -1: an outfit of this clip only
    face_state: str            # FACES, EMPTY (empty list) or ABSENT (not in the face pickle)
    faces: Track | None        # None unless asked for (clip_latent's `detections`)
    heads: Track | None
    has_body: np.ndarray | None  # (n_heads,) bool: the head has a body box
    audio: bool                # the clip is in the audio pickle
    speaker: int               # gid of the voice
    speech: float              # speech share in [0, 1]: the audio's identity strength
    tuples: tuple[bool, ...]   # per modality (face, head, body, audio): items are tuples


def _sorted(owner: np.ndarray, table: np.ndarray) -> Track:
    order = np.argsort(table[:, 0], kind="stable")
    return Track(owner[order].astype(np.int8), table[order])


def _true_det(rng, n, p: SimParams):
    return 1.0 - p.det_true_span * rng.beta(1.0, p.det_true_b, size=n)


def _faces(rng, n, share, kappa, length, centres, p: SimParams) -> Track:
    if n == 0:
        return Track(np.zeros(0, dtype=np.int8), np.zeros((0, len(COLUMNS))))
    r = rng.random((n, 4))
    false = r[:, 0] < p.false_fraction
    n_false = int(false.sum())
    owner = np.where(false, -1, (r[:, 1] < share).astype(np.int64))
    t = np.empty((n, len(COLUMNS)))
    for who in (0, 1):  # distinct frames per person: sorted draws + 0, 1, 2, ...
        sel = owner == who
        k = int(sel.sum())
        t[sel, 0] = np.sort(rng.integers(0, length - k + 1, size=k)) + np.arange(1, k + 1)
    t[false, 0] = rng.integers(1, length + 1, size=n_false)
    q = p.q_min + kappa * rng.gamma(p.q_shape, p.q_scale, size=n)
    q[false] = p.q_min + rng.gamma(p.false_q_shape, p.false_q_scale, size=n_false)
    t[:, 1] = np.clip(q, p.q_min, p.q_max)
    t[:, 2] = _true_det(rng, n, p)
    lo, hi = p.false_det
    t[false, 2] = lo + (hi - lo) * rng.beta(2.0, 2.0, size=n_false)
    size = np.array(p.frame_size, dtype=np.float64)
    t[:, 3:5] = centres[np.maximum(owner, 0)] + rng.normal(0.0, 0.02, size=(n, 2)) * size
    t[false, 3:5] = r[false, 2:] * size  # a false detection can be anywhere
    t[:, 5] = (24.0 + 0.9 * np.maximum(t[:, 1], 0.0)) * rng.lognormal(0.0, 0.15, size=n)
    return _sorted(owner, t)


def _heads(rng, faces: Track | None, n_faceless, share, length, centres, p: SimParams) -> Track:
    """Heads of the true faces (same frame, box around the face) plus faceless heads."""
    if faces is not None:
        true = faces.owner >= 0
        keep = true & (rng.random(faces.n) < p.head_presence)
        n_extra = int(rng.poisson(p.head_extra_rate * int(true.sum())))
    else:
        n_extra = n_faceless
    owner = (rng.random(n_extra) < share).astype(np.int8)
    t = np.empty((n_extra, len(COLUMNS)))
    t[:, 0] = rng.integers(1, length + 1, size=n_extra)
    t[:, 1] = rng.uniform(*p.faceless_q, size=n_extra)
    t[:, 3:5] = centres[owner] + rng.normal(0.0, 0.03, size=(n_extra, 2)) * p.frame_size
    t[:, 5] = (24.0 + 0.9 * np.maximum(t[:, 1], 0.0)) * rng.lognormal(0.0, 0.15, size=n_extra)
    if faces is not None:
        owner = np.concatenate([faces.owner[keep], owner])
        t = np.concatenate([faces.table[keep], t])
    t[:, 2] = _true_det(rng, owner.size, p)
    t[:, 4] -= 0.15 * t[:, 5]  # the head box sits above the face box ...
    t[:, 5] *= 1.8             # ... and is 1.8 times wider
    return _sorted(owner, t)


def _other(candidate: int, gid: int, pool: int) -> int:
    """candidate in [0, pool) made different from gid; -1 when pool has no one else."""
    other = (candidate + 1) % pool if candidate == gid else candidate
    return -1 if other == gid else other


def _people(u, cand, gid: int, pool: int, p: SimParams) -> tuple[int, float, int]:
    """(co-star gid or -1, co-star share of the true faces, speaker gid)."""
    costar = _other(int(cand[0]), gid, pool) if u[1] < p.costar_fraction else -1
    lo, hi = p.costar_share
    share = lo + (hi - lo) * u[2] if costar >= 0 else 0.0
    speaker = gid
    if u[11] < p.audio_wrong_speaker:
        other = costar if costar >= 0 else _other(int(cand[1]), gid, pool)
        speaker = other if other >= 0 else gid
    return costar, share, speaker


def clip_latent(world: World, split: str, index: int, detections: str = "all") -> ClipLatent:
    """The latent variables of clip `index` (0-based) of `split`.

    `detections`: "all", "faces" (heads/has_body left None) or "none" (faces too): the
    draws are ordered clip scalars, faces, heads, so a prefix is the same clip, cheaper.
    """
    p = world.params
    rng = stream(world.seed, CLIP, SPLIT_CODE[split], index, 0)
    gid = int(world.clip_gid[split][index])
    pool = world.n_known if split == "train" else world.n_ids  # noise people: val/test only
    # u: 0 face state, 1 co-star?, 2 co-star share, 3 clip length, 4-7 track centres,
    # 8-9 own outfit?, 10 audio?, 11 wrong speaker?, 12-15 tuples?, 16 faceless heads
    u = rng.random(17)
    z = rng.standard_normal(2)  # detection count, clip quality scale
    cand = rng.integers([pool, pool, p.body_wardrobe, p.body_wardrobe])  # co-star, voice, outfits
    speech = float(rng.beta(*p.audio_speech))
    state = (ABSENT if u[0] < p.absent_fraction else
             EMPTY if u[0] < p.absent_fraction + p.empty_fraction else FACES)
    mean = np.log(p.faces_per_clip) - 0.5 * p.faces_sigma**2
    n_latent = min(max(round(float(np.exp(mean + p.faces_sigma * z[0]))), 1), p.faces_cap)
    costar, share, speaker = _people(u, cand, gid, pool, p)
    kappa = float(np.exp(p.q_clip_sigma * z[1] - 0.5 * p.q_clip_sigma**2))
    lo, hi = p.frames_per_face
    length = int(np.ceil(n_latent * (lo + (hi - lo) * u[3])))
    w, h = p.frame_size
    centres = np.array([[(0.3 + 0.4 * u[4]) * w, (0.25 + 0.35 * u[5]) * h],
                        [(0.1 + 0.8 * u[6]) * w, (0.2 + 0.5 * u[7]) * h]])
    outfits = tuple(int(k) if own < p.body_own_outfit else -1 for own, k in zip(u[8:10], cand[2:]))
    audio = bool(u[10] < p.audio_presence)
    tuples = tuple(bool(t) for t in u[12:16] < p.tuple_fraction)
    lo, hi = p.faceless_head_share
    n_faceless = 0 if state == FACES else int(round(n_latent * (lo + (hi - lo) * u[16])))
    faces = heads = has_body = None
    if detections in ("faces", "all"):
        faces = _faces(rng, n_latent if state == FACES else 0, share, kappa, length, centres, p)
    if detections == "all":
        shown = faces if state == FACES else None
        heads = _heads(rng, shown, n_faceless, share, length, centres, p)
        has_body = rng.random(heads.n) < p.body_presence
    return ClipLatent((gid, costar), outfits, state, faces, heads, has_body,
                      audio, speaker, speech, tuples)
