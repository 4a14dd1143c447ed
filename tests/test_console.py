"""The jobs' console (rayvid.console): setup, progress bars / lines, the training job's output.

Fast tests need no Ray: `setup_console` on a captured stream, `progress` on a terminal and
off one, the worker's progress file and the driver's view of it (`FoldWatch`). The slow
test runs `jobs/train.py --smoke-test` as a user would and reads its whole console.
"""

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rayvid import console

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    """A stream that says it is a terminal (tqdm draws bars on it)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    """setup_console changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in console.QUIET_LOGGERS}
    env = {k: os.environ.get(k) for k in console.ray_environment()}
    with warnings.catch_warnings():
        yield
        logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_setup_console_shows_rayvid_and_ray_warnings_not_ray_info(restore_logging, monkeypatch):
    for key in console.ray_environment():
        monkeypatch.delenv(key, raising=False)
    out = io.StringIO()
    console.setup_console(stream=out)
    console.setup_console(stream=out)  # a second call replaces the first: no line twice
    logging.getLogger("rayvid.train.job").info("simulating a release")
    logging.getLogger("ray.train._internal.storage").info("Checkpoint successfully created")
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "INFO rayvid.train.job: simulating a release"]
    # Ray's loggers keep their warnings (once Ray is imported they print through its own
    # handler, so they are checked by level here, not on the stream).
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"


def test_setup_console_keeps_a_users_ray_settings(restore_logging, monkeypatch):
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    console.setup_console(stream=io.StringIO())
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "DEBUG"


def test_warnings_raised_inside_ray_are_hidden_rayvids_are_logged(restore_logging):
    out = io.StringIO()
    console.setup_console(stream=out)
    # As Ray's own code raises them (the module a warning is attributed to decides).
    warnings.warn_explicit("`columns=` is deprecated", DeprecationWarning, "read_api.py", 1,
                           module="ray.data.read_api")
    warnings.warn_explicit("gpus_per_trial but no GPU", UserWarning, "sweep.py", 1,
                           module="rayvid.tune.sweep")
    text = out.getvalue()
    assert "deprecated" not in text
    assert "WARNING py.warnings:" in text and "gpus_per_trial but no GPU" in text


def test_ray_init_options_are_ray_init_keywords():
    import inspect

    import ray

    options = console.ray_init_options()
    assert options["log_to_driver"] is False
    assert set(options) <= set(inspect.signature(ray.init).parameters)


def test_progress_off_a_terminal_logs_lines(caplog):
    logger = logging.getLogger("rayvid.test_console")
    with caplog.at_level(logging.INFO, logger=logger.name):
        items = list(console.progress(range(5), desc="predict", unit="clip", every_s=0,
                                      stream=io.StringIO(), logger=logger))
    assert items == [0, 1, 2, 3, 4]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5  # one per update (every_s=0); closing adds no repeat of 5/5
    assert messages[0] == "predict 1/5 clip"  # no rate yet: it counts from the first unit
    assert messages[1].startswith("predict 2/5 clip (") and "clip/s) ETA" in messages[1]
    assert messages[-1].startswith("predict 5/5 clip (") and "ETA" not in messages[-1]


def test_progress_lines_are_rate_limited_and_closing_twice_logs_once(caplog):
    logger = logging.getLogger("rayvid.test_console")
    with caplog.at_level(logging.INFO, logger=logger.name):
        bar = console.progress(total=100, desc="fold 0 M5", unit="step", every_s=3600,
                               stream=io.StringIO(), logger=logger)
        for step in range(1, 101):
            bar.set(step, text=f"loss {1 / step:.3f}")
        bar.close()
        bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        caplog.records[0].getMessage()]
    assert caplog.records[0].getMessage().startswith("fold 0 M5 100/100 step")
    assert caplog.records[0].getMessage().endswith("loss 0.010")


def test_progress_on_a_terminal_draws_a_bar_and_logs_nothing(caplog):
    pytest.importorskip("tqdm")
    term = Terminal()
    logger = logging.getLogger("rayvid.test_console")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with console.progress(total=4, desc="fold 0 M5", unit="step", stream=term,
                              logger=logger) as bar:
            for _ in range(4):
                bar.update()
    assert not caplog.records
    assert "fold 0 M5" in term.getvalue() and "4/4" in term.getvalue()


def test_log_lines_on_a_terminal_go_above_the_bar(restore_logging):
    pytest.importorskip("tqdm")
    term = Terminal()
    console.setup_console(stream=term)
    with console.progress(total=2, desc="bar", stream=term) as bar:
        bar.update()
        logging.getLogger("rayvid.x").info("a line while the bar runs")
        bar.update()
    assert "a line while the bar runs\n" in term.getvalue()


# ------------------------------------------- the worker's progress file and the driver's view

def _plan(tmp_path, total_epochs=2, steps=10):
    from rayvid.train.worker import FoldPlan

    return FoldPlan(fold=0, arch="M5", num_classes=3, n_train=10, repeats=1,
                    epochs=total_epochs, steps_per_epoch=steps, out_dir=str(tmp_path))


def test_worker_progress_file_feeds_the_drivers_bar_and_epoch_lines(tmp_path, caplog):
    from rayvid.train.kfold import FoldWatch
    from rayvid.train.worker import PROGRESS_FILE, _Progress

    plan = _plan(tmp_path)
    worker = _Progress("fold 0 M5", plan.out_dir, plan.total_steps, every_s=0, start_step=0,
                       history=[])
    with caplog.at_level(logging.INFO, logger="rayvid.train.kfold"):
        watch = FoldWatch(tmp_path, plan, every_s=3600)
        for step in range(1, 11):
            worker.update(step, "1/2", 0.5, 128, 1e-3)
        worker.epoch_done({"epoch": 1, "loss": 0.5, "fold_map": 0.6, "best_map": 0.6,
                           "fold_acc": 0.7, "val_clips": 9})
        watch.poll()
        assert watch.bar.done == 10
        worker.update(20, "2/2", 0.25, 128, 1e-4)
        worker.epoch_done({"epoch": 2, "loss": 0.25, "fold_map": 0.5, "best_map": 0.6,
                           "fold_acc": 0.6})
        watch.poll()
        watch.bar.close()
    state = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert state["step"] == 20 and state["total"] == 20 and len(state["epochs"]) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        "[fold 0 M5] epoch 1/2 loss 0.5000 fold mAP 0.6000 (best 0.6000) acc 0.7000",
        "[fold 0 M5] epoch 2/2 loss 0.2500 fold mAP 0.5000 (best 0.6000) acc 0.6000"]
    assert messages[-1].startswith("fold 0 M5 20/20 step") and "loss 0.2500" in messages[-1]


def test_a_resumed_fold_does_not_repeat_the_epochs_shown_before(tmp_path, caplog):
    from rayvid.train.kfold import FoldWatch
    from rayvid.train.worker import PROGRESS_FILE

    plan = _plan(tmp_path, total_epochs=3)
    old = {"step": 10, "total": 30, "epochs": [{"epoch": 1, "loss": 0.5, "fold_map": 0.6,
                                                 "best_map": 0.6, "fold_acc": 0.7}]}
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="rayvid.train.kfold"):
        with FoldWatch(tmp_path, plan, every_s=3600, poll_s=0.05):
            pass  # the run was interrupted before it wrote anything new
        epoch_lines = [r for r in caplog.records if "fold mAP" in r.getMessage()]
    assert epoch_lines == []
    new = dict(old, step=20, epochs=old["epochs"] + [dict(old["epochs"][0], epoch=2)])
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(new))
    with caplog.at_level(logging.INFO, logger="rayvid.train.kfold"):
        caplog.clear()
        watch = FoldWatch(tmp_path, plan, every_s=3600)
        watch.seen_epochs, watch.mtime = 1, None  # as if the file changed after the start
        watch.poll()
        watch.bar.close()
    assert [r.getMessage() for r in caplog.records if "fold mAP" in r.getMessage()] == [
        "[fold 0 M5] epoch 2/3 loss 0.5000 fold mAP 0.6000 (best 0.6000) acc 0.7000"]


# ------------------------------------------------------------------ the training job, end to end

NOISE = ["Traceback", "RayDeprecationWarning", "DeprecationWarning", "Reporting training result",
         "Checkpoint successfully created", "tqdm is not installed", "Failed to kill actor",
         "(TrainController", "(RayTrainWorker", "(raylet)", "Progress bars disabled",
         "maximum expected startup concurrency"]
# The one C++ line the driver still prints (to stderr, not through logging or log_to_driver):
# Ray Data's actor pool in predict starts actors with max_restarts > 0 whose arguments sit
# in the object store (ray-project/ray#53727). Any other core_worker line is a finding.
KNOWN_DRIVER_LINE = "has constructor arguments in the object store and max_restarts > 0"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_train_smoke_console_is_rayvids_own(tmp_path):
    """`jobs/train.py --smoke-test` as a user runs it (a fresh local Ray, no test settings):
    its console has rayvid's progress and summary and none of Ray's internal chatter."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_AUTH_MODE")}
    env["RAY_ADDRESS"] = "local"  # never attach to another Ray running on this machine
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # a mixed ensemble (issue 12): each member is fed its own input kind, in one run; with
    # the open-set recipe (issue 13): val's noise trains as class 0, its unseen part scores
    run = subprocess.run(
        [sys.executable, "jobs/train.py", "--smoke-test", "--out", str(tmp_path / "run"),
         "--set", "model.archs=[M5,attention,multimodal]", "--set", "openset.noise=class"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1400)
    text = run.stdout
    assert run.returncode == 0, text[-6000:]
    found = [noise for noise in NOISE if noise in text]
    found += [line for line in text.splitlines()
              if "core_worker.cc" in line and KNOWN_DRIVER_LINE not in line]
    assert not found, f"{found} in the console:\n{text[-8000:]}"
    assert "== rayvid training summary ==" in text
    assert "val (unseen part) mAP (ensemble of 3)" in text
    noise = [int(n) for n in re.findall(r"\[fold 0 \S+\] \d+ training clips \((\d+) noise\)", text)]
    assert len(noise) == 3 and min(noise) > 0, text[-4000:]
    # rayvid's own progress, from the driver: each epoch of the fold, then the bar's last line
    for arch in ("M5", "attention", "multimodal"):
        epochs = re.findall(rf"\[fold 0 {arch}\] epoch (\d+)/(\d+) loss \S+ fold mAP", text)
        assert epochs and [int(e) for e, _ in epochs] == list(range(1, int(epochs[0][1]) + 1))
        assert re.search(rf"fold 0 {arch} (\d+)/\1 step", text), text[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 < summary["eval"]["map"] <= 1.0 and summary["eval"]["part"] == "unseen"
    # the attention member (a cosine head) makes every member calibrated (model.calibrate auto)
    for fold in summary["folds"]:
        assert fold["calibration"]["a"] > 0, fold["arch"]
    n_val = json.loads((tmp_path / "run" / "dataset" / "_rayvid_dataset.json").read_text()
                       )["splits"]["val"]["clips"]
    assert summary["eval"]["clips"] < n_val
    # the person-search index of the same mixed run, through its job: every val clip is
    # scored, the faceless ones too (the multimodal member answers for them)
    index = subprocess.run(
        [sys.executable, "jobs/index.py", "--run", str(tmp_path / "run"), "--dataset",
         str(tmp_path / "run" / "dataset"), "--split", "val", "--out", str(tmp_path / "index")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600)
    assert index.returncode == 0, index.stdout[-6000:]
    from rayvid.infer.person_index import read_manifest

    assert read_manifest(tmp_path / "index")["sources"][0]["clips"] == n_val
