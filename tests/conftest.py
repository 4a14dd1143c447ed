"""Shared fixtures: one real local Ray per test session, one simulated prepared dataset.

Ray tests use `ray_local` (a fresh `ray.init(address="local")` with 4 logical CPUs, so a
Train worker and Ray Data never starve each other on a 2-core machine) and `sim_dataset`
(a small release from rayvid's own simulator, prepared once per session). Tests that
predict, index or serve use `trained_run`: a run folder trained in-process on
`sim_dataset` (no Ray, a few seconds), written by the real checkpoint and run-folder
writers. Treat it as read-only: a test that writes into a run (calibration writes
`serving.json`) works on a `shutil.copytree` of it.
"""

import os
from pathlib import Path

import pytest

# One BLAS thread: on 2 shared cores OpenBLAS's spinning threads slow numpy 30-60x.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray workers inherit this; without bytecode every worker recompiles Ray and torch at start.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

REPO = Path(__file__).resolve().parents[1]


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    # Whatever starts Ray is in the `ray` lane, marked or not: the fast lane
    # (-m "not ray and not slow") never starts it.
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and "ray" not in item.keywords:
            item.add_marker(pytest.mark.ray)
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the whole session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Workers import rayvid (and test helpers) from the checkout even when not installed.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(address="local", num_cpus=4, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sim_release(tmp_path_factory):
    """A small simulated release in the official layout (40 identities, short clips)."""
    from rayvid.release.simulator import simulate_release

    out = tmp_path_factory.mktemp("release")
    simulate_release(out, 40, seed=7, faces_per_clip=6)
    return out


@pytest.fixture(scope="session")
def sim_dataset(sim_release, tmp_path_factory):
    """`sim_release` prepared into the Parquet layout."""
    from rayvid.release.prepare import prepare_release

    out = tmp_path_factory.mktemp("prepared") / "dataset"
    prepare_release(sim_release, out)
    return out


# The trained run: unequal blend weights and a qFF weighting that is not the default, so a
# consumer that ignores either (sums instead of the weighted mean, default fusion) fails.
TRAINED_WEIGHTS = (1.0, 0.5)
TRAINED_WEIGHTING = {"kind": "bands", "cuts": [0.0, 30.0], "values": [0.0, 0.5, 1.0],
                     "power": 1.0}
TRAINED_FOLDS = 2


def _train_member(x, y, num_classes: int, seed: int, steps: int = 60):
    """A small M5 fitted full-batch with the 4th place's warm-up loss mix (0.25 CE +
    0.75 focal); `head_bias="prior"` so a few dozen steps learn something."""
    import torch

    from rayvid.model.architectures import build_model
    from rayvid.model.losses import MixedLoss

    torch.manual_seed(seed)
    model = build_model("M5", in_dim=x.shape[1], num_classes=num_classes, head_bias="prior")
    criterion = MixedLoss({"ce": 0.25, "focal": 0.75})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype("int64"))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        criterion(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_run(sim_dataset, tmp_path_factory):
    """A run folder as training leaves it: `folds/<f>/M5/best` checkpoints (one M5 per
    fold of `sim_dataset`'s train split, qFF with TRAINED_WEIGHTING, held-out fold mAP
    recorded) and `ensemble.json` with TRAINED_WEIGHTS. No `serving.json`."""
    import pyarrow.parquet as pq
    import torch

    from rayvid.core import fusion, metrics
    from rayvid.data.pipeline import split_paths
    from rayvid.release.schema import read_meta
    from rayvid.model import run_folder
    from rayvid.model.checkpoints import save_checkpoint
    from rayvid.release import schema

    num_classes = read_meta(sim_dataset)["num_classes"]
    table = pq.read_table(split_paths(sim_dataset, ["train"]))
    feat, det, quality, offsets = schema.face_arrays(table)
    weighting = fusion.Weighting.from_dict(TRAINED_WEIGHTING)
    x, ok = fusion.qff(feat, det, quality, offsets, weighting)
    label = table["label"].to_numpy()
    fold = schema.fold_of(label, table["strat_rank"].to_numpy(), TRAINED_FOLDS)
    run = tmp_path_factory.mktemp("trained") / "run"
    members = []
    for f, weight in zip(range(TRAINED_FOLDS), TRAINED_WEIGHTS):
        train, held = ok & (fold != f), ok & (fold == f)
        model = _train_member(x[train], label[train], num_classes, seed=f)
        with torch.no_grad():
            fold_map = metrics.map_from_scores(model(torch.from_numpy(x[held])).numpy(), label[held])
        path = f"folds/{f}/M5/best"
        save_checkpoint(run / path, model, extra={"fold": f, "map": fold_map,
                                                   "weighting": TRAINED_WEIGHTING})
        members.append(run_folder.Member(path, weight, fold=f, arch="M5", fold_map=fold_map))
    run_folder.write_ensemble(run, run_folder.EnsembleSpec(tuple(members), weighting, num_classes))
    return run



# The mixed run: an M5 and a multimodal member, unequal weights, the same qFF weighting.
MIXED_WEIGHTS = (1.0, 0.7)
MIXED_KINDS = ("clip_vector", "multimodal")


def _train_multimodal(mm, mask, y, num_classes: int, dims, seed: int, steps: int = 200):
    """A small multimodal model (d_model 64) fitted full-batch, as `_train_member`."""
    import torch

    from rayvid.model.architectures import build_model
    from rayvid.model.losses import MixedLoss

    torch.manual_seed(seed)
    model = build_model("multimodal", in_dim=512, num_classes=num_classes, head_dim=dims[0],
                        body_dim=dims[1], audio_dim=dims[2], d_model=64, dropout=0.2,
                        head_bias="prior")
    criterion = MixedLoss({"ce": 0.25, "focal": 0.75})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, mt = torch.from_numpy(mm), torch.from_numpy(mask)
    yt = torch.from_numpy(y.astype("int64"))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        criterion(model(xt, mt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_mixed_run(sim_dataset, tmp_path_factory):
    """A run folder with a clip-vector and a multimodal member (`M5/best`,
    `multimodal/best`, MIXED_WEIGHTS), trained in-process (no Ray, ~15 s) on `sim_dataset`'s
    train split with inputs from `rayvid.core.inputs.build` (the multimodal one with
    modality dropout 0.5, 4 draws per clip, so it learns to answer without a face), and
    `ensemble.json` recording the run's `InputSpec` under "inputs". Read-only, as
    `trained_run`."""
    import numpy as np
    import pyarrow.parquet as pq

    from rayvid.core import fusion, inputs
    from rayvid.data.pipeline import ClipTransform, split_paths
    from rayvid.model import run_folder
    from rayvid.model.checkpoints import save_checkpoint
    from rayvid.release.schema import read_meta

    meta = read_meta(sim_dataset)
    num_classes = meta["num_classes"]
    dims = tuple(int(meta["dims"][m]) for m in ("head", "body", "audio"))
    weighting = fusion.Weighting.from_dict(TRAINED_WEIGHTING)
    spec = inputs.InputSpec(MIXED_KINDS, weighting, dims=dims)
    table = pq.read_table(split_paths(sim_dataset, ["train"]))
    parts = ClipTransform(kinds=MIXED_KINDS, weighting=weighting, dims=dims).parts(table)
    label = table["label"].to_numpy()
    built = inputs.build(parts, spec)
    m5 = _train_member(built["x"][built["ok"]], label[built["ok"]], num_classes, seed=0)
    train_spec = inputs.InputSpec(MIXED_KINDS, weighting, modality_dropout=0.5, dims=dims)
    rng = np.random.default_rng(0)
    draws = [inputs.build(parts, train_spec, rng) for _ in range(4)]
    mm = np.concatenate([d["mm"] for d in draws])
    mask = np.concatenate([d["mm_mask"] for d in draws])
    y = np.tile(label, len(draws))
    keep = mask.any(axis=1)
    mm_model = _train_multimodal(mm[keep], mask[keep], y[keep], num_classes, dims, seed=1)
    run = tmp_path_factory.mktemp("trained-mixed") / "run"
    members = []
    for arch, model, weight in (("M5", m5, MIXED_WEIGHTS[0]),
                                ("multimodal", mm_model, MIXED_WEIGHTS[1])):
        path = f"{arch}/best"
        save_checkpoint(run / path, model, extra={"weighting": TRAINED_WEIGHTING})
        members.append(run_folder.Member(path, weight, arch=arch))
    run_folder.write_ensemble(run, run_folder.EnsembleSpec(
        tuple(members), weighting, num_classes, {"inputs": spec.to_json()}))
    return run
