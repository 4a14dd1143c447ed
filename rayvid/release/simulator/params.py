"""The simulator's generative-model constants, one frozen dataclass.

Every number of `docs/simulator.md` lives here and nowhere else. The defaults are FIXED:
they model the real release as the top teams describe it and must not be tuned to make
any method look good. Tests shrink only the scale knobs (`faces_per_clip`,
`noise_fraction`), never the model. A rayvid `Config` (frozen, unknown keys rejected):
`jobs/simulate.py --set faces_sigma=0.8` and `SimParams.with_overrides(...)` are checked.
"""

from __future__ import annotations

import math

from pydantic import Field

from rayvid.config import Config, to_dict, with_values

GENERATOR_VERSION = "rayvid-sim-1"
MODALITIES = ("face", "head", "body", "audio")
SPLITS = ("train", "val", "test")


class SimParams(Config):
    """Generator parameters; `ids` and `seed` are passed separately."""

    # --- scale: clips per identity (Gamma-Poisson, mean ~6 train clips, mode 2) ---
    pop_shape: float = 1.5            # Gamma shape k of an identity's popularity g
    pop_mean: float = 5.04            # E[g]; n_train = 1 + Poisson(g)
    eval_rate: float = 0.72           # n_val, n_test = 1 + Poisson(eval_rate * g) ...
    eval_presence: float = 0.98       # ... with this probability, else 0
    noise_fraction: float = Field(0.40, ge=0.0, lt=1.0)  # share of noise clips in val and test
    noise_id_ratio: float = 1.0       # noise identities M = round(ratio * N)

    # --- faces per clip (lognormal, heavy tail) ---
    faces_per_clip: float = Field(29.5, gt=0.0)  # mean faces in a clip that has faces
    faces_sigma: float = 1.0          # lognormal sigma of the count
    faces_cap_ratio: float = 17.0     # count capped at ceil(ratio * mean) (~500 at 29.5)
    absent_fraction: float = 0.045    # clip missing from the face pickle
    empty_fraction: float = 0.01      # clip present with an empty face list
    tuple_fraction: float = 0.2       # clips whose items are tuples, not lists

    # --- identities ---
    dim: int = 512                    # face feature dim
    head_dim: int = 512
    body_dim: int = 512
    audio_dim: int = 512
    lookalike_fraction: float = 0.10  # known ids that are near-duplicates of another id
    noise_lookalike_fraction: float = 0.10  # noise ids that look like a known id
    lookalike_cos: tuple[float, float] = (0.6, 0.8)  # cosine to the parent, uniform
    identity_rank: int = 48           # R: identities and clip appearance span R of the dims
    pose_rank: int = 16               # K: shared pose/lighting/age subspace

    # --- clip appearance ---
    clip_pose_std: float = 0.5        # norm of a clip's offset inside the pose subspace
    clip_id_std: float = 0.8          # norm of a clip's offset inside the identity subspace
    clip_spread: float = 0.5          # omega ~ LogNormal(-s^2/2, s) scales a clip's offsets
    face_pose_std: float = 0.3        # per-face jitter inside the pose subspace

    # --- face quality and features ---
    q_min: float = -30.0              # q = q_min + kappa * Gamma(q_shape, q_scale)
    q_max: float = 250.0
    q_shape: float = 4.0
    q_scale: float = 22.0
    q_clip_sigma: float = 0.3         # kappa ~ LogNormal(-sigma^2/2, sigma): whole clips dim
    strength_mid: float = 25.0        # s(q) = sigmoid((q - mid) / width)
    strength_width: float = 10.0
    blur_weight: float = 0.8          # lambda: pull of low-q faces to the blur direction b
    noise_std_hi: float = 0.4         # sigma_eps(s) = hi + (lo - hi) * (1 - s)
    noise_std_lo: float = 0.8
    norm_base: float = 6.0            # ||x|| = (base + span * s) * LogNormal(0, norm_sigma)
    norm_span: float = 26.0
    norm_sigma: float = 0.08
    det_true_span: float = 0.5        # true det = 1 - span * Beta(1, det_true_b)
    det_true_b: float = 10.0

    # --- false detections ---
    false_fraction: float = 0.04
    false_det: tuple[float, float] = (0.2, 0.85)  # det = lo + (hi - lo) * Beta(2, 2)
    false_q_shape: float = 2.0        # q = q_min + Gamma(shape, scale)
    false_q_scale: float = 12.0

    # --- co-stars ---
    costar_fraction: float = 0.05     # clips with a second person's faces
    costar_share: tuple[float, float] = (0.1, 0.4)  # share of true faces that are the co-star

    # --- head / body / audio ---
    head_weight: float = 0.45         # head strength t = head_weight * s(q)
    head_clip_scale: float = 1.5      # head and body clip offsets: this times the face's
    head_presence: float = 0.9        # a true face has a head box in its frame
    head_extra_rate: float = 0.2      # extra heads (back of head) per true face, Poisson
    faceless_head_share: tuple[float, float] = (0.3, 1.0)  # heads of a faceless clip / latent faces
    faceless_q: tuple[float, float] = (-10.0, 30.0)  # quality of heads with no face, uniform
    body_weight: float = 0.35         # body strength t = body_weight * s(q)
    body_outfit_weight: float = 1.0   # norm of the outfit (clothes) vector
    body_wardrobe: int = 3            # outfits an identity owns (shared across its clips)
    clothes_rank: int = 64            # C: outfits are unit vectors of a C-dim subspace
    body_own_outfit: float = 0.5      # P(clip wears one of the identity's own outfits)
    body_presence: float = 0.8        # a head has a body box in its frame
    audio_presence: float = 0.85      # clip in the audio pickle at all
    audio_wrong_speaker: float = 0.15 # the voice is another person's
    audio_clip_std: float = 1.0       # channel/background offset norm
    audio_speech: tuple[float, float] = (2.0, 2.0)  # speech share s_a ~ Beta(a, b)

    # --- frames and boxes ---
    frame_size: tuple[int, int] = (1280, 720)
    frames_per_face: tuple[float, float] = (1.0, 3.0)  # clip length / faces, uniform

    @classmethod
    def with_overrides(cls, **overrides: object) -> "SimParams":
        """Defaults with `overrides` applied; an unknown name or a bad value raises
        `rayvid.config.ConfigError` naming it."""
        return with_values(cls(), overrides)

    def as_dict(self) -> dict:
        return to_dict(self)

    @property
    def faces_cap(self) -> int:
        """Most faces (detections) one clip can have."""
        return max(1, math.ceil(self.faces_cap_ratio * self.faces_per_clip))
