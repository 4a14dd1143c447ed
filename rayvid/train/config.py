"""The training job's config: small frozen sections composed into `TrainJobConfig`.

Defaults follow the 4th place's released code (method.md), with one change the data
demands: schedules are fractions of the total optimizer steps, and the total is
`max(passes * steps_per_pass, min_steps)`, so the recipe that was tuned for ~180 steps per
epoch at the real scale also trains a small release instead of underfitting it.
Every value can be set from YAML or `--set section.key=value`; every rule that ties two
values together is a validator here, so a bad combination fails when the config loads.
The 4th place's numbers come from `rayvid.core.fourth_place`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayvid.config import Config
from rayvid.core import fourth_place as fp
from rayvid.core.fusion import Weighting


class DataSection(Config):
    """Where the data comes from: a prepared dataset, an official release, or (neither
    given) a release rayvid simulates into the run folder: the embedded default."""

    dataset: str | None = None
    release: str | None = None
    on_bad_clip: Literal["fail", "skip"] = "fail"
    simulate_ids: int = Field(120, ge=1)
    simulate_seed: int = 0
    simulate_faces_per_clip: float = Field(12.0, gt=0)
    eval_split: Literal["val", "test"] = "val"  # predicted and scored at the end (val has a gt)
    # how the end-of-run prediction scores a clip: "qff" (one fused vector per clip, the 4th
    # place's) or "vote" (each face scored, the scores averaged: per-frame voting, the
    # baseline qFF is measured against; face-set and multimodal members keep their inputs)
    eval_fusion: Literal["qff", "vote"] = "qff"

    @model_validator(mode="after")
    def _check(self) -> "DataSection":
        if self.dataset and self.release:  # rayvid.train.job would use the dataset, silently
            raise ValueError(f"dataset and release are both given ({self.dataset!r}, "
                             f"{self.release!r}): a prepared dataset, or a release to prepare")
        return self


class GateSection(Config):
    """Training-time gate (their code: det >= 0.7 and quality >= 25; write-up 0.8 / 30)."""

    enabled: bool = True
    det_min: float = fp.GATE_DET_MIN
    quality_min: float = fp.GATE_QUALITY_MIN


class FusionSection(Config):
    """Test-time qFF weighting (see rayvid.core.fusion.Weighting)."""

    kind: str = "bands"
    cuts: tuple[float, ...] = fp.BAND_CUTS
    values: tuple[float, ...] = fp.BAND_VALUES
    power: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> "FusionSection":
        self.weighting  # Weighting's own checks (kind, cuts ascending, one value per band)
        return self

    @property
    def weighting(self) -> Weighting:
        return Weighting(self.kind, tuple(self.cuts), tuple(self.values), self.power)


class QFDASection(Config):
    """Training-time augmentation fusion; disabled -> qFF of the gated faces instead."""

    enabled: bool = True
    n_draws: int = Field(fp.QFDA_N_DRAWS, ge=1)
    sizes: tuple[int, ...] = fp.QFDA_SIZES
    mix: tuple[float, ...] = fp.QFDA_MIX

    @model_validator(mode="after")
    def _check(self) -> "QFDASection":
        # rayvid.core.fusion.qfda's rule, checked here so that it fails at load, not in Ray Data
        if not self.sizes or min(self.sizes) < 1 or max(self.sizes) > self.n_draws:
            raise ValueError(f"sizes {self.sizes} must be <= n_draws={self.n_draws} (and >= 1)")
        if len(self.mix) != len(self.sizes):
            raise ValueError(f"mix {self.mix} needs one probability per size {self.sizes}")
        if min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix {self.mix} must be >= 0 with a positive sum")
        return self


class ModelSection(Config):
    # The multimodal model (face + head + body + audio, issue 12) is the default: on the
    # simulated 1,000-id release it beats the face-only M5 by +0.046 val mAP and the
    # class-mean baseline by +0.057 (docs/benchmarks.md). ["M1", ..., "M5"] is the 4th
    # place's face-only ensemble; any registered architectures may be mixed.
    archs: tuple[str, ...] = ("multimodal",)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None: each architecture's own (method.md)
    # Output-layer bias init of the MLPs: "prior" (every class starts at 1/C) or "zero"
    # (the 4th place's code). See rayvid.model.architectures.MLP and the ablation in docs/benchmarks.md.
    head_bias: Literal["zero", "prior"] = "prior"
    # Weight of the prototype (class-mean) head in the ensemble, relative to the trained
    # members' total: 0 = the 4th place's pure blend (see rayvid.model.prototype). 0 by
    # default: at 5 folds it lowers the val mAP of both the multimodal ensemble (0.9395 ->
    # 0.8813) and the M5 one (0.8403 -> 0.8363); it helps a single fold (docs/benchmarks.md).
    prototype_weight: float = Field(0.0, ge=0.0)
    # Width (d_model) of the attention and multimodal models; None: attention 128 (CPU-sized;
    # the 3rd place used 512), multimodal 512.
    width: int | None = Field(None, ge=8)
    # Platt score calibration of each member on its held-out fold after training
    # (rayvid.model.calibration): "auto" calibrates every member when `archs` has a cosine
    # head (its sigmoid(s * cos) would outweigh the sigmoid heads' scores in the blend)
    # and none otherwise; "all"; "none".
    calibrate: Literal["auto", "all", "none"] = "auto"

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: tuple[str, ...]) -> tuple[str, ...]:
        from rayvid.model.architectures import MODELS  # torch: imported when checked only

        unknown = [a for a in archs if a not in MODELS]
        if not archs or unknown:
            raise ValueError(f"unknown model(s) {unknown or 'none given'}; known: {sorted(MODELS)}")
        return archs


class InputsSection(Config):
    """What the face-set and multimodal models read (`rayvid.core.inputs`): the faces per
    set (3rd place: 40), the modalities a multimodal model uses, and its training-time
    modality dropout (each present modality masked with this chance, never all)."""

    face_set_size: int = Field(16, ge=1)
    modalities: tuple[Literal["face", "head", "body", "audio"], ...] = ("face", "head", "body",
                                                                       "audio")
    modality_dropout: float = Field(0.25, ge=0.0, lt=1.0)

    @field_validator("modalities")
    @classmethod
    def _some(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"modalities {list(value)}: give each at most once, at least one")
        return value


class LossStage(Config):
    """From `start` (fraction of total steps) on, the loss is sum(weight * loss[name])."""

    start: float
    weights: dict[str, float]


def _stages(stages: Any) -> tuple["LossStage", ...]:
    return tuple(LossStage(start=start, weights=dict(w)) for start, w in stages)


# Named loss-stage lists: `loss.stages: fourth_place` in YAML or `--set`, and the sweep's
# choices. Their middle "focal alone" phase differs from Combine by a 2% CE weight only;
# `start_combine` drops it (Start until their epoch 25, then Combine to the end).
LOSS_PRESETS: dict[str, tuple[LossStage, ...]] = {
    "fourth_place": _stages(fp.LOSS_STAGES),
    "ce": _stages([(0.0, {"ce": 1.0})]),
    "start_combine": _stages([fp.LOSS_STAGES[0], (fp.LOSS_STAGES[1][0], fp.COMBINE)]),
    # for `cosine_stages`: the cosine heads' margin losses
    "arcface": _stages([(0.0, {"arcface": 1.0})]),
    "cosface": _stages([(0.0, {"cosface": 1.0})]),
}
FOURTH_PLACE_STAGES = LOSS_PRESETS["fourth_place"]
MARGIN_LOSSES = ("arcface", "cosface", "margin")
# The presets each stage list may take (a sweep's choices): sigmoid heads / cosine heads.
SIGMOID_PRESETS = ("fourth_place", "ce", "start_combine")
COSINE_PRESETS = ("arcface", "cosface")
COSINE = ("cosine_mlp", "attention")  # rayvid.model.architectures.COSINE_HEADS (no torch here)


class LossSection(Config):
    """`stages`: a list of {start, weights} (or the same as JSON text), or the name of one
    of LOSS_PRESETS."""

    stages: tuple[LossStage, ...] = FOURTH_PLACE_STAGES
    # The cosine heads' (`cosine_mlp`, `attention`) loss: margin losses only. The 3rd place:
    # ArcFace, s = 30, m = 0.5.
    cosine_stages: tuple[LossStage, ...] = LOSS_PRESETS["arcface"]
    margin_scale: float = Field(30.0, gt=0)  # s, also the cosine heads' logit scale
    margin: float | None = Field(None, ge=0.0, lt=1.5)  # None: the preset's (arcface 0.5, cosface 0.35)
    uir_lambda: float = 0.1

    @field_validator("stages", "cosine_stages", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:  # a list as JSON text (how Tune carries structured values)
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot parse {value!r} as a list of stages: {e}") from None
        if isinstance(value, str):
            if value not in LOSS_PRESETS:
                raise ValueError(f"unknown loss preset {value!r}; known: {sorted(LOSS_PRESETS)}")
            return LOSS_PRESETS[value]
        return value

    @model_validator(mode="after")
    def _check(self) -> "LossSection":
        from rayvid.model.losses import LOSSES, LossSchedule  # torch: imported when checked only

        # the schedule's own rule: first at 0.0, then strictly increasing within [0, 1]
        for key, stages in (("stages", self.stages), ("cosine_stages", self.cosine_stages)):
            try:
                LossSchedule([(s.start, s.weights) for s in stages])
            except ValueError as e:
                raise ValueError(f"{key} (starts {[s.start for s in stages]}): {e}") from None
            unknown = sorted({n for s in stages for n in s.weights} - set(LOSSES))
            if unknown:
                raise ValueError(f"{key} use unknown loss(es) {unknown}; known: {sorted(LOSSES)}")
        margins = sorted({n for s in self.stages for n in s.weights} & set(MARGIN_LOSSES))
        if margins:
            raise ValueError(
                f"stages use {margins}: a margin loss needs a cosine head. `stages` trains the "
                f"sigmoid-scored heads (M1-M5, multimodal); cosine heads ({', '.join(COSINE)}) "
                "take theirs from cosine_stages")
        other = sorted({n for s in self.cosine_stages for n in s.weights} - set(MARGIN_LOSSES))
        if other:
            raise ValueError(
                f"cosine_stages use {other}: the cosine heads ({', '.join(COSINE)}) are trained "
                f"with margin losses only ({', '.join(MARGIN_LOSSES)}); focal, CE and UIR "
                "belong in `stages` (sigmoid heads)")
        return self


class OptimSection(Config):
    """Adam with warm-up then step decay (their code) or cosine (their poster)."""

    batch_size: int = Field(fp.BATCH_SIZE, ge=1)
    lr: float = Field(1e-3, gt=0)  # their code: 1.5e-4 over ~27,000 steps; see docs/benchmarks.md
    warmup_lr: float = Field(fp.WARMUP_LR, ge=0)
    warmup_fraction: float = Field(fp.WARMUP_FRACTION, ge=0.0, lt=1.0)
    warmup: Literal["linear", "constant"] = "linear"  # their code: "constant" 2e-5, then lr
    schedule: Literal["step", "cosine"] = "step"
    step_fraction: float = Field(fp.STEP_FRACTION, gt=0)  # their halving every 50 epochs
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    passes: float = Field(fp.EPOCHS, gt=0)  # their epochs: full passes over a fold's clips
    min_steps: int = Field(300, ge=1)  # small releases get at least this many steps
    max_steps: int = Field(0, ge=0)  # 0: no cap

    def total_steps(self, n_train: int, world_size: int = 1) -> int:
        """Optimizer steps of a run over `n_train` clips (global batch = batch * world)."""
        per_pass = max(1, math.ceil(n_train / (self.batch_size * world_size)))
        total = max(math.ceil(self.passes * per_pass), self.min_steps)
        return min(total, self.max_steps) if self.max_steps > 0 else total


class TrainSection(Config):
    """Ray Train scaling and run control."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # None: planned at fit time (`rayvid.train.kfold.worker_resources`): 1 CPU per worker
    # where the cluster has room, a share of what is left after `data_cpus` where it has not.
    cpus_per_worker: float | None = Field(None, gt=0)
    # CPUs no Train worker may hold on a CPU-only cluster: Ray Data's reads and transforms
    # run there (Train v2 hides its workers' CPUs from Ray Data; with none left it waits
    # forever). A plan that leaves less fails before training, naming these settings.
    data_cpus: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    # Ray Train's placement group strategy for the workers: PACK fills a node first (the
    # DDP all-reduce stays on one host); SPREAD puts them on different nodes (each node's
    # CPUs and disk then serve its own worker's reads). STRICT_* fail instead of bending.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    bf16: bool = True  # autocast on GPU only
    epochs: int = Field(5, ge=1)  # validation + checkpoint rounds over the run
    max_failures: int = Field(2, ge=-1)  # -1: retry forever (Ray's FailureConfig)
    log_every_s: float = Field(15.0, gt=0)
    shuffle_buffer: int = Field(4096, ge=0)
    seed: int = 0


class OpenSetSection(Config):
    """Open-set training: how the clips of no identity (noise, label 0: ~40% of the real
    val and test splits, none in train) are used. The release has noise only in val, so a
    recipe that uses noise folds val clips into training; `unseen` keeps a part of val out
    of every fold, and the final val mAP is scored on that part only.

    noise: "none" (noise clips are not trained on), "class" (the default; the 4th place:
        noise is class 0, the `other` output, a target like any identity), "uir" (iQIYI's Unknown Identity
        Rejection: noise clips are not a class; a term pushes their softmax over the
        identities towards uniform, weight `uir_weight` from `uir_start` on; the other
        losses see the labelled clips only) or "both" (class 0 and the UIR term).
    source: with noise on, which val clips join the folds: "val" (the default: all of val's
        seen part, labelled and noise: the 4th place's final recipe, which folded
        train+val) or "val_noise" (val's noise clips only). `folds.splits` containing val
        means "val" too.
    unseen: the fraction of val clips (by a hash of the name, `rayvid.release.strat`) that
        never enter a fold when val is folded in; the honest score. 0: none (then the val
        score is of clips the ensemble trained on, and the summary says so).
    score_noise: fold val's noise clips (seen part) in even when `noise` is "none": they do
        not train, but every held-out fold is scored with its share of them, so fold mAPs
        of recipes with and without noise compare the same clips (a sweep over
        `openset.noise` turns it on).
    """

    # The default is the 4th place's final recipe, which the measurements favour (issue 13,
    # docs/benchmarks.md): val's seen half folded in, noise as class 0. On the simulated
    # 1,000-id release, one fold of multimodal, on val's unseen half: 0.9301, vs 0.9222 with
    # the same clips and no noise and 0.8996 for train alone (the previous default); UIR
    # and noise-only recipes scored lower. `openset.noise=none` trains on train alone.
    noise: Literal["none", "class", "uir", "both"] = "class"
    source: Literal["val_noise", "val"] = "val"
    unseen: float = Field(0.5, ge=0.0, lt=1.0)
    uir_weight: float = Field(1.0, ge=0.0)
    uir_start: float = Field(0.0, ge=0.0, le=1.0)
    score_noise: bool = False


class FoldsSection(Config):
    """Stratified folds over the clips of `splits` (plus val when an `openset` recipe is
    on, as it is by default: `TrainJobConfig.fold_splits`). The 4th place folded train+val
    together (noise = class 0) for its test submission; rayvid does the same by default
    but keeps `openset.unseen` of val out of every fold, so the val mAP `jobs/train.py`
    reports (on that part) is an honest measurement. `openset.noise=none` and
    `splits=[train]` fold train alone."""

    k: int = Field(5, ge=2)
    splits: tuple[Literal["train", "val"], ...] = ("train",)
    run: tuple[int, ...] = ()  # which folds to train; empty = all k
    concurrent: bool = False

    @model_validator(mode="after")
    def _check(self) -> "FoldsSection":
        bad = [f for f in self.run if not 0 <= f < self.k]
        if bad or len(set(self.run)) != len(self.run):
            raise ValueError(f"run {self.run}: folds must be distinct and in 0..{self.k - 1}")
        if not self.splits:
            raise ValueError("splits is empty: fold the train split, or train and val")
        return self

    @property
    def folds(self) -> tuple[int, ...]:
        return self.run or tuple(range(self.k))


class TrainJobConfig(Config):
    name: str = "rayvid"
    data: DataSection = DataSection()
    gate: GateSection = GateSection()
    fusion: FusionSection = FusionSection()
    qfda: QFDASection = QFDASection()
    model: ModelSection = ModelSection()
    inputs: InputsSection = InputsSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    folds: FoldsSection = FoldsSection()
    openset: OpenSetSection = OpenSetSection()

    @property
    def fold_splits(self) -> tuple[str, ...]:
        """The splits the folds are drawn from: `folds.splits`, plus val when an open-set
        recipe uses val's noise."""
        o = self.openset
        if (o.noise != "none" or o.score_noise) and "val" not in self.folds.splits:
            return (*self.folds.splits, "val")
        return tuple(self.folds.splits)

    @property
    def val_folded(self) -> bool:
        """Whether some val clips train (then only the unseen part of val is an honest score)."""
        return "val" in self.fold_splits

    def row_filters(self) -> dict[str, Any]:
        """The `rayvid.data.pipeline.ClipTransform` row options of a fold's training clips:
        which val clips are folded and whether noise clips train. (The held-out clips take
        the same options with `noise=True`: a fold is always scored with its noise.)"""
        if not self.val_folded:
            return {"noise": self.openset.noise != "none"}
        all_val = "val" in self.folds.splits or (self.openset.noise != "none"
                                                  and self.openset.source == "val")
        labels = "all" if all_val else "noise"
        return {"noise": self.openset.noise != "none",
                "val_part": "seen" if self.openset.unseen > 0 else None,
                "unseen_fraction": self.openset.unseen, "val_labels": labels}

    def eval_part(self, split: str) -> str | None:
        """The part of `split` the final score uses: val's unseen part when val is folded."""
        return "unseen" if split == "val" and self.val_folded and self.openset.unseen > 0 \
            else None
