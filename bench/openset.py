"""Issue 13: open-set recipes (noise class, UIR, both), margin heads, calibrated mixes.

Every training row is a real `run_training` (Ray Train on a local Ray, Ray Data prediction,
official mAP against val_gt.txt) on the same prepared dataset, fold 0 of 5, the same steps
and epochs. Every row folds val's *seen* part in (`openset.score_noise`, or a recipe's own
noise), so every fold-0 model is selected on the same held-out clips (with their noise),
and every row is scored on the same *unseen* half of val, which no row trained on. Per row:

- val mAP on the unseen part (official metric, gt restricted to the part), and the
  no-training qFF class-mean baseline on the same part;
- the effect on noise, from the full score matrix of the unseen part (scored here):
  the mean rank of the noise clips in every identity's ranking (as a share of the part:
  0.5 = noise ranked like everything else, higher = pushed down), the share of noise in
  each identity's first |G| ranks (|G| its gt clips in the part), and the F1 of rejecting
  unknowns with the served rule (`/identify`'s threshold on the best identity score, set
  by `person_index.threshold_for`), cross-fitted: the threshold is chosen on one half of
  the part and scored on the other, both ways;
- training time and samples/s.

Then mixed ensembles of fold-0 members, by prediction only: M5 + cosine_mlp with raw
scores, with the cosine head calibrated, and with both calibrated (`model.calibrate`).

    python bench/openset.py --work /work/data/mm1000 --dataset /work/data/mm1000/dataset \\
        --release /work/data/mm1000/release

Writes WORK/openset.json, WORK/openset.md (the tables) and WORK/openset.png.
"""

import argparse
import dataclasses
import glob
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from _common import prepared_dataset, ray_env

ray_env()

from rayvid.config import load_config, with_values  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402

# Every row spells its recipe out, so that a change of the defaults does not change a row.
SCORE_NOISE = ("openset.noise=none", "openset.score_noise=true")
VAL_NOISE = "openset.source=val_noise"
# name -> (label, archs, overrides)
ROWS = {
    "M5": ("face-only M5, focal + CE (today)", ["M5"], [*SCORE_NOISE]),
    "M5_class": ("  + noise class (class 0, 4th place)", ["M5"], ["openset.noise=class", VAL_NOISE]),
    "M5_uir": ("  + UIR (iQIYI)", ["M5"], ["openset.noise=uir", VAL_NOISE]),
    "M5_both": ("  + noise class and UIR", ["M5"], ["openset.noise=both", VAL_NOISE]),
    "M5_uir01": ("  + UIR, weight 0.1", ["M5"], ["openset.noise=uir", "openset.uir_weight=0.1", VAL_NOISE]),
    "M5_class_val": ("  + noise class, all of val's seen part (4th place)", ["M5"],
                     ["openset.noise=class", "openset.source=val"]),
    "cos_arc": ("cosine_mlp, ArcFace (s 30, m 0.5)", ["cosine_mlp"],
                [*SCORE_NOISE, "loss.cosine_stages=arcface"]),
    "cos_cos": ("cosine_mlp, CosFace (s 30, m 0.35)", ["cosine_mlp"],
                [*SCORE_NOISE, "loss.cosine_stages=cosface"]),
    "cos_arc_class": ("cosine_mlp, ArcFace + noise class", ["cosine_mlp"],
                      ["openset.noise=class", "loss.cosine_stages=arcface", VAL_NOISE]),
    "mm": ("multimodal (the default before issue 13)", ["multimodal"], [*SCORE_NOISE]),
    "mm_class": ("  + noise class", ["multimodal"], ["openset.noise=class", VAL_NOISE]),
    "mm_uir": ("  + UIR", ["multimodal"], ["openset.noise=uir", VAL_NOISE]),
    "mm_both": ("  + noise class and UIR", ["multimodal"], ["openset.noise=both", VAL_NOISE]),
    "mm_val": ("  + val's labelled seen part, no noise", ["multimodal"],
               ["folds.splits=[train,val]", *SCORE_NOISE]),
    "mm_class_val": ("  + val's seen part with noise as class 0 (4th place; the default)", ["multimodal"],
                     ["openset.noise=class", "openset.source=val"]),
}
# name -> (label, [(run, calibrated?)])
MIXES = {
    "raw": ("M5 + cosine_mlp ArcFace, raw scores", [("M5", False), ("cos_arc", False)]),
    "cos_cal": ("M5 + cosine_mlp ArcFace, cosine calibrated", [("M5", False), ("cos_arc", True)]),
    "both_cal": ("M5 + cosine_mlp ArcFace, both calibrated (auto)",
                 [("M5", True), ("cos_arc", True)]),
}


def row_config(name: str, args) -> TrainJobConfig:
    _, archs, overrides = ROWS[name]
    return load_config(TrainJobConfig, None, [
        f"data.dataset={args.dataset}", "folds.run=[0]", f"model.archs=[{','.join(archs)}]",
        *overrides, *args.set])


def train_row(name: str, args, work: Path) -> dict:
    from rayvid.train.job import run_training

    cfg = row_config(name, args)
    run_dir = work / "openset_runs" / name
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else \
        run_training(cfg, run_dir)
    fold = summary["folds"][0]
    assert summary["eval"]["part"] == "unseen", summary["eval"]
    return {"name": name, "label": ROWS[name][0], "run": str(run_dir),
            "map": summary["eval"]["map"], "baseline_map": summary["baseline_map"],
            "fold_map": fold["best_map"], "clips": summary["eval"]["clips"],
            "seconds": fold["seconds"], "samples_per_s": fold["history"][-1]["samples_per_s"],
            "calibration": fold.get("calibration"), **noise_metrics(run_dir, args, work)}


# ------------------------------------------------------------------ the unseen part, scored


def unseen_part(args, spec) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The unseen val clips as the run's inputs (batches), their labels and names."""
    import pyarrow.parquet as pq

    from rayvid.data.pipeline import ClipTransform

    inp = spec.input_spec()
    tf = ClipTransform(mode="qff", weighting=spec.weighting, with_clip=True, kinds=inp.kinds,
                       face_set_size=inp.face_set_size, modalities=inp.modalities,
                       dims=inp.dims, val_part="unseen", unseen_fraction=args.unseen)
    batches, labels, names = [], [], []
    for path in sorted(glob.glob(f"{args.dataset}/val/*.parquet")):
        table = pq.read_table(path, columns=tf.columns())
        out = tf(table)
        batches.append(out)
        labels.append(out["y"])
        names.append(out["clip"])
    return batches, np.concatenate(labels), np.concatenate(names)


def noise_metrics(run_dir: Path, args, work: Path) -> dict:
    """Noise rank, noise share at |G| and cross-fitted rejection F1 on the unseen part;
    cached in RUN/noise_metrics.json."""
    from rayvid.core.inputs import answerable
    from rayvid.model import run_folder
    from rayvid.model.ensemble import Ensemble

    cache = run_dir / "noise_metrics.json"
    if cache.exists():
        return json.loads(cache.read_text())
    spec = run_folder.read_ensemble(run_dir)
    ens = Ensemble.from_run(run_dir)
    batches, labels, names = unseen_part(args, spec)
    scores = np.concatenate([run_folder.weighted_mean(ens.scores(b), ens.weights)
                             for b in batches])
    ok = np.concatenate([answerable(ens.input_kinds, b) for b in batches])
    out = rank_metrics(scores, labels) | rejection_f1(scores, labels, ok, names)
    cache.write_text(json.dumps(out))
    return out


def rank_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Mean rank of the noise clips per identity (1-based, share of the part) and the share
    of noise in each identity's first |G| ranks, over identities with a clip in the part."""
    n = len(labels)
    noise = labels == 0
    ranks, shares = [], []
    for j in np.unique(labels[labels > 0]):
        order = np.argsort(-scores[:, j], kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(1, n + 1)
        ranks.append(rank[noise].mean())
        g = int((labels == j).sum())
        shares.append(noise[order[:g]].mean())
    return {"noise_mean_rank": float(np.mean(ranks)),
            "noise_rank_share": float(np.mean(ranks) / n),
            "noise_at_g": float(np.mean(shares)), "part_clips": n,
            "part_noise": int(noise.sum())}


def rejection_f1(scores: np.ndarray, labels: np.ndarray, ok: np.ndarray,
                 names: np.ndarray) -> dict:
    """F1 of rejecting noise (noise = positive) with the served threshold rule, the
    threshold set on one half of the part (by a name-hash bit) and scored on the other."""
    from rayvid.infer.person_index import threshold_for
    from rayvid.release.strat import name_hash

    best = np.where(ok, scores[:, 1:].max(axis=1), -np.inf)
    noise = labels == 0
    half = (name_hash(names) & np.uint64(1)).astype(bool)
    f1s, thresholds = [], []
    for fit, test in ((half, ~half), (~half, half)):
        t = threshold_for(best[fit], ~noise[fit])["threshold"]
        reject = best[test] < t
        tp = int((reject & noise[test]).sum())
        fp = int((reject & ~noise[test]).sum())
        fn = int((~reject & noise[test]).sum())
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
        thresholds.append(t)
    return {"reject_f1": float(np.mean(f1s)), "thresholds": thresholds}


# ------------------------------------------------------------------ mixes


def mix_row(name: str, args, work: Path) -> dict | None:
    """Fold-0 members of two runs in one ensemble.json, each calibrated or raw."""
    from rayvid.infer.predict import predict_split
    from rayvid.model import run_folder
    from rayvid.model.checkpoints import CONFIG_FILE
    from rayvid.train.kfold import calibrate_member, dataset_dims, transforms
    from rayvid.data import pipeline as rdata
    from rayvid.release.schema import read_meta
    from rayvid.train.worker import input_columns

    label, parts = MIXES[name]
    out = work / "openset_mixes" / name
    result = out / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    runs = [work / "openset_runs" / r for r, _ in parts]
    if not all((r / "ensemble.json").exists() for r in runs):
        return None
    members, spec0 = [], None
    for (run_name, calibrated), run in zip(parts, runs):
        spec = run_folder.read_ensemble(run)
        spec0 = spec0 or spec
        m = spec.members[0]
        dst = out / "members" / run_name
        if not dst.exists():
            shutil.copytree(run / m.path, dst)
            config = json.loads((dst / CONFIG_FILE).read_text())
            had = config.get("extra", {}).pop("calibration", None)
            (dst / CONFIG_FILE).write_text(json.dumps(config))
            if calibrated:
                if had is not None:
                    config["extra"]["calibration"] = had
                    (dst / CONFIG_FILE).write_text(json.dumps(config))
                else:  # calibrate it now, on its fold's held-out clips, as training does
                    cfg = with_values(row_config(run_name, args), {"model.calibrate": "all"})
                    arch = m.arch
                    columns = [*input_columns(arch), "y"]
                    _, heldout_tf = transforms(cfg, 0, arch, dataset_dims(read_meta(args.dataset)))
                    heldout = rdata.clip_dataset(args.dataset, cfg.fold_splits, heldout_tf
                                                 ).select_columns(columns).materialize()
                    calibrate_member(cfg, dst, arch, heldout)
        members.append(dataclasses.replace(m, path=str(dst.resolve()), weight=1.0))
    run_folder.write_ensemble(out, dataclasses.replace(spec0, members=tuple(members)))
    pred = predict_split(out, args.dataset, "val", out / "submission_val.txt", gt_path=args.gt,
                         part="unseen", unseen_fraction=args.unseen)
    row = {"name": name, "label": label, "map": pred["map"], **noise_metrics(out, args, work)}
    result.write_text(json.dumps(row))
    return row


# ------------------------------------------------------------------ tables, plot


def tables(rows: list[dict], mixes: list[dict]) -> str:
    base = next((r["baseline_map"] for r in rows if r.get("baseline_map") is not None), None)
    lines = ["| row | val mAP, unseen part | vs baseline | fold-0 mAP (with noise) | noise "
             "mean rank (share of part) | noise in first \\|G\\| | unknown-rejection F1 | "
             "samples/s | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    if base is not None:
        lines.append(f"| no-training qFF class-mean baseline | {base:.4f} | | | | | | | |")
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['map']:.4f} | {r['map'] - base:+.4f} | {r['fold_map']:.4f} | "
            f"{r['noise_mean_rank']:.0f} ({r['noise_rank_share']:.3f}) | {r['noise_at_g']:.3f} "
            f"| {r['reject_f1']:.3f} | {r['samples_per_s']:.0f} | {r['seconds'] / 60:.1f} |")
    if mixes:
        lines += ["", "| mixed ensemble (fold-0 members, weight 1 each) | val mAP, unseen part "
                  "| noise mean rank (share) | noise in first \\|G\\| | unknown-rejection F1 |",
                  "|---|---|---|---|---|"]
        for m in mixes:
            lines.append(f"| {m['label']} | {m['map']:.4f} | {m['noise_mean_rank']:.0f} "
                         f"({m['noise_rank_share']:.3f}) | {m['noise_at_g']:.3f} | "
                         f"{m['reject_f1']:.3f} |")
    if rows:
        r = rows[0]
        lines += ["", f"Unseen part: {r['part_clips']} val clips ({r['part_noise']} noise)."]
    return "\n".join(lines)


def plot(rows: list[dict], mixes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayvid.core.atomic import atomic_path

    items = rows + mixes
    if not items:
        return
    labels = [i["label"].strip() for i in items]
    y = np.arange(len(items))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(items) + 1.8), sharey=True)
    for ax, key, title in zip(axes, ("map", "noise_rank_share", "reject_f1"),
                              ("val mAP, unseen part", "noise mean rank / part size",
                               "unknown-rejection F1")):
        ax.barh(y, [i[key] for i in items],
                color=["C0"] * len(rows) + ["C2"] * len(mixes))
        ax.set_title(title)
        lo = min(i[key] for i in items)
        ax.set_xlim(max(0.0, lo - 0.1), None)
        if key == "map" and rows and rows[0].get("baseline_map") is not None:
            ax.axvline(rows[0]["baseline_map"], color="k", ls="--", lw=1,
                       label="class-mean baseline")
            ax.legend(loc="lower right", fontsize=8)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Issue 13: open-set recipes and margin heads (1 fold, unseen half of val)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write(work: Path, rows: list[dict], mixes: list[dict]) -> None:
    from rayvid.core.atomic import write_json, write_text

    write_json(work / "openset.json", {"rows": rows, "mixes": mixes})
    write_text(work / "openset.md", tables(rows, mixes))
    plot(rows, mixes, work / "openset.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder for the runs and the tables")
    p.add_argument("--ids", type=int, default=1000, help="simulate a release of this size")
    p.add_argument("--release", help="an existing release (for val_gt.txt)")
    p.add_argument("--dataset", help="its prepared dataset")
    p.add_argument("--rows", default="M5,M5_class,M5_uir,M5_both,cos_arc,cos_cos,mm,mm_class",
                   help=f"subset of {','.join(ROWS)}")
    p.add_argument("--mixes", default=",".join(MIXES), help=f"subset of {','.join(MIXES)}")
    p.add_argument("--set", action="append", default=[], help="extra override for every row")
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.dataset:
        release, dataset = prepared_dataset(work, args.ids)
        args.release, args.dataset = str(release), str(dataset)
    args.gt = str(Path(args.release) / "val_gt.txt")
    args.unseen = row_config("M5", args).openset.unseen

    import ray

    ray.init(num_cpus=args.num_cpus, logging_level="WARNING")
    rows, mixes = [], []
    for name in [n for n in args.rows.split(",") if n]:
        t0 = time.perf_counter()
        rows.append(train_row(name, args, work))
        r = rows[-1]
        print(f"[openset] {name:14s} unseen mAP {r['map']:.4f} (baseline {r['baseline_map']:.4f})"
              f"  noise rank share {r['noise_rank_share']:.3f}  noise@|G| {r['noise_at_g']:.3f}"
              f"  reject F1 {r['reject_f1']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        write(work, rows, mixes)
    for name in [m for m in args.mixes.split(",") if m]:
        row = mix_row(name, args, work)
        if row is None:
            continue
        mixes.append(row)
        print(f"[openset] mix {name}: {row['map']:.4f}  reject F1 {row['reject_f1']:.3f}",
              flush=True)
        write(work, rows, mixes)
    ray.shutdown()
    print("\n" + tables(rows, mixes) + f"\n\n{work / 'openset.md'}, {work / 'openset.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
