"""Feature vectors and pickle values of one clip, one modality at a time.

All four modalities use one formula (docs/simulator.md, "Features"): with identity
strength t in [0, 1],

    u = t * (mu_person + o_clip + j_face) + extra + (1 - t) * blur_weight * b + sigma(t) * eps
    x = (norm_base + norm_span * t) * LogNormal(0, norm_sigma) * u / ||u||

so a weak (low-quality, back-of-head, silent) detection carries little identity, drifts to
the shared direction b and is noisier and shorter. Each modality draws from its own
stream (seed, CLIP, split, index, 1 + modality), so files can be written independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayvid.release.simulator.latent import ABSENT, ClipLatent, Track
from rayvid.release.simulator.params import SimParams
from rayvid.release.simulator.world import CLIP, MODALITY_CODE, SPLIT_CODE, World, stream, unit_rows


@dataclass(frozen=True)
class Modality:
    name: str
    centres: np.ndarray   # (N + M, dim) float32 unit identity centres
    identity: np.ndarray  # (dim, R) float32 identity subspace
    basis: np.ndarray     # (dim, K) float32 pose subspace
    blur: np.ndarray      # (dim,) float32 unit blur direction
    weight: float         # identity weight: t = weight * s(q)
    clip_scale: float     # clip offsets relative to the face's
    clothes: np.ndarray | None = None   # body: (dim, C) float32 clothes subspace
    wardrobe: np.ndarray | None = None  # body: (N + M, wardrobe, C) float32 outfit coordinates


def modality(world: World, name: str) -> Modality:
    """The per-modality constants (centres built here: one modality in memory at a time)."""
    p = world.params
    weight = {"face": 1.0, "head": p.head_weight, "body": p.body_weight, "audio": 1.0}[name]
    scale = {"face": 1.0, "head": p.head_clip_scale, "body": p.head_clip_scale, "audio": 1.0}[name]
    clothes = world.clothes_basis() if name == "body" else None
    wardrobe = world.wardrobe() if name == "body" else None
    return Modality(name, world.centres(name), world.identity_basis(name), world.pose_basis(name),
                    world.blur(name), weight, scale, clothes, wardrobe)


def strength(q: np.ndarray, p: SimParams) -> np.ndarray:
    """s(q) in (0, 1): how much identity a detection of quality q shows."""
    z = (np.asarray(q, dtype=np.float64) - p.strength_mid) / p.strength_width
    return 1.0 / (1.0 + np.exp(-z))


def compose(rng, m: Modality, mu, offset, t, p: SimParams, jitter_std=0.0,
            extra=None) -> np.ndarray:
    """(n, dim) float16 features from centres mu (n, dim) float32, clip offsets (n, dim),
    strength t (n,) and an optional extra term (n, dim) added unscaled."""
    n, d = mu.shape
    u = mu + offset
    if jitter_std > 0:
        k = m.basis.shape[1]
        g = rng.standard_normal((n, k), dtype=np.float32) * np.float32(jitter_std / np.sqrt(k))
        u += g @ m.basis.T
    t32 = t.astype(np.float32)[:, None]
    u *= t32
    u += ((1.0 - t32) * np.float32(p.blur_weight)) * m.blur
    if extra is not None:
        u += extra
    sigma = p.noise_std_hi + (p.noise_std_lo - p.noise_std_hi) * (1.0 - t32)
    u += (sigma / np.float32(np.sqrt(d))) * rng.standard_normal((n, d), dtype=np.float32)
    norm = (p.norm_base + p.norm_span * t) * rng.lognormal(0.0, p.norm_sigma, size=n)
    return (unit_rows(u) * norm.astype(np.float32)[:, None]).astype(np.float16)


def person_offsets(rng, m: Modality, p: SimParams) -> np.ndarray:
    """(2, dim) float32 clip offsets of the person and the co-star: pose subspace plus
    identity subspace (the part that makes clips of different people confusable)."""
    k, r = m.basis.shape[1], m.identity.shape[1]
    omega = m.clip_scale * rng.lognormal(-0.5 * p.clip_spread**2, p.clip_spread, size=(2, 1))
    pose = rng.standard_normal((2, k), dtype=np.float32) * np.float32(p.clip_pose_std / np.sqrt(k))
    ident = rng.standard_normal((2, r), dtype=np.float32) * np.float32(p.clip_id_std / np.sqrt(r))
    return omega.astype(np.float32) * (pose @ m.basis.T + ident @ m.identity.T)


def _rows(rng, m: Modality, lat: ClipLatent, owner: np.ndarray, p: SimParams):
    """Centres and clip offsets per detection; a false detection (owner -1) gets a random
    unrelated centre and no clip offset."""
    offsets = person_offsets(rng, m, p)
    gids = np.array(lat.persons)
    real = owner >= 0
    if real.all():  # the common case, without false detections
        return m.centres[gids[owner]], offsets[owner]
    mu = np.empty((owner.size, m.centres.shape[1]), dtype=np.float32)
    mu[real] = m.centres[gids[owner[real]]]
    mu[~real] = unit_rows(rng.standard_normal((int((~real).sum()), mu.shape[1]), dtype=np.float32))
    off = np.where(real[:, None], offsets[np.maximum(owner, 0)], np.float32(0.0))
    return mu, off


def boxes(cx, cy, w, h, p: SimParams) -> list:
    """[x1, y1, x2, y2] int boxes clipped to the frame, x1 <= x2 and y1 <= y2."""
    fw, fh = p.frame_size
    half = np.stack([-w / 2, -h / 2, w / 2, h / 2], axis=1)
    b = np.clip(half + np.stack([cx, cy, cx, cy], axis=1), 0, (fw - 1, fh - 1, fw - 1, fh - 1))
    b = b.astype(np.int64)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
    return b.tolist()


def _frames(track: Track) -> list:
    return [b"%d" % f for f in track.frame.tolist()]


def _pack(rows, as_tuple: bool) -> list:
    return [tuple(r) for r in rows] if as_tuple else [list(r) for r in rows]


def _rng(world: World, split: str, index: int, name: str) -> np.random.Generator:
    return stream(world.seed, CLIP, SPLIT_CODE[split], index, 1 + MODALITY_CODE[name])


def face_value(world: World, m: Modality, lat: ClipLatent, split: str, index: int):
    """List of [frame, bbox, det, quality, feat (512,) float16], or None: not in the pickle."""
    if lat.face_state == ABSENT:
        return None
    p, f = world.params, lat.faces
    rng = _rng(world, split, index, m.name)
    mu, off = _rows(rng, m, lat, f.owner, p)
    feats = compose(rng, m, mu, off, m.weight * strength(f.q, p), p, jitter_std=p.face_pose_std)
    det, q = np.round(f.det, 5).tolist(), np.round(f.q, 4).tolist()
    rows = zip(_frames(f), boxes(f.cx, f.cy, f.side, 1.25 * f.side, p), det, q, feats)
    return _pack(rows, lat.tuples[0])


def head_value(world: World, m: Modality, lat: ClipLatent, split: str, index: int):
    """List of [frame, bbox, det, feat (head_dim,) float16]."""
    p, h = world.params, lat.heads
    rng = _rng(world, split, index, m.name)
    mu, off = _rows(rng, m, lat, h.owner, p)
    feats = compose(rng, m, mu, off, m.weight * strength(h.q, p), p, jitter_std=p.face_pose_std)
    bbox = boxes(h.cx, h.cy, h.side, 1.1 * h.side, p)
    rows = zip(_frames(h), bbox, np.round(h.det, 5).tolist(), feats)
    return _pack(rows, lat.tuples[1])


def _outfits(rng, m: Modality, lat: ClipLatent) -> np.ndarray:
    """(2, dim) float32 unit outfit vectors of the person and the co-star: one of their
    wardrobe's, or one of this clip only (both in the clothes subspace)."""
    c = m.clothes.shape[1]
    z = rng.standard_normal((2, c), dtype=np.float32)
    for j, (g, k) in enumerate(zip(lat.persons, lat.outfits)):
        if g >= 0 and k >= 0:
            z[j] = m.wardrobe[g, k]
    return unit_rows(z @ m.clothes.T)


def body_value(world: World, m: Modality, lat: ClipLatent, split: str, index: int):
    """List of [frame, bbox, feat (body_dim,) float16]: weak identity plus an outfit vector."""
    p, h = world.params, lat.heads.rows(lat.has_body)
    rng = _rng(world, split, index, m.name)
    outfit = _outfits(rng, m, lat)
    visible = strength(h.q, p)
    mu, off = _rows(rng, m, lat, h.owner, p)
    extra = (p.body_outfit_weight * visible.astype(np.float32))[:, None] * outfit[h.owner]
    feats = compose(rng, m, mu, off, m.weight * visible, p, jitter_std=p.face_pose_std, extra=extra)
    w = 1.4 * h.side  # 1.4 head widths wide, 3.5 times that high, below the head
    bbox = boxes(h.cx, h.cy + 0.55 * h.side + 1.75 * w, w, 3.5 * w, p)
    return _pack(zip(_frames(h), bbox, feats), lat.tuples[2])


def audio_value(world: World, m: Modality, lat: ClipLatent, split: str, index: int):
    """One (audio_dim,) float16 vector, or None: the clip has no audio."""
    if not lat.audio:
        return None
    p = world.params
    rng = _rng(world, split, index, m.name)
    r = m.identity.shape[1]
    g = rng.standard_normal((1, r), dtype=np.float32) * np.float32(p.audio_clip_std / np.sqrt(r))
    offset = g @ m.identity.T
    t = np.array([lat.speech])
    return compose(rng, m, m.centres[[lat.speaker]], offset, m.weight * t, p)[0]


VALUE = {"face": face_value, "head": head_value, "body": body_value, "audio": audio_value}
