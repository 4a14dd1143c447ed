"""Configs of the inference jobs: `jobs/predict.py`, `jobs/index.py`, `jobs/serve.py` and
`jobs/evaluate.py`, on rayvid's one config system (`rayvid.config`).

Each job's flags are overrides of these keys (`--run R` is `--set run=R`, `--per-clip P`
is `--set per_clip=P`), and every job takes `--config FILE` and `--set key=value`. The
serve job's `--config` stays a Serve config file (configs/serve.yaml, what `serve deploy`
takes); its `--set` keys are `ServeJobConfig`'s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayvid.config import CONFIG_DIR, Config
from rayvid.core.metrics import NUM_IDENTITIES
from rayvid.infer.person_index import DEFAULT_K
from rayvid.infer.predict import Fusion


class PredictJobConfig(Config):
    """A split of a prepared dataset -> the official submission (`rayvid.infer.predict`)."""

    run: str  # run folder with ensemble.json
    dataset: str  # prepared dataset folder
    split: Literal["val", "test"]
    out: str  # submission file to write
    per_clip: str | None = None  # Parquet of every clip's top-k classes and scores
    top_k_clip: int = Field(5, ge=1)  # classes per clip in per_clip
    gt: str | None = None  # val_gt.txt-format file to score the submission against
    num_actors: int | None = Field(None, ge=1)  # scoring actors (None: one per GPU)
    batch_size: int = Field(4096, ge=1)  # clips per scoring batch
    fusion: Fusion = "qff"  # vote: clip-vector members score every face, averaged
    # score only this part of val (`rayvid.release.strat.unseen_mask`): "unseen" is the
    # honest score of a run whose open-set recipe trained on the other part
    part: Literal["seen", "unseen"] | None = None
    unseen_fraction: float | None = Field(None, gt=0.0, lt=1.0)  # None: the run's own


class IndexJobConfig(Config):
    """Build or update the person-search index (`rayvid.infer.person_index`)."""

    run: str  # run folder with ensemble.json
    dataset: str  # prepared dataset holding the clip library
    split: str = "test"  # split of dataset to index
    out: str  # index folder
    update: bool = False  # add split to the existing index
    k: int = Field(DEFAULT_K, ge=1)  # clips kept per identity
    batch_size: int = Field(4096, ge=1)
    num_actors: int | None = Field(None, ge=1)
    calibrate: bool = False  # recalibrate RUN/serving.json
    calibration_dataset: str | None = None  # dataset with a labelled val split (None: RUN/dataset)
    target_far: float | None = Field(None, gt=0.0, lt=1.0)  # None: the max-F1 threshold


class ServeJobConfig(Config):
    """Serve a run folder over HTTP on 127.0.0.1 (`rayvid.infer.app`)."""

    run: str = "runs/rayvid"  # run folder of jobs/train.py (its embedded default)
    index: str | None = None  # person-search index of jobs/index.py (for /search)
    port: int = Field(8000, ge=1, le=65535)
    serve_config: str = str(CONFIG_DIR / "serve.yaml")  # the Serve config file (--config)
    num_cpus: int = Field(4, ge=1)  # logical CPUs of a local Ray


class EvaluateJobConfig(Config):
    """Score a submission with the official mAP (`rayvid.core.metrics`)."""

    gt: str  # val_gt.txt-format file
    submission: str
    per_id_csv: str | None = None  # write id,ap,n_relevant per gt identity here
    max_id: int = Field(NUM_IDENTITIES, ge=1)
