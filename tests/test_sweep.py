"""Tests of the sweep: space/config checks without Ray, then real Tune sweeps on local Ray.

    pytest tests/test_search.py -m "not slow"   # config and space checks, ~2 s
    pytest tests/test_search.py                 # + the smoke sweep, its resume, a failing trial
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rayvid.config import ConfigError, load_config, to_dict, with_values
from rayvid.tune.config import (DEFAULT_SPACE, Distribution, TuneJobConfig, decode_params,
                                 defaults_point, fourth_place_config, load_tune_config,
                                 smoke_tune_overrides, trial_config)
from rayvid.train.config import TrainJobConfig

ROOT = Path(__file__).resolve().parents[1]


def _smoke_overrides() -> list[str]:
    """jobs/tune.py's --smoke-test overrides (configs/smoke.yaml, as the job reads them)."""
    return smoke_tune_overrides()


# ------------------------------------------------------------------ config and space


@pytest.mark.parametrize("override,match", [
    ("space.gate.det_max={uniform: [0.5, 0.9]}", "unknown key 'gate.det_max'"),
    ("space.nonsense.lr={uniform: [0.5, 0.9]}", "unknown key 'nonsense.lr'"),
    ("space.gate={uniform: [0.5, 0.9]}", "'gate' is a section"),
    ("space.optim.lr={uniformly: [0.1, 0.2]}", "'optim.lr' is a setting"),
    ("space.optim.lr={loguniform: [0, 1e-3]}", "0 < lo < hi"),
    ("space.optim.lr={uniform: [0.5]}", "uniform needs 2 numbers"),
    ("space.qfda.n_draws={choice: []}", "choice needs a non-empty list"),
    ("search.fold=5", "search.fold 5 is not a fold"),
    ("search.searcher=grid", "search.searcher must be"),
])
def test_bad_space_or_search_is_a_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_tune_config(None, [override])


def test_default_space_covers_the_issue_and_matches_the_example_config():
    cfg = load_tune_config(ROOT / "configs" / "tune.yaml")
    assert cfg.distributions == TuneJobConfig().distributions
    assert {"gate.det_min", "gate.quality_min", "fusion.kind", "fusion.cuts", "fusion.power",
            "qfda.mix", "qfda.n_draws", "loss.stages", "optim.lr", "model.dropout"} <= set(DEFAULT_SPACE)


def test_space_overrides_replace_per_key_and_null_drops():
    cfg = load_tune_config(ROOT / "configs" / "tune.yaml",
                           ["space.gate.det_min={choice: [0.7, 0.8]}", "space.fusion.power=null",
                            "base.optim.lr=3e-4", "search.num_samples=2"])
    d = cfg.distributions
    assert d["gate.det_min"] == Distribution("choice", (0.7, 0.8)) and "fusion.power" not in d
    assert cfg.base.optim.lr == 3e-4 and cfg.search.num_samples == 2


def test_yaml_space_replaces_the_default(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("space:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-3]}\n"
                    "  optim:\n    schedule: {choice: [step, cosine]}\n")
    assert list(load_tune_config(path).distributions) == ["optim.lr", "optim.schedule"]


def test_defaults_point_is_the_fourth_place_code_and_decodes_back():
    cfg = TuneJobConfig(space={**DEFAULT_SPACE, "qfda.sizes": {"value": [1, 3, 5]}})
    point = defaults_point(cfg)
    assert "qfda.sizes" not in point  # fixed keys keep their value
    assert point["fusion.cuts"] == "[0.0,20.0,30.0,40.0]" and point["qfda.n_draws"] == 5
    assert point["qfda.mix"] == "[0.25,0.65,0.1]"
    assert math.isnan(point["model.dropout"])  # None (each arch's own) travels as NaN
    assert decode_params(cfg, point)["model.dropout"] is None
    plain = trial_config(cfg, point, with_resources=False)
    # The base is TrainJobConfig(): searched keys take their code's values, others the base's.
    assert plain == with_values(TrainJobConfig(), {"optim.lr": 1.5e-4, "model.head_bias": "zero"})
    assert fourth_place_config().optim.warmup == "constant" != plain.optim.warmup


def test_trial_config_sets_trial_resources_and_rejects_bad_values():
    cfg = load_tune_config(None, ["search.cpus_per_trial=0.5", "search.gpus_per_trial=0.25"])
    t = trial_config(cfg, {"optim.lr": 2e-4, "loss.stages": '[{"start":0.0,"weights":{"ce":1.0}}]'})
    assert (t.train.cpus_per_worker, t.train.gpus_per_worker, t.train.use_gpu) == (0.5, 0.25, True)
    assert t.optim.lr == 2e-4 and [s.weights for s in t.loss.stages] == [{"ce": 1.0}]
    with pytest.raises(ConfigError, match="schedule must be step or cosine"):
        trial_config(load_tune_config(None, ["space.optim.schedule={choice: [step, nonsense]}"]),
                     {"optim.schedule": "nonsense"})


def test_cli_config_error_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"),
                           "--set", "space.gate.det_max={uniform: [0.5, 0.9]}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("tune: config error: ") and "gate.det_max" in proc.stderr


def test_short_error_reports_the_root_cause_not_rays_wrappers():
    from rayvid.tune.sweep import _short_error

    worker = RuntimeError("ray.exceptions.RayTaskError(UserCodeException): ray::MapBatches()\n"
                          "    raise ValueError(...)\n"
                          "ValueError: qfda sizes (1, 3, 5) must be <= n_draws=2")
    outer = RuntimeError("Training failed due to worker errors:\n"
                         "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    outer.worker_failures = {0: worker}  # as ray.train.WorkerGroupError carries them
    assert _short_error(outer) == "ValueError: qfda sizes (1, 3, 5) must be <= n_draws=2"
    assert _short_error(None) is None


def test_results_table_tells_finished_stopped_failed_and_interrupted_trials(tmp_path):
    """Status per trial without Ray: result.json = ran to the end, stopped_trials.txt =
    ASHA's stops, an error = ERROR, anything else was cut short by an interruption."""
    from types import SimpleNamespace

    from rayvid.tune.sweep import STOPPED_FILE, fold_result, results_table

    cfg = TuneJobConfig(space={"optim.lr": {"loguniform": [1e-4, 1e-3]}})
    curve = pd.DataFrame({"epoch": [1, 2], "fold_map": [0.2, 0.3]})
    grid = [SimpleNamespace(path=str(tmp_path / "tune" / tid), config={"optim.lr": lr},
                            metrics_dataframe=df, error=err)
            for tid, lr, df, err in [("a", 1e-4, curve, None), ("b", 2e-4, curve.head(1), None),
                                     ("c", 3e-4, None, ValueError("bad")), ("d", 4e-4, None, None)]]
    fold_result(tmp_path, "a", cfg).parent.mkdir(parents=True)
    fold_result(tmp_path, "a", cfg).write_text("{}")
    (tmp_path / STOPPED_FILE).write_text("b\n")
    table, configs, curves = results_table(cfg, grid, tmp_path)
    assert list(table["trial_id"]) == ["a", "b", "c", "d"]  # best first, no score last
    assert list(table["status"]) == ["TERMINATED", "STOPPED_EARLY", "ERROR", "UNFINISHED"]
    assert list(table["epochs"]) == [2, 1, 0, 0] and table["best_fold_map"].iloc[0] == 0.3
    assert table.loc[2, "error"] == "ValueError: bad" and set(curves) == {"a", "b"}


# ------------------------------------------------------------------ Tune on local Ray

# Two trials at once on ray_local's 4 logical CPUs: 2 x (0.25 driver + 1 data + 0.1 worker)
# leaves a CPU for the Train runs' Ray Data even if a stopped trial's worker group leaks
# (Train's cleaner cannot reach the state API when several Ray instances share a machine).
SHARED = ["search.max_concurrent=2", "search.cpus_per_trial=0.1", "search.compare_defaults=true"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_sweep_records_failing_trials_writes_outputs_and_resumes(ray_local, tmp_path):
    """The smoke sweep (default space) plus a grid over qFDA draws: n_draws=2 with sizes
    (1, 3, 5) and "many" both fail the trial's config as it loads (before any Ray Data or
    Train work), naming the key; both are ERROR rows and the defaults trial finishes. One
    sweep with one trial that trains, as each costs tens of seconds on 2 cores."""
    from rayvid.tune.sweep import run_sweep
    from rayvid.tune.report import summary_lines

    # the multimodal model (issue 12) with its modality dropout, trained with an open-set
    # recipe (issue 13: val's noise as class 0 plus the UIR term) whose UIR weight is a
    # search dimension: a sweep trains any architecture and recipe and searches any key
    # (configs/tune_openset.yaml searches openset.noise itself: tests/test_config.py)
    cfg = load_tune_config(None, _smoke_overrides() + SHARED + [
        "search.num_samples=1", "base.train.max_failures=0", "search.arch=multimodal",
        "base.model.archs=[multimodal]", "base.openset.noise=both",
        "space.inputs.modality_dropout={uniform: [0.0, 0.5]}",
        "space.openset.uir_weight={loguniform: [0.1, 2.0]}",
        "space.qfda.n_draws={grid: [2, many]}"])
    out = tmp_path / "sweep"
    summary = run_sweep(cfg, out)
    print("\n".join(summary_lines(summary)))
    table = pd.read_parquet(out / "results.parquet")
    # the defaults trial (n_draws fixed at 5), then one random sample x the 2-value grid
    assert len(table) == 3 and table["trial_id"].is_unique
    assert sorted(table["qfda.n_draws"]) == ["2", "5", "many"]  # mixed choice: text
    failed = table[table["status"] == "ERROR"].set_index("qfda.n_draws")
    assert sorted(failed.index) == ["2", "many"], table[["status", "error"]]
    assert "ConfigError: qfda.sizes (1, 3, 5) must be <= n_draws=2" in failed.loc["2", "error"]
    assert "qfda.n_draws: expected an integer, got 'many'" in failed.loc["many", "error"]
    ok = table[table["status"] != "ERROR"]
    assert set(ok["status"]) == {"TERMINATED"} and len(ok) == 1
    assert ok["best_fold_map"].gt(0).all() and ok["defaults"].sum() == 1
    assert table.loc[table["defaults"], "status"].item() == "TERMINATED"  # never stopped
    assert set(cfg.distributions) <= set(table.columns)
    assert (out / "map_vs_params.png").stat().st_size > 10_000
    assert [e["trial_id"] for e in summary["errors"]] == list(table.loc[table["status"] == "ERROR", "trial_id"])

    best = load_config(TrainJobConfig, out / "best.yaml")  # what jobs/train.py --config does
    info = json.loads((out / "best.json").read_text())
    top = table.iloc[0]
    assert info["best"]["trial_id"] == top["trial_id"] and best.qfda.n_draws == 5
    assert info["best"]["fold_map"] == pytest.approx(top["best_fold_map"])
    assert info["defaults"]["fold_map"] == pytest.approx(
        table.loc[table["defaults"], "best_fold_map"].item())
    assert best == with_values(cfg.base, info["best"]["values"])  # base resources, not trial's
    assert best.train == cfg.base.train and best.model.archs == ("multimodal",)
    assert "inputs.modality_dropout" in table.columns
    assert "openset.uir_weight" in table.columns and best.openset.noise == "both"
    assert list((out / "trials" / top["trial_id"] / "folds" / "0").iterdir())[0].name == "multimodal"
    trial_cfg = load_config(TrainJobConfig, out / "trials" / top["trial_id"] / "config.yaml")
    assert trial_cfg.train.cpus_per_worker == cfg.search.cpus_per_trial
    assert trial_cfg.openset.noise == "both" and trial_cfg.fold_splits == ("train", "val")
    trial_result = json.loads(next((out / "trials" / top["trial_id"] / "folds" / "0").glob(
        "*/result.json")).read_text())
    assert trial_result["noise_clips"] > 0  # val's noise clips trained with the fold
    assert {k: v for k, v in to_dict(trial_cfg).items() if k != "train"} == \
        {k: v for k, v in to_dict(best).items() if k != "train"}

    again = run_sweep(cfg, out)  # rerunning the same command: restored, nothing retrained
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table)
    assert again["best"] == summary["best"]
    with pytest.raises(ConfigError, match="holds a different sweep"):
        run_sweep(load_tune_config(None, _smoke_overrides() + SHARED + ["search.seed=1"]), out)
