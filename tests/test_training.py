"""Training: the plan's arithmetic, a real Ray Train fold, resume, and a killed worker."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rayvid.config import load_config
from rayvid.train.config import TrainJobConfig
from rayvid.train.worker import plan_fold

REPO = Path(__file__).resolve().parents[1]
TINY = ["folds.k=2", "optim.batch_size=64", "optim.min_steps=24", "optim.passes=1",
        "train.epochs=2", "train.log_every_s=1000", "model.prototype_weight=0"]


def _cfg(*extra):
    return load_config(TrainJobConfig, None, TINY + list(extra))


def test_plan_spreads_the_size_invariant_total_over_epochs(tmp_path):
    cfg = load_config(TrainJobConfig, None, ["optim.batch_size=100", "optim.min_steps=1000",
                                              "train.epochs=10"])
    plan = plan_fold(cfg, n_train=500, num_classes=11, fold=0, arch="M5", out_dir=tmp_path)
    # 150 passes x 5 steps = 750 < min_steps: 1000 steps, 100 per epoch, 20 draws per clip.
    assert (plan.epochs, plan.steps_per_epoch, plan.repeats) == (10, 100, 20)
    big = plan_fold(cfg, n_train=90_000, num_classes=11, fold=0, arch="M5", out_dir=tmp_path)
    assert big.total_steps == 150 * 900 and big.repeats == 15  # their 150 passes, 15 per epoch
    with pytest.raises(ValueError, match="no training clip"):
        plan_fold(cfg, 0, 11, 0, "M5", tmp_path)


@pytest.mark.parametrize("items, cluster, want", [
    ([], {"CPU": 2.0}, {"CPU": 1.0}),  # one worker, one CPU left for Ray Data
    (["train.num_workers=2"], {"CPU": 2.0}, {"CPU": 0.5}),  # the 2-core hang, planned away
    (["train.num_workers=3"], {"CPU": 16.0}, {"CPU": 1.0}),
    (["train.num_workers=2", "folds.concurrent=true", "folds.run=[0,1]"], {"CPU": 4.0},
     {"CPU": 0.75}),  # 2 fits x 2 workers share 3 CPUs
    (["train.num_workers=2", "train.cpus_per_worker=0.5"], {"CPU": 2.0}, {"CPU": 0.5}),
    (["train.num_workers=4", "train.use_gpu=true"], {"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}),
])
def test_worker_resources_always_leave_ray_data_a_cpu(items, cluster, want):
    from rayvid.train.kfold import parallel_fits, worker_resources

    cfg = _cfg(*items)
    assert worker_resources(cfg, cluster, parallel_fits(cfg)) == want


@pytest.mark.parametrize("items, cluster, named", [
    (["train.num_workers=2", "train.cpus_per_worker=1"], {"CPU": 2.0},
     "train.cpus_per_worker=0.5 fits"),
    (["train.num_workers=1", "train.cpus_per_worker=2"], {"CPU": 2.0}, "train.data_cpus=1"),
    ([], {"CPU": 1.0}, "cannot get 0.05 CPU each"),
    (["train.data_cpus=4"], {"CPU": 4.0}, "lower train.data_cpus"),
    (["train.num_workers=2", "folds.concurrent=true", "train.cpus_per_worker=1"],
     {"CPU": 4.0}, "x 2 concurrent fits = 4 CPUs"),
])
def test_a_plan_that_would_hang_is_refused_naming_its_settings(items, cluster, named):
    from rayvid.train.kfold import parallel_fits, worker_resources

    cfg = _cfg(*items)
    with pytest.raises(ValueError, match="train.num_workers") as e:
        worker_resources(cfg, cluster, parallel_fits(cfg))
    assert named in str(e.value) and f"{cluster['CPU']:g}" in str(e.value)


def _progress_after(path: Path, epochs: int, timeout: float) -> dict:
    """The fold's progress.json (rank 0 writes it; an epoch is listed once its checkpoint was
    reported) once it lists `epochs` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            progress = json.loads(path.read_text())
            if len(progress["epochs"]) >= epochs:
                return progress
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {epochs} epochs after {timeout} s")


def _train_killing_rank0(cfg, dataset, run_dir: Path) -> tuple[dict, int]:
    """train_fold in a thread; SIGKILL rank 0's worker (its pid from progress.json) once two
    epochs are reported. (result, epochs done at the kill)."""
    from rayvid.train.kfold import train_fold

    box = {}
    thread = threading.Thread(target=lambda: box.update(r=train_fold(cfg, dataset, run_dir, 0, "M5")))
    thread.start()
    progress = _progress_after(run_dir / "folds" / "0" / "M5" / "progress.json", 2, 300)
    os.kill(progress["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    return box["r"], len(progress["epochs"])


@pytest.mark.ray
@pytest.mark.slow
def test_two_ddp_workers_train_a_fold_like_one_and_survive_a_killed_worker(ray_local, sim_dataset,
                                                                        tmp_path):
    """One fold, the way a run trains it (CPU, gloo), with train.num_workers=1 and then 2,
    the same 1,000 optimizer steps. The two-worker run's rank 0 is SIGKILLed after two
    reported epochs; the run (the whole DDP group) restarts from the last registered
    checkpoint (FailureConfig), redoes at most the epoch in flight and finishes every
    epoch; its best checkpoint rebuilds the model alone; a second call finds the fold
    finished and trains nothing, in place or in a copied run. Each rank reads its own
    equal shard of every epoch's stream (Ray Data's streaming split), the evaluation's
    all_gather merges the ranks' batches of the held-out set into the fold mAP of every
    held-out clip, and that mAP is within noise of one worker's. (The one-worker run is
    not killed: the restart path is the same; each restart costs ~a minute here.)"""
    from rayvid.data import pipeline as rdata
    from rayvid.model.checkpoints import load_model
    from rayvid.train.kfold import train_fold, transforms
    from rayvid.train.worker import RESULT_FILE

    _, heldout_tf = transforms(_cfg(), 0, "M5")
    heldout = rdata.clip_dataset(sim_dataset, _cfg().fold_splits, heldout_tf).count()
    results = {}
    for workers in (1, 2):
        cfg = _cfg("train.epochs=3", "optim.min_steps=1000", "train.max_failures=2",
                   f"train.num_workers={workers}")
        run_dir = tmp_path / f"w{workers}"
        if workers == 1:
            result = train_fold(cfg, sim_dataset, run_dir, 0, "M5")
            assert result["restores"] == []
        else:
            result, done_at_kill = _train_killing_rank0(cfg, sim_dataset, run_dir)
            assert len(result["restores"]) == 1
            # resumed from a checkpoint, not from scratch; at most the last reported epoch
            # (its checkpoint may still have been registering) and the one in flight redone
            assert done_at_kill - 1 <= result["restores"][0] <= done_at_kill + 1  # +1: raced
        results[workers] = result
        assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
        assert all(0.0 <= h["fold_map"] <= 1.0 for h in result["history"])
        assert result["best_map"] == max(h["fold_map"] for h in result["history"])
        plan = result["plan"]
        for h in result["history"]:
            rows = h["rank_rows"]
            assert len(rows) == workers and min(rows) > 0 and len(h["rank_nodes"]) == workers
            # every epoch's stream read once across the ranks, in equal shards (an equal
            # split drops at most workers - 1 rows)
            assert 0 <= plan["n_train"] * plan["repeats"] - sum(rows) < workers
            assert max(rows) - min(rows) <= 1
            assert len(h["rank_val_clips"]) == workers and sum(h["rank_val_clips"]) == heldout
        model, meta = load_model(result["best"])
        assert meta["extra"]["fold"] == 0 and model.num_classes == 41
        assert (Path(result["best"]) / "job_config.yaml").exists()

    done = tmp_path / "w2" / "folds" / "0" / "M5" / RESULT_FILE
    stamp = done.stat().st_mtime_ns
    again = train_fold(cfg, sim_dataset, tmp_path / "w2", fold=0, arch="M5")  # finished: skipped
    assert again["best_map"] == result["best_map"] and done.stat().st_mtime_ns == stamp
    moved = tmp_path / "w2-moved"  # a run folder copied elsewhere
    shutil.copytree(tmp_path / "w2", moved)
    there = train_fold(cfg, sim_dataset, moved, fold=0, arch="M5")
    assert there["best"] == str(moved.resolve() / "folds" / "0" / "M5" / "best")

    one, two = results[1], results[2]
    # the same steps, each of a global batch twice the size: about twice the draws per clip
    assert 1.9 <= two["plan"]["repeats"] / one["plan"]["repeats"] <= 2.1
    assert abs(two["best_map"] - one["best_map"]) < 0.05, (one["best_map"], two["best_map"])


def test_train_job_rejects_unknown_config_keys():
    out = subprocess.run([sys.executable, "jobs/train.py", "--set", "optim.lrr=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown config key: optim.lrr" in out.stderr and "Traceback" not in out.stderr


def test_plot_history_writes_a_whole_png_over_the_old_one(tmp_path):
    from rayvid.train.report import plot_history

    path = tmp_path / "training.png"
    path.write_bytes(b"old")
    history = [{"epoch": 1, "loss": 1.0, "fold_map": 0.1}, {"epoch": 2, "loss": 0.5, "fold_map": 0.2}]
    assert plot_history([{"fold": 0, "arch": "M5", "history": history}], path) == path
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in tmp_path.iterdir()] == ["training.png"]  # no temporary left
