"""Ray Tune sweep over the training recipe: every trial builds and fits a `TorchTrainer`.

`run_sweep(cfg, out)` is what `jobs/tune.py` calls. The driver prepares the data set once
(`OUT/data`); each trial (`run_trial`, the Train v2 pattern: a function trainable that
runs `rayvid.train.kfold.train_fold` with `TuneReportCallback()`) trains one fold of the base
config with its sampled values and reports fold mAP every epoch. Gate, fusion weighting
and qFDA mix act inside the trial's Ray Data pipeline, so nothing is prepared again.
ASHA stops weak trials early (`time_attr="epoch"`). A trial that raises (a bad value, a
worker that died more often than `base.train.max_failures`) is recorded as ERROR and the
sweep goes on; rerunning the same command resumes an interrupted sweep
(`Tuner.restore`), and a trial resumes its Train run from its last checkpoint.

    OUT/results.parquet   one row per trial: status, best fold mAP, epochs, values, error
    OUT/map_vs_params.png fold mAP per epoch, and best fold mAP against every searched key
                          (rayvid.tune.report, which also prints the summary)
    OUT/best.yaml         the best trial's full TrainJobConfig: `jobs/train.py --config` it
    OUT/best.json         the best trial vs the 4th-place-defaults trial (--compare-defaults)
    OUT/trials/<id>/      each trial's config, Train storage and best checkpoint
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from rayvid.config import ConfigError, dump_yaml, to_dict
from rayvid.tune.report import plain as _plain, plot_sweep
from rayvid.tune.config import (TuneJobConfig, decode_params, defaults_point, is_number,
                                 ray_param_space, trial_config)
from rayvid.train.worker import RESULT_FILE

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
STOPPED_FILE = "stopped_trials.txt"
# Ray Data's shuffle tasks (the trial's count of gated clips aggregates one number per
# batch) ask for memory in proportion to their tiny input: a small reserve covers them.
DATA_BUNDLE_MEMORY = 256 * 2**20
TOP = 5


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its sampled values (sent once via the object store)."""

    job: TuneJobConfig
    dataset: str  # prepared by the driver, read by every trial's pipeline
    out: str  # the sweep's folder; trial runs live in OUT/trials/<trial_id>


def fold_result(out: str | Path, trial_id: str, cfg: TuneJobConfig) -> Path:
    """`result.json` of a trial's fold: present once its training ran to the end."""
    return Path(out) / "trials" / trial_id / "folds" / str(cfg.search.fold) / cfg.search.arch / RESULT_FILE


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune function trainable: one fold of the base config with this trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayvid.train.kfold import train_fold

    cfg, s = setup.job, setup.job.search
    train_cfg = trial_config(cfg, params)  # ConfigError: this trial fails, the sweep goes on
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup.out) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(train_cfg, run_dir / "config.yaml")
    finished = fold_result(setup.out, trial_id, cfg).exists()
    result = train_fold(train_cfg, setup.dataset, run_dir, s.fold, s.arch,
                        callbacks=[TuneReportCallback()])
    if finished:  # done before the sweep was interrupted: give Tune its record again
        for row in result["history"]:
            tune.report(dict(row))


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trial_resources(cfg: TuneJobConfig):
    """The trial's placement group: its own process, then a bundle for the Ray Data passes
    it runs itself (Tune schedules a trial's child tasks into its group). The Train
    workers are not in it: Train v2 places them in a group of their own."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": cfg.search.driver_cpus},
                                  {"CPU": cfg.search.data_cpus, "memory": DATA_BUNDLE_MEMORY}])


def _concurrency(cfg: TuneJobConfig) -> int:
    """Trials at once: what the cluster holds, keeping one CPU for the Train runs' Ray Data."""
    import ray

    s, workers = cfg.search, cfg.base.train.num_workers
    if s.max_concurrent:
        return s.max_concurrent
    res = ray.cluster_resources()
    per_trial = s.driver_cpus + s.data_cpus + workers * s.cpus_per_trial
    n = int(max(res.get("CPU", 1.0) - 1.0, per_trial) // per_trial)
    if s.gpus_per_trial > 0:
        n = min(n, int(res.get("GPU", 0.0) // (workers * s.gpus_per_trial)))
        if n < 1:
            log.warning("search.gpus_per_trial=%s but the cluster has no free GPU yet",
                        s.gpus_per_trial)
    return max(1, n)


def _searcher(cfg: TuneJobConfig, concurrent: int):
    """Random search (ships with Ray) or a model-based searcher, capped at `concurrent`."""
    from ray.tune.search import ConcurrencyLimiter

    s = cfg.search
    points = [defaults_point(cfg)] if s.compare_defaults else None
    try:
        if s.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=s.seed),
                                      concurrent)
        if s.searcher == "hyperopt":
            from ray.tune.search.hyperopt import HyperOptSearch
            return ConcurrencyLimiter(
                HyperOptSearch(points_to_evaluate=points, random_state_seed=s.seed), concurrent)
    except (ImportError, AssertionError) as e:
        raise ConfigError(f"search.searcher={s.searcher} needs the {s.searcher} package ({e}); "
                          f"the default 'random' ships with Ray") from e
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(points_to_evaluate=points, random_state=s.seed,
                                 max_concurrent=concurrent)


def _scheduler(cfg: TuneJobConfig, out: Path):
    """ASHA over epochs that never stops a trial at its last epoch (stopping then saves
    nothing, and a trial that ends on its own finishes its Train run cleanly: result.json,
    placement group released) nor the 4th-place-defaults trial, so that the comparison
    with it is made at the same number of epochs. Stopped trials are listed in
    OUT/stopped_trials.txt, which tells them from trials an interruption left unfinished."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    s, epochs = cfg.search, max(1, cfg.base.train.epochs)
    pinned = decode_params(cfg, defaults_point(cfg)) if s.compare_defaults else None

    class FinishingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if result.get(self._time_attr, 0) >= self._max_t or (
                    pinned is not None and decode_params(cfg, trial.config) == pinned):
                return TrialScheduler.CONTINUE
            if action == TrialScheduler.STOP:
                with open(out / STOPPED_FILE, "a") as f:
                    f.write(trial.trial_id + "\n")
            return action

    return FinishingASHA(time_attr="epoch", max_t=epochs, reduction_factor=s.reduction_factor,
                         grace_period=min(s.grace_period, epochs), stop_last_trials=False)


def _tuner(cfg: TuneJobConfig, trainable, out: Path):
    from ray import tune

    s = cfg.search
    path = out / "tune" / cfg.name
    if tune.Tuner.can_restore(path):
        log.info("resuming the sweep in %s", path)
        return tune.Tuner.restore(str(path), trainable, resume_errored=False,
                                  restart_errored=False)
    return tune.Tuner(
        trainable, param_space=ray_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, scheduler=_scheduler(cfg, out),
            search_alg=_searcher(cfg, _concurrency(cfg)),
            num_samples=s.num_samples + int(s.compare_defaults),
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(out / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=s.trial_retries)))


def _claim(cfg: TuneJobConfig, out: Path) -> None:
    """OUT/sweep.yaml: rerunning the same sweep resumes it; another sweep is refused."""
    want = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    path = out / SWEEP_FILE
    if path.exists() and yaml.safe_load(path.read_text()) != want:
        raise ConfigError(f"{out} holds a different sweep ({path}); rerun that one to resume "
                          f"it, or choose another --out")
    dump_yaml(cfg, path)


def run_sweep(cfg: TuneJobConfig, out: str | Path) -> dict:
    """Run (or resume) the sweep; write table, plot, best.yaml/json; return the summary."""
    from ray import tune

    from rayvid.model.architectures import MODELS
    from rayvid.train.job import resolve_dataset

    if cfg.search.arch not in MODELS:
        raise ConfigError(f"search.arch {cfg.search.arch!r} is not a model ({', '.join(MODELS)})")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _claim(cfg, out)
    dataset, _ = resolve_dataset(cfg.base, out / "data")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=TrialSetup(cfg, str(Path(dataset).resolve()), str(out))),
        trial_resources(cfg))
    grid = _tuner(cfg, trainable, out).fit()
    table, configs, curves = results_table(cfg, grid, out)
    unfinished = int((table["status"] == "UNFINISHED").sum()) if len(table) else 0
    if unfinished:  # Ctrl-C: Tune saved its state, Train its checkpoints
        raise RuntimeError(f"sweep interrupted with {unfinished} of {len(table)} trials unfinished; "
                           f"rerun the same command to resume it")
    table.to_parquet(out / "results.parquet", index=False)
    summary = {"out": str(out), "trials": len(table), "metric": cfg.search.metric,
               "status": table["status"].value_counts().to_dict(),
               "keys": list(cfg.distributions), "top": table.head(TOP).to_dict("records"),
               "errors": table[table["status"] == "ERROR"][["trial_id", "error"]].to_dict("records")
               if len(table) else [],
               "table": str(out / "results.parquet"),
               "plot": str(plot_sweep(cfg, table, curves, out / "map_vs_params.png"))}
    summary.update(write_best(cfg, table, configs, out))
    return summary


_WRAPPERS = ("RayTaskError", "UserCodeException", "WorkerGroupError", "TrainingFailedError",
             "ControllerError", "TuneError", "SystemException")


def _texts(error: BaseException, depth: int = 0) -> list[str]:
    """The error's text, then its cause's and its Train workers' (a WorkerGroupError's own
    text is cut short; the worker's failure keeps the data task's traceback)."""
    if error is None or depth > 4:
        return []
    out = [str(error)]
    for inner in [getattr(error, "cause", None), error.__cause__,
                  *(getattr(error, "worker_failures", None) or {}).values()]:
        if inner is not None and inner is not error:
            out += _texts(inner, depth + 1)
    return out


def _short_error(error: BaseException | None) -> str | None:
    """The root cause as one line, e.g. `ValueError: qfda sizes ... n_draws=2`: the last
    `SomethingError: message` line that is not one of Ray's wrappers."""
    if error is None:
        return None
    lines = [l.strip() for t in _texts(error) for l in t.splitlines() if l.strip()]
    named = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", l)]
    own = [l for l in named if not any(w in l.split(":")[0] for w in _WRAPPERS)]
    text = (own or named or [f"{type(error).__name__}: {(lines or [''])[-1]}"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def _trial_params(result) -> dict:
    """A trial's sampled values: `Result.config`, or (a trial restored after failing before
    its first report has none) the `params.json` Tune wrote when the trial started."""
    if result.config is not None:
        return dict(result.config)
    path = Path(result.path) / "params.json"
    return json.loads(path.read_text()) if path.exists() else {}


def results_table(cfg: TuneJobConfig, grid, out: Path) -> tuple[pd.DataFrame, dict, dict]:
    """(one row per trial sorted best first, trial id -> Tune config, trial id -> curve)."""
    s, keys = cfg.search, list(cfg.distributions)
    point = decode_params(cfg, defaults_point(cfg)) if s.compare_defaults else None
    rows, configs, curves = [], {}, {}
    stopped = set((out / STOPPED_FILE).read_text().split()) if (out / STOPPED_FILE).exists() else set()
    for result in grid:
        trial_id = Path(result.path).name
        df = result.metrics_dataframe
        hist = df[["epoch", s.metric]].dropna() if df is not None and s.metric in df else None
        sampled = _trial_params(result)
        params = {k: _plain(sampled.get(k)) for k in keys}
        status = ("ERROR" if result.error is not None else
                  "TERMINATED" if fold_result(out, trial_id, cfg).exists() else
                  "STOPPED_EARLY" if trial_id in stopped else "UNFINISHED")
        best = None
        if hist is not None and len(hist):
            best = float(hist[s.metric].max() if s.mode == "max" else hist[s.metric].min())
            curves[trial_id] = hist
        configs[trial_id] = params
        rows.append({"trial_id": trial_id, "status": status, f"best_{s.metric}": best,
                     "epochs": int(hist["epoch"].max()) if hist is not None and len(hist) else 0,
                     "defaults": decode_params(cfg, params) == point, **params,
                     "error": _short_error(result.error)})
    table = pd.DataFrame(rows)
    for key in keys:  # a choice mixing numbers and text (5, "auto") is stored as text
        vals = [v for v in table.get(key, []) if v is not None and v == v]
        if not (all(is_number(v) for v in vals) or all(isinstance(v, str) for v in vals)):
            table[key] = table[key].map(lambda v: None if v is None else str(v))
    if len(table):
        # trial id breaks ties (failed trials): the same order however Tune lists them
        table = table.sort_values([f"best_{s.metric}", "trial_id"],
                                  ascending=[s.mode == "min", True],
                                  na_position="last").reset_index(drop=True)
    return table, configs, curves


def write_best(cfg: TuneJobConfig, table: pd.DataFrame, configs: dict, out: Path) -> dict:
    """best.yaml (full TrainJobConfig, base resources) and best.json; RuntimeError if none."""
    col = f"best_{cfg.search.metric}"
    ok = table[(table["status"] != "ERROR") & table[col].notna()] if len(table) else table
    if not len(ok):
        raise RuntimeError(f"no trial reported {cfg.search.metric}: see {out / 'results.parquet'}")
    best = ok.iloc[0]
    best_cfg = trial_config(cfg, configs[best["trial_id"]], with_resources=False)
    dump_yaml(best_cfg, out / "best.yaml")
    ref = ok[ok["defaults"]] if cfg.search.compare_defaults else ok.iloc[:0]
    info = {
        "best": {"trial_id": best["trial_id"], cfg.search.metric: float(best[col]),
                 "values": decode_params(cfg, configs[best["trial_id"]])},
        "defaults": ({"trial_id": ref.iloc[0]["trial_id"], cfg.search.metric: float(ref.iloc[0][col])}
                     if len(ref) else None),
        "fold": cfg.search.fold, "arch": cfg.search.arch,
        "best_yaml": str(out / "best.yaml"), "best_json": str(out / "best.json")}
    if info["defaults"]:
        info["gain_over_defaults"] = info["best"][cfg.search.metric] - info["defaults"][cfg.search.metric]
    (out / "best.json").write_text(json.dumps(info, indent=2, default=str))
    return info
