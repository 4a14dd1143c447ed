"""Shared fixtures: one real local Ray per test session, one simulated prepared dataset.

Ray tests use `ray_local` (a fresh `ray.init(address="local")` with 4 logical CPUs, so a
Train worker and Ray Data never starve each other on a 2-core machine) and `sim_dataset`
(a small release from rayvid's own simulator, prepared once per session).
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
