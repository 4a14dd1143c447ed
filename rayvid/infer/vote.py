"""Per-frame voting: the baseline qFF replaced, as an ensemble scorer (pure torch, no Ray).

    voting = VotingEnsemble(Ensemble.from_run("runs/exp1"))
    scores = voting.scores(inputs.build(parts, spec), parts.faces)   # (n, C) float32

The 4th place compared their test-time fusion (qFF: one quality-weighted feature per
clip, one forward pass) against per-frame voting (a forward pass per face, then the
clip's face scores averaged) and reported qFF about 1% mAP better and "hundreds of times"
cheaper. `rayvid.infer.predict.predict_split(..., fusion="vote")` runs this; bench/bench_vote.py
measures both.

- Every *clip-vector* member (M1-M5, cosine_mlp, the prototype head: `input_kind ==
  "clip_vector"`) scores each face of the clip as a clip of one face: its raw feature in
  float32, exactly what `rayvid.core.fusion.qff` returns for a one-face clip (the 4th
  place never L2-normalises face features; their norm carries quality). The clip's score
  is the *plain mean* of its faces' scores (`RayvidModel.score_outputs`): classic voting, every
  face counts the same whatever its quality or detection score (`fusion.vote` without
  weights). A member votes only on clips with a face.
- Members of the other kinds (face_set, multimodal) keep their own inputs: they already
  see every face (a face set, the multimodal face vector) and are scored by
  `Ensemble.partial_scores` exactly as in qFF mode.
- The blend is `Ensemble.scores`'s (`run_folder.blend`): per clip, the members that can use
  it, rescaled to the full weight; a faceless clip gets nothing from a voting member.

Memory is bounded whatever the clips' sizes: faces are scored `chunk_faces` at a time
(chunks cross clip boundaries), and each chunk's (f, C) scores are added into its clips'
rows at once, so the largest arrays are one chunk's (chunk_faces, C) and the batch's
(n, C) result, never (F, C) for the batch's F faces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from rayvid.core.fusion import as_float32
from rayvid.core.inputs import FaceParts
from rayvid.model.ensemble import Ensemble
from rayvid.model.run_folder import blend

CHUNK_FACES = 8192  # faces per forward pass: (8192, 10035) float32 scores are 330 MB
VOTING_KIND = "clip_vector"


def face_votes(members: Sequence[tuple[nn.Module, float]], faces: FaceParts, num_classes: int,
               chunk_faces: int = CHUNK_FACES, device: str | torch.device = "cpu") -> np.ndarray:
    """Sum over `members` (model, weight) of weight x the clip's mean face score.

    faces: the batch's faces, flat (`feat (F, 512)` float16/32, not normalised; `offsets`
        (n + 1,)); det and quality are not used (plain mean).
    Returns `(n, C) float32`: `sum_m w_m * mean_{faces i of the clip} sigmoid(s_m * m(x_i))`,
    zeros for a clip with no face. Faces go through the models `chunk_faces` at a time.
    """
    if chunk_faces < 1:
        raise ValueError(f"chunk_faces must be >= 1, got {chunk_faces}")
    offsets = np.asarray(faces.offsets, np.int64)
    counts = np.diff(offsets)
    n, n_faces = len(counts), int(offsets[-1])
    clip_of = np.repeat(np.arange(n, dtype=np.int64), counts)  # (F,) the clip of each face
    share = (np.float32(1.0) / np.maximum(counts, 1).astype(np.float32))[clip_of]  # 1 / faces
    with torch.inference_mode():
        acc = torch.zeros((n, num_classes), dtype=torch.float32, device=device)
        for lo in range(0, n_faces, chunk_faces):
            hi = min(lo + chunk_faces, n_faces)
            x = torch.from_numpy(as_float32(faces.feat[lo:hi])).to(device)
            rows = torch.from_numpy(clip_of[lo:hi]).to(device)
            per_face = torch.from_numpy(share[lo:hi]).to(device)[:, None]
            for model, w in members:
                p = model.score_outputs(model(x))  # sigmoid(logit_scale * out + bias)
                # each face adds w / n_faces(clip) of its scores: the clip's weighted mean
                acc.index_add_(0, rows, p.mul_(per_face * float(w)))
    return acc.cpu().numpy()


class VotingEnsemble:
    """An `Ensemble` scored with per-frame voting for its clip-vector members (see the
    module docstring); the other members are scored from their own inputs as usual.

    chunk_faces: faces per forward pass of a voting member.
    """

    def __init__(self, ensemble: Ensemble, chunk_faces: int = CHUNK_FACES) -> None:
        self.ensemble, self.chunk_faces = ensemble, int(chunk_faces)
        members = list(zip(ensemble.members, ensemble.weights, ensemble.kinds))
        self.voters = [(m, w) for m, w, k in members if k == VOTING_KIND]
        others = [(m, w) for m, w, k in members if k != VOTING_KIND]
        # The non-voting members as an ensemble of their own: their partial scores are
        # Ensemble.partial_scores's, and the voting members are not run on qFF inputs.
        self.others = None if not others else Ensemble(
            [m for m, _ in others], [w for _, w in others], device=ensemble.device,
            batch_size=ensemble.batch_size)

    @property
    def num_classes(self) -> int:
        return self.ensemble.num_classes

    def partial_scores(self, inputs: Mapping[str, np.ndarray], faces: FaceParts
                       ) -> tuple[np.ndarray, np.ndarray]:
        """`(sums (n, C), used (n,))` as `Ensemble.partial_scores`, voting members voted.

        inputs: `rayvid.core.inputs.build`'s columns for the non-voting members' kinds
            (ignored, and may be empty, when every member votes).
        faces: the same clips' faces, flat.
        """
        sums = face_votes(self.voters, faces, self.num_classes, self.chunk_faces,
                          self.ensemble.device)
        has_face = (np.diff(faces.offsets) > 0).astype(np.float32)
        used = np.float32(sum(w for _, w in self.voters)) * has_face
        if self.others is not None:
            other_sums, other_used = self.others.partial_scores(inputs)
            sums += other_sums
            used += other_used
        return sums, used

    def scores(self, inputs: Mapping[str, np.ndarray], faces: FaceParts) -> np.ndarray:
        """The blend of `Ensemble.scores`, `(n, C) float32`, with voting members voted."""
        sums, used = self.partial_scores(inputs, faces)
        return blend(sums, used, float(sum(self.ensemble.weights)))
