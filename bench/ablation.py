"""Ablation: val mAP of rayvid's recipe and of one change at a time (issue 3's table).

Every row is a real `run_training` (Ray Train on a local Ray, then Ray Data prediction of
the val split, scored by the official metric against val_gt.txt) on the same prepared
dataset, single fold 0 unless the row says otherwise. Two numbers per row:
- `MLP`: the trained member(s) alone (the 4th place's pure sigmoid blend);
- `+proto`: rayvid's default ensemble, the MLP(s) plus the prototype head.
The no-training qFF class-mean baseline is scored on the same split. Rows are resumable:
a finished run folder is reused, so rerunning the command only does what is missing.

    python bench/ablation.py --ids 1000 --work /work/data/ablation        # simulate + prepare
    python bench/ablation.py --release REL --dataset DS --work DIR --rows default,no_gate

Writes DIR/ablation.json, DIR/ablation.md (the table) and DIR/ablation.png.
"""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from _common import prepared_dataset, ray_env

ray_env()

from rayvid.config import load_config  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402

CE_ONLY = "loss.stages=[{start: 0.0, weights: {ce: 1.0}}]"
# name -> (label, overrides). Single fold 0 unless the overrides choose the folds.
ROWS = {
    "default": ("single-fold M5, rayvid defaults", []),
    "zero_bias": ("  zero output bias (4th-place init)", ["model.head_bias=zero"]),
    "fourth_place": ("  4th-place code: zero bias, lr 1.5e-4", ["model.head_bias=zero",
                                                              "optim.lr=1.5e-4"]),
    "no_gate": ("  without the training gate", ["gate.enabled=false"]),
    "mean_fusion": ("  plain-mean fusion instead of qFF", ["fusion.kind=mean"]),
    "no_qfda": ("  without qFDA (qFF of gated faces)", ["qfda.enabled=false"]),
    "ce_only": ("  CE alone instead of the staged focal mix", [CE_ONLY]),
    "ensemble5": ("5-fold ensemble of M5, rayvid defaults", ["folds.run=[]"]),
}


def run_row(name: str, overrides: list[str], args, work: Path) -> dict:
    from rayvid.train.job import run_training

    run_dir = work / name
    sets = ["openset.noise=none", f"data.dataset={args.dataset}", "folds.run=[0]", *overrides, *args.set]
    cfg = load_config(TrainJobConfig, None, sets)
    if name == "ensemble5":  # fold 0 is the default row's: reuse it rather than retrain
        src, dst = work / "default" / "folds" / "0", run_dir / "folds" / "0"
        if (src / "M5" / "result.json").exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = run_training(cfg, run_dir)
    return {"name": name, "label": ROWS[name][0], "overrides": overrides,
            "blend_map": summary["eval"]["map"], "mlp_map": mlp_only_map(run_dir, args),
            "baseline_map": summary["baseline_map"], "seconds": summary["seconds"],
            "fold_maps": [f["best_map"] for f in summary["folds"]]}


def mlp_only_map(run_dir: Path, args) -> float:
    """Val mAP of the run's MLP members without the prototype head."""
    from rayvid.infer.predict import predict_split
    from rayvid.model import run_folder

    alt = run_dir / "mlp_only"
    result = alt / "result.json"
    if result.exists():
        return json.loads(result.read_text())["map"]
    spec = run_folder.read_ensemble(run_dir)
    mlps = tuple(dataclasses.replace(m, path=str((run_dir / m.path).resolve()))
                 for m in spec.members if m.arch != "prototype")
    run_folder.write_ensemble(alt, dataclasses.replace(spec, members=mlps))
    pred = predict_split(alt, args.dataset, "val", alt / "submission_val.txt", gt_path=args.gt)
    result.write_text(json.dumps({"map": pred["map"]}))
    return pred["map"]


def table(rows: list[dict]) -> str:
    base = next((r["baseline_map"] for r in rows if r["baseline_map"] is not None), None)
    lines = ["| row | val mAP, MLP | val mAP, + prototype head | fold-0 mAP | minutes |",
             "|---|---|---|---|---|",
             f"| no-training qFF class-mean baseline | {base:.4f} | | | |"]
    for r in rows:
        folds = ", ".join(f"{m:.3f}" for m in r["fold_maps"])
        lines.append(f"| {r['label'].strip()} | {r['mlp_map']:.4f} | {r['blend_map']:.4f} | "
                     f"{folds} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["baseline"] + [r["name"] for r in rows]
    mlp = [rows[0]["baseline_map"]] + [r["mlp_map"] for r in rows]
    blend = [0.0] + [r["blend_map"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], mlp, 0.4, label="MLP")
    ax.bar([x + 0.2 for x in xs], blend, 0.4, label="+ prototype head")
    ax.axhline(rows[0]["baseline_map"], color="gray", ls="--", lw=1)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("val mAP (official)")
    ax.set_ylim(min(v for v in mlp + blend if v > 0) - 0.05, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder for the runs and the table")
    p.add_argument("--ids", type=int, default=1000, help="simulate a release of this size")
    p.add_argument("--release", help="an existing release (for val_gt.txt)")
    p.add_argument("--dataset", help="its prepared dataset")
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    p.add_argument("--set", action="append", default=[], help="extra override for every row")
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.dataset:
        release, dataset = prepared_dataset(work, args.ids)
        args.release, args.dataset = str(release), str(dataset)
    args.gt = str(Path(args.release) / "val_gt.txt") if args.release else None

    import ray

    ray.init(num_cpus=args.num_cpus, logging_level="WARNING")
    rows = []
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        rows.append(run_row(name, ROWS[name][1], args, work))
        r = rows[-1]
        print(f"[ablation] {name:12s} MLP {r['mlp_map']:.4f}  +proto {r['blend_map']:.4f}  "
              f"baseline {r['baseline_map']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    ray.shutdown()
    md = table(rows)
    for name, text in (("ablation.json", json.dumps(rows, indent=2)), ("ablation.md", md)):
        tmp = work / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(work / name)
    plot(rows, work / "ablation.png")
    print("\n" + md + f"\n\n{work / 'ablation.md'}, {work / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
