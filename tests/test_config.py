"""Tests of rayvid's one config system (rayvid.config) and every job's config, without Ray.

    pytest tests/test_config.py      # a few seconds
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayvid.config import (SMOKE_FILE, ConfigError, dump_yaml, load_config, smoke_overrides,
                           to_dict, with_values)
from rayvid.core import fourth_place as fp
from rayvid.infer.api import AppArgs, MemberConfig, ServingConfig
from rayvid.infer.config import EvaluateJobConfig, IndexJobConfig, PredictJobConfig, ServeJobConfig
from rayvid.model.losses import FOURTH_PLACE_STAGES
from rayvid.model.schedules import FOURTH_PLACE_LR
from rayvid.release.config import PrepareJobConfig, SimulateJobConfig
from rayvid.release.simulator import SimParams
from rayvid.train.config import COSINE_PRESETS, LOSS_PRESETS, SIGMOID_PRESETS, TrainJobConfig
from rayvid.tune.config import (DEFAULT_SPACE, TuneJobConfig, fourth_place_config, load_tune_config,
                                smoke_tune_overrides)

ROOT = Path(__file__).resolve().parents[1]

# Every job's config with the smallest set of keys it needs (the required ones).
REQUIRED = {
    TrainJobConfig: {}, TuneJobConfig: {}, SimParams: {}, ServeJobConfig: {},
    PrepareJobConfig: {"release": "r", "out": "d"},
    SimulateJobConfig: {"out": "o"},
    PredictJobConfig: {"run": "r", "dataset": "d", "split": "test", "out": "s.txt"},
    IndexJobConfig: {"run": "r", "dataset": "d", "out": "i"},
    EvaluateJobConfig: {"gt": "g", "submission": "s"},
}
# One `--set key=value` per job config and the value it must give (YAML-parsed).
SETS = {
    TrainJobConfig: ("optim.lr=3e-4", "optim.lr", 3e-4),
    TuneJobConfig: ("base.qfda.mix=[0.2, 0.7, 0.1]", "base.qfda.mix", (0.2, 0.7, 0.1)),
    SimParams: ("lookalike_cos=[0.5, 0.7]", "lookalike_cos", (0.5, 0.7)),
    ServeJobConfig: ("port=8123", "port", 8123),
    PrepareJobConfig: ("workers=3", "workers", 3),
    SimulateJobConfig: ("params.faces_per_clip=4", "params.faces_per_clip", 4.0),
    PredictJobConfig: ("num_actors=2", "num_actors", 2),
    IndexJobConfig: ("target_far=0.01", "target_far", 0.01),
    EvaluateJobConfig: ("max_id=100", "max_id", 100),
}


def _load(cls, overrides=(), path=None):
    return load_config(cls, path, list(overrides), flags=REQUIRED[cls])


def _at(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("cls", list(SETS), ids=lambda c: c.__name__)
def test_set_overrides_every_job_config(cls):
    item, key, want = SETS[cls]
    cfg = _load(cls, [item])
    assert _at(cfg, key) == pytest.approx(want) and _at(cfg, key) != _at(_load(cls), key)


@pytest.mark.parametrize("cls", list(SETS), ids=lambda c: c.__name__)
def test_unknown_key_is_rejected_naming_it(cls):
    with pytest.raises(ConfigError, match=r"unknown config key: nonsense_key \(known at that level"):
        _load(cls, ["nonsense_key=1"])


def test_unknown_nested_key_in_a_file_names_the_dotted_key_and_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 0.001\n  lrr: 0.002\n")
    with pytest.raises(ConfigError, match=r"unknown config key: optim.lrr .*known at that level: "
                                          r"batch_size.*\(in .*job.yaml\)"):
        load_config(TrainJobConfig, path)
    path.write_text("optimm: {}\n")
    with pytest.raises(ConfigError, match=r"job.yaml: unknown config key: optimm"):
        load_config(TrainJobConfig, path)


@pytest.mark.parametrize("item,match", [
    ("qfda.n_draws=many", r"qfda.n_draws: expected an integer, got 'many' \(from the command line\)"),
    ("train.epochs=true", r"train.epochs: expected an integer, got True"),
    ("gate.det_min=[1, 2]", r"gate.det_min: expected a number, got \[1, 2\]"),
    ("train.use_gpu=maybe", r"train.use_gpu: expected true/false, got 'maybe'"),
    ("qfda.sizes=[1, x]", r"qfda.sizes.1: expected an integer, got 'x'"),
    ("loss.stages.0=1", r"cannot set loss.stages.0: loss.stages is a setting"),
    ("optim.schedule=nonsense", r"optim.schedule must be step or cosine, got 'nonsense'"),
    ("model.head_bias=one", r"model.head_bias must be zero or prior, got 'one'"),
])
def test_wrong_type_names_the_dotted_key(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainJobConfig, None, [item])


def test_wrong_type_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("qfda:\n  n_draws: many\n")
    with pytest.raises(ConfigError, match=r"qfda.n_draws: expected an integer, got 'many' \(in .*job.yaml\)"):
        load_config(TrainJobConfig, path)
    # --set wins over the file, and the error says where the bad value came from
    assert load_config(TrainJobConfig, path, ["qfda.n_draws=7"]).qfda.n_draws == 7


@pytest.mark.parametrize("cls,items,match", [
    # qFDA picks sizes out of n_draws faces (rayvid.core.fusion.qfda), a mix entry per size
    (TrainJobConfig, ["qfda.n_draws=2"], r"qfda.sizes \(1, 3, 5\) must be <= n_draws=2"),
    (TrainJobConfig, ["qfda.mix=[0.5, 0.5]"], r"qfda.mix \(0.5, 0.5\) needs one probability per size"),
    (TrainJobConfig, ["qfda.mix=[0.5, -0.5, 1.0]"], r"qfda.mix .* must be >= 0"),
    # loss stages: the first at 0.0, then strictly increasing, known losses only
    (TrainJobConfig, ["loss.stages=[{start: 0.1, weights: {ce: 1.0}}]"],
     r"loss.stages \(starts \[0.1\]\): the first loss stage must start at fraction 0.0"),
    (TrainJobConfig, ["loss.stages=[{start: 0.0, weights: {ce: 1}}, {start: 0.5, weights: {ce: 1}}, "
                      "{start: 0.4, weights: {ce: 1}}]"], r"loss.stages \(starts \[0.0, 0.5, 0.4\]\)"),
    (TrainJobConfig, ["loss.stages=[{start: 0.0, weights: {cee: 1.0}}]"], r"unknown loss\(es\) \['cee'\]"),
    (TrainJobConfig, ["loss.stages=best"], r"unknown loss preset 'best'"),
    (TrainJobConfig, ["folds.k=3", "folds.run=[0, 3]"], r"folds.run \(0, 3\): folds must be .* in 0..2"),
    (TrainJobConfig, ["model.archs=[M5, M9]"], r"model.archs: unknown model\(s\) \['M9'\]"),
    (TrainJobConfig, ["data.dataset=d", "data.release=r"], r"data.dataset and release are both given"),
    (TrainJobConfig, ["fusion.cuts=[0, 30, 20, 40]"], r"fusion: band cuts must be ascending"),
    (TuneJobConfig, ["base.qfda.n_draws=2"], r"base.qfda.sizes \(1, 3, 5\) must be <= n_draws=2"),
    (TuneJobConfig, ["base.folds.k=2", "search.fold=2"], r"search.fold 2 is not a fold of base.folds.k=2"),
    (TuneJobConfig, ["search.arch=M9"], r"search.arch 'M9' is not a model"),
    (PrepareJobConfig, ["release=null"], r"release and out are required"),
])
def test_cross_field_rules_fire_when_the_config_loads(cls, items, match):
    loader = load_tune_config if cls is TuneJobConfig else (lambda _, o: _load(cls, o))
    with pytest.raises(ConfigError, match=match):
        loader(None, items)


def test_with_values_is_checked_and_leaves_the_original():
    cfg = TrainJobConfig()
    changed = with_values(cfg, {"qfda.n_draws": 7, "loss.stages": "ce"})
    assert changed.qfda.n_draws == 7 and changed.loss.stages == LOSS_PRESETS["ce"]
    assert cfg == TrainJobConfig() and changed != cfg
    with pytest.raises(ConfigError, match=r"qfda.sizes \(1, 3, 5\) must be <= n_draws=2"):
        with_values(cfg, {"qfda.n_draws": 2})
    with pytest.raises(ConfigError, match="unknown config key: qfda.draws"):
        with_values(cfg, {"qfda.draws": 2})
    with pytest.raises(Exception):  # frozen: a config is never changed in place
        cfg.qfda.n_draws = 3


@pytest.mark.parametrize("cls", list(SETS), ids=lambda c: c.__name__)
def test_yaml_round_trip(cls, tmp_path):
    """dump_yaml then load_config gives an equal config (non-default values included)."""
    cfg = _load(cls, [SETS[cls][0]])
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    text = (tmp_path / "cfg.yaml").read_text()
    again = (load_tune_config(tmp_path / "cfg.yaml") if cls is TuneJobConfig
             else load_config(cls, tmp_path / "cfg.yaml"))
    assert again == cfg and to_dict(again) == yaml.safe_load(text)
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temp name, then renamed


def test_smoke_file_loads_for_every_job_that_has_a_smoke_test():
    sections = yaml.safe_load(SMOKE_FILE.read_text())
    assert set(sections) == {"train", "tune", "prepare", "simulate"}
    train = load_config(TrainJobConfig, None, smoke_overrides("train"))
    assert train.data.simulate_ids == 30 and train.folds.run == (0,) and train != TrainJobConfig()
    tune = load_tune_config(None, smoke_tune_overrides())
    # the sweep's base is the train smoke run, except its own log interval
    assert with_values(tune.base, {"train.log_every_s": train.train.log_every_s}) == train
    assert tune.search.num_samples == 3
    for job in ("prepare", "simulate"):
        sim = load_config(SimulateJobConfig, None, smoke_overrides(job), flags={"out": "o"})
        assert sim.ids < 100 and sim.params.faces_per_clip < SimParams().faces_per_clip
    with pytest.raises(ConfigError, match="no section 'evaluate'"):
        smoke_overrides("evaluate")


def test_example_configs_load():
    assert load_tune_config(ROOT / "configs" / "tune.yaml").search.num_samples == 16
    # issue 13's sweeps: the open-set recipe on an M5, the margin head's loss
    from rayvid.tune.config import trial_config

    openset = load_tune_config(ROOT / "configs" / "tune_openset.yaml")
    assert set(openset.distributions) >= {"openset.noise", "openset.uir_weight"}
    trial = trial_config(openset, {"openset.noise": "uir", "openset.uir_weight": 0.5})
    assert trial.openset.score_noise and trial.fold_splits == ("train", "val")
    margin = load_tune_config(ROOT / "configs" / "tune_margin.yaml")
    assert margin.search.arch == "cosine_mlp" and "loss.margin" in margin.distributions
    cos = trial_config(margin, {"loss.cosine_stages": "cosface", "loss.margin": 0.2})
    assert cos.loss.cosine_stages[0].weights == {"cosface": 1.0} and cos.loss.margin == 0.2
    serve = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app = serve["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert args.members_per_deployment == 0
    MemberConfig.model_validate(app["args"]["members"]["user_config"])
    assert ServingConfig.model_validate(app["deployments"][0]["user_config"]).top_k == 5
    with pytest.raises(ValueError, match="extra"):  # the serving models forbid unknown keys too
        ServingConfig.model_validate({"top_kk": 3})


def test_the_fourth_place_constants_have_one_home():
    """Train defaults, the model's references and the sweep's 4th-place trial all read
    rayvid.core.fourth_place; the lr halves every 50 of their epochs after the warm-up."""
    cfg = TrainJobConfig()
    assert [(s.start, s.weights) for s in cfg.loss.stages] == [(a, dict(w)) for a, w in FOURTH_PLACE_STAGES]
    assert FOURTH_PLACE_STAGES == fp.LOSS_STAGES
    assert LOSS_PRESETS["fourth_place"] == cfg.loss.stages
    assert cfg.optim.step_fraction == FOURTH_PLACE_LR.step_fraction == 50 / 140
    assert (cfg.gate.det_min, cfg.gate.quality_min) == (fp.GATE_DET_MIN, fp.GATE_QUALITY_MIN)
    assert (cfg.qfda.n_draws, cfg.qfda.sizes, cfg.qfda.mix) == (fp.QFDA_N_DRAWS, fp.QFDA_SIZES, fp.QFDA_MIX)
    ref = fourth_place_config()
    assert (ref.optim.lr, ref.optim.warmup, ref.optim.warmup_lr) == (
        FOURTH_PLACE_LR.base_lr, FOURTH_PLACE_LR.warmup, FOURTH_PLACE_LR.warmup_lr)
    assert DEFAULT_SPACE["loss.stages"] == {"choice": list(SIGMOID_PRESETS)}
    assert set(SIGMOID_PRESETS) | set(COSINE_PRESETS) == set(LOSS_PRESETS)


def test_loss_stages_as_preset_list_or_json_text_are_the_same():
    by_name = with_values(TrainJobConfig(), {"loss.stages": "start_combine"})
    listed = with_values(TrainJobConfig(), {"loss.stages": to_dict(by_name.loss.stages)})
    text = with_values(TrainJobConfig(), {"loss.stages": '[{"start":0.0,"weights":{"ce":0.25,"focal":0.75}},'
                                                         '{"start":0.16,"weights":{"ce":0.02,"focal":0.98}}]'})
    assert by_name == listed == text
    assert [s.weights for s in by_name.loss.stages] == [fp.START, fp.COMBINE]


def test_sim_params_with_overrides_is_checked():
    assert SimParams.with_overrides(faces_per_clip=5).faces_per_clip == 5.0
    with pytest.raises(ConfigError, match="unknown config key: faces_per_clipp"):
        SimParams.with_overrides(faces_per_clipp=5)
    with pytest.raises(ConfigError, match=r"noise_fraction: .*less than 1"):
        SimParams.with_overrides(noise_fraction=1.0)


def test_job_takes_config_file_flags_and_set_in_that_order(tmp_path):
    """jobs/simulate.py: the file, then the job's flags, then --set (the later wins)."""
    import json
    import subprocess
    import sys

    (tmp_path / "sim.yaml").write_text(f"out: {tmp_path / 'a'}\nids: 4\nseed: 5\n"
                                       "params: {faces_per_clip: 2.0, noise_fraction: 0.3}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "simulate.py"), "--config",
                           str(tmp_path / "sim.yaml"), "--ids", "3", "--set", "ids=2",
                           "--faces-per-clip", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "a" / "_simulator" / "params.json").read_text())
    assert (meta["ids"], meta["seed"]) == (2, 5)
    assert (meta["params"]["faces_per_clip"], meta["params"]["noise_fraction"]) == (3.0, 0.3)
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), "--release", "r",
                          "--set", "workerz=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "prepare: config error: unknown config key: workerz (known at that level: bucket_mib, "
        "force, on_bad_clip, out, release, workers)"]


@pytest.mark.parametrize("items, match", [
    (["loss.stages=arcface"], r"stages use \['arcface'\]: a margin loss needs a cosine head"),
    (["loss.stages=[{start: 0.0, weights: {focal: 1.0, cosface: 0.5}}]"], "cosine head"),
    (["loss.cosine_stages=fourth_place"], r"cosine_stages use \['ce', 'focal'\].*margin losses only"),
    (["loss.cosine_stages=[{start: 0.0, weights: {uir: 1.0}}]"], "margin losses only"),
    (["inputs.modalities=[face,smell]"], "inputs.modalities"),
    (["inputs.modalities=[]"], "at least one"),
    (["inputs.modality_dropout=1.0"], "modality_dropout"),
])
def test_a_loss_that_does_not_suit_its_head_is_refused_when_the_config_loads(items, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainJobConfig, None, items)


def test_each_head_gets_its_own_loss_mix():
    from rayvid.train.worker import build_criterion, model_kwargs

    cfg = load_config(TrainJobConfig, None, ["model.archs=[M5,attention,multimodal,cosine_mlp]",
                                             "loss.cosine_stages=cosface", "loss.margin=0.2",
                                             "loss.margin_scale=16"])
    mlp, _ = build_criterion(cfg, "M5")
    assert sorted(mlp.losses) == ["ce", "focal"]
    assert sorted(build_criterion(cfg, "multimodal")[0].losses) == ["ce", "focal"]
    for arch in ("attention", "cosine_mlp"):
        loss, _ = build_criterion(cfg, arch)
        assert list(loss.losses) == ["cosface"]
        assert (loss.losses["cosface"].s, loss.losses["cosface"].m3) == (16.0, 0.2)
        assert model_kwargs(cfg, arch)["scale"] == 16.0  # the head scores with the loss's s
    assert model_kwargs(cfg, "multimodal", (64, 32, 16))["head_dim"] == 64


@pytest.mark.parametrize("items, splits, rows, part", [
    (["openset.noise=none"], ("train",), {"noise": False}, None),
    ([], ("train", "val"),  # the default: the 4th place's train+val, noise as class 0
     {"noise": True, "val_part": "seen", "unseen_fraction": 0.5, "val_labels": "all"}, "unseen"),
    (["openset.noise=uir", "openset.source=val_noise"], ("train", "val"),
     {"noise": True, "val_part": "seen", "unseen_fraction": 0.5, "val_labels": "noise"}, "unseen"),
    (["openset.noise=class", "openset.source=val", "openset.unseen=0.3"], ("train", "val"),
     {"noise": True, "val_part": "seen", "unseen_fraction": 0.3, "val_labels": "all"}, "unseen"),
    (["openset.noise=none", "openset.score_noise=true"], ("train", "val"),
     {"noise": False, "val_part": "seen", "unseen_fraction": 0.5, "val_labels": "noise"}, "unseen"),
    (["folds.splits=[train,val]", "openset.unseen=0", "openset.noise=none"], ("train", "val"),
     {"noise": False, "val_part": None, "unseen_fraction": 0.0, "val_labels": "all"}, None),
])
def test_open_set_recipe_decides_the_folded_clips_and_the_honest_part(items, splits, rows, part):
    """One key (`openset.noise`) turns a recipe on: val's noise joins the folds, a part of
    val stays unseen and the final score is on that part only."""
    cfg = load_config(TrainJobConfig, None, items)
    assert cfg.fold_splits == splits and cfg.row_filters() == rows
    assert cfg.eval_part("val") == part and cfg.eval_part("test") is None


@pytest.mark.parametrize("items, match", [
    (["openset.noise=other"], "openset.noise"),
    (["openset.unseen=1.0"], "openset.unseen"),
    (["openset.uir_weight=-1"], "openset.uir_weight"),
    (["model.calibrate=cosine"], "model.calibrate"),
])
def test_bad_open_set_and_calibration_values_name_their_key(items, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainJobConfig, None, items)


def test_open_set_recipe_wraps_the_heads_loss():
    from rayvid.model.losses import MixedLoss, OpenSetLoss
    from rayvid.train.worker import build_criterion

    plain = load_config(TrainJobConfig, None, ["openset.noise=none"])
    assert isinstance(build_criterion(plain, "M5")[0], MixedLoss)
    cfg = load_config(TrainJobConfig, None, ["openset.noise=both", "openset.uir_weight=0.3",
                                             "openset.uir_start=0.2", "loss.margin_scale=16"])
    for arch, scale in (("M5", 1.0), ("cosine_mlp", 16.0)):
        loss, _ = build_criterion(cfg, arch)
        assert isinstance(loss, OpenSetLoss)
        assert (loss.mode, loss.lam, loss.start, loss.scale) == ("both", 0.3, 0.2, scale)
