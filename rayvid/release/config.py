"""Configs of the release jobs: `jobs/prepare.py` (`PrepareJobConfig`) and
`jobs/simulate.py` (`SimulateJobConfig`), on rayvid's one config system (`rayvid.config`).

Each job's flags are overrides of these keys (`--release X` is `--set release=X`), and both
take `--config FILE` and `--set key=value`:

    python jobs/prepare.py --config prep.yaml --set workers=2
    python jobs/simulate.py --out data/sim --set params.faces_sigma=0.8
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayvid.config import Config
from rayvid.release.prepare import default_workers
from rayvid.release.simulator.params import SimParams


class PrepareJobConfig(Config):
    """Release folder -> Parquet dataset (`rayvid.release.prepare.prepare_release`)."""

    release: str | None = None  # release folder (face_train_v2.pickle, train_gt.txt, ...)
    out: str | None = None  # dataset folder to write
    on_bad_clip: Literal["fail", "skip"] = "fail"
    force: bool = False  # rebuild an existing dataset
    bucket_mib: int = Field(64, ge=1)  # target spill bucket size
    # processes reading and writing side by side (one per CPU, at most 4; 1: in-process)
    workers: int = Field(default_factory=default_workers, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "PrepareJobConfig":
        if not (self.release and self.out):
            raise ValueError("release and out are required (--release, --out; or --smoke-test)")
        return self


class SimulateJobConfig(Config):
    """A simulated release (`rayvid.release.simulator.simulate_release`)."""

    out: str | None = None  # output folder (created)
    ids: int = Field(10034, ge=1)  # known identities (the real release: 10034)
    seed: int = 0
    params: SimParams = SimParams()  # the generator's constants (docs/simulator.md)

    @model_validator(mode="after")
    def _check(self) -> "SimulateJobConfig":
        if not self.out:
            raise ValueError("out is required (--out; or --smoke-test)")
        return self
