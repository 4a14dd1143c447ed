"""The simulated world: identities, look-alikes and which clip shows whom.

Everything here is O(identities + clips) in memory, never O(faces): identity centres
(one modality at a time, (N + M, dim) float32), the look-alike graph and one int32
identity per clip per split. Per-face data is generated later, clip by clip
(`rayvid.release.simulator.clips`).

Global identity ids: 0..N-1 are the known identities (label = gid + 1), N..N+M-1 are the
noise identities (val/test only, no label).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from rayvid.release.simulator.params import MODALITIES, SPLITS, SimParams

# First word of every SeedSequence: which part of the model a random stream feeds.
GRAPH, CENTRES, BASIS, TABLES, CLIP, OUTFIT = 1, 2, 3, 4, 5, 6
SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}
MODALITY_CODE = {name: i for i, name in enumerate(MODALITIES)}
LOOKALIKE_MODALITIES = ("face", "head")  # look-alikes share their face and head


def stream(seed: int, *words: int) -> np.random.Generator:
    """The random stream named by (seed, *words): same words, same numbers."""
    return np.random.default_rng([seed, *words])


@functools.lru_cache(maxsize=64)
def orthonormal_basis(seed: int, modality_code: int, which: int, dim: int, rank: int) -> np.ndarray:
    """(dim, rank) float32 orthonormal columns from stream (seed, BASIS, modality, which):
    modified Gram-Schmidt in plain numpy (no LAPACK threads), cached per process."""
    q = stream(seed, BASIS, modality_code, which).standard_normal((dim, rank))
    for j in range(rank):
        q[:, j] /= np.sqrt(np.sum(q[:, j] ** 2))
        q[:, j + 1:] -= np.outer(q[:, j], np.sum(q[:, j, None] * q[:, j + 1:], axis=0))
    basis = q.astype(np.float32)
    basis.flags.writeable = False
    return basis


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm: (n, d) -> (n, d)."""
    return x / np.maximum(np.sqrt(np.sum(x * x, axis=-1, keepdims=True)), 1e-12)


@dataclass(frozen=True)
class World:
    """Identities and split tables of one simulated release."""

    seed: int
    params: SimParams
    n_known: int                      # N
    n_noise: int                      # M
    parent: np.ndarray                # (N + M,) int32: look-alike parent gid, -1 if none
    parent_cos: np.ndarray            # (N + M,) float32: target cosine to the parent
    clip_gid: dict[str, np.ndarray]   # split -> (n_clips,) int32 gid of the clip's person

    @property
    def n_ids(self) -> int:
        return self.n_known + self.n_noise

    def dim(self, modality: str) -> int:
        p = self.params
        dims = {"face": p.dim, "head": p.head_dim, "body": p.body_dim, "audio": p.audio_dim}
        return dims[modality]

    def centres(self, modality: str) -> np.ndarray:
        """(N + M, dim) float32 unit identity centres of one modality, in its identity
        subspace; a look-alike is rho * parent + sqrt(1 - rho^2) * (unit, orthogonal)."""
        rng = stream(self.seed, CENTRES, MODALITY_CODE[modality])
        z = rng.standard_normal((self.n_ids, self.params.identity_rank), dtype=np.float32)
        mu = unit_rows(z @ self.identity_basis(modality).T)
        if modality in LOOKALIKE_MODALITIES:
            kids = np.flatnonzero(self.parent >= 0)
            if kids.size:
                p = mu[self.parent[kids]]
                z = mu[kids] - np.sum(mu[kids] * p, axis=1, keepdims=True) * p
                rho = self.parent_cos[kids, None]
                mu[kids] = rho * p + np.sqrt(1.0 - rho**2) * unit_rows(z)
        return mu

    def identity_basis(self, modality: str) -> np.ndarray:
        """(dim, R) float32 orthonormal basis of the subspace identities (and clip
        appearance) vary in: R < dim makes impostors as close as in a real embedding."""
        return orthonormal_basis(self.seed, MODALITY_CODE[modality], 2, self.dim(modality),
                                 self.params.identity_rank)

    def pose_basis(self, modality: str) -> np.ndarray:
        """(dim, K) float32 orthonormal basis of the shared pose/lighting/age subspace."""
        return orthonormal_basis(self.seed, MODALITY_CODE[modality], 0, self.dim(modality),
                                 self.params.pose_rank)

    def blur(self, modality: str) -> np.ndarray:
        """(dim,) float32 unit 'blur' direction that low-quality features drift to."""
        rng = stream(self.seed, BASIS, MODALITY_CODE[modality], 1)
        return unit_rows(rng.standard_normal(self.dim(modality), dtype=np.float32))

    def clothes_basis(self) -> np.ndarray:
        """(body_dim, C) float32 orthonormal basis of the subspace outfits vary in."""
        return orthonormal_basis(self.seed, MODALITY_CODE["body"], 3, self.params.body_dim,
                                 self.params.clothes_rank)

    def wardrobe(self) -> np.ndarray:
        """(N + M, body_wardrobe, C) float32: clothes-subspace coordinates of every
        identity's outfits (stream OUTFIT), shared by all of that person's clips."""
        rng = stream(self.seed, OUTFIT)
        shape = (self.n_ids, self.params.body_wardrobe, self.params.clothes_rank)
        return rng.standard_normal(shape, dtype=np.float32)

    def label(self, gid: int) -> int:
        """1..N for a known identity, 0 for a noise identity."""
        return gid + 1 if gid < self.n_known else 0


def _lookalike_graph(rng: np.random.Generator, n: int, m: int, p: SimParams):
    parent = np.full(n + m, -1, dtype=np.int32)
    cos = np.zeros(n + m, dtype=np.float32)
    n_kids = int(round(p.lookalike_fraction * n))
    kids = rng.permutation(n)[:n_kids] if n > 1 else np.zeros(0, dtype=np.int64)
    roots = np.setdiff1d(np.arange(n), kids)          # parents are never look-alikes
    noise_kids = n + rng.permutation(m)[: int(round(p.noise_lookalike_fraction * m))]
    all_kids = np.concatenate([kids, noise_kids]).astype(np.int64)
    if all_kids.size and roots.size:
        parent[all_kids] = roots[rng.integers(roots.size, size=all_kids.size)]
        cos[all_kids] = rng.uniform(*p.lookalike_cos, size=all_kids.size)
    return parent, cos


def _clip_tables(rng: np.random.Generator, n: int, m: int, p: SimParams):
    """Per split, the gid of every clip, in clip order (a seeded shuffle)."""
    g = rng.gamma(p.pop_shape, p.pop_mean / p.pop_shape, size=n)
    counts = {"train": 1 + rng.poisson(g)}
    for split in ("val", "test"):
        present = rng.random(n) < p.eval_presence
        counts[split] = present * (1 + rng.poisson(p.eval_rate * g))
    tables = {}
    for split in SPLITS:
        gids = np.repeat(np.arange(n, dtype=np.int32), counts[split])
        if split != "train" and p.noise_fraction > 0 and m > 0:
            n_noise = int(round(gids.size * p.noise_fraction / (1.0 - p.noise_fraction)))
            gids = np.concatenate([gids, (n + rng.integers(m, size=n_noise)).astype(np.int32)])
        tables[split] = gids[rng.permutation(gids.size)]
    return tables


def build_world(ids: int, seed: int, params: SimParams) -> World:
    """The identities and clip tables for `ids` known identities."""
    if ids < 1:
        raise ValueError(f"ids must be >= 1, got {ids}")
    if not 0.0 <= params.noise_fraction < 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1), got {params.noise_fraction}")
    m = max(1, int(round(params.noise_id_ratio * ids))) if params.noise_fraction > 0 else 0
    parent, cos = _lookalike_graph(stream(seed, GRAPH), ids, m, params)
    tables = _clip_tables(stream(seed, TABLES), ids, m, params)
    return World(seed, params, ids, m, parent, cos, tables)
