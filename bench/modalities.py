"""Issue 12: face-only M5 vs face-set attention vs multimodal, per modality, mixed ensembles.

Every training row is a real `run_training` (Ray Train on a local Ray, Ray Data prediction
of the val split, official mAP against val_gt.txt) on the same prepared dataset, with the
same folds, steps and epochs; the no-training qFF class-mean baseline is scored in the same
runs. Rows are resumable: a finished run folder is reused. From the trained members the
script then scores, by prediction only (no training):

- each kind alone (its members without the prototype head) and with it (the run's default);
- mixed ensembles (members of several runs, one `ensemble.json`, weights 1 per member);
- mAP on the val clips with no face at all (a val split of only those clips, scored
  against val_gt.txt restricted to them): face-only members cannot score such a clip;
- training samples/s of each kind (last epoch, Ray Data -> Ray Train), vs M5's.

    python bench/modalities.py --work /work/data/mm1000                # 1,000 ids, fold 0
    python bench/modalities.py --work /work/data/mm1000 --five-fold multimodal,M5

Writes WORK/modalities.json, WORK/modalities.md (the tables) and WORK/modalities.png.
"""

import argparse
import dataclasses
import glob
import json
import shutil
import sys
import time
from pathlib import Path

from _common import prepared_dataset, ray_env

ray_env()

from rayvid.config import load_config  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402

# name -> (label, archs, overrides). Single fold 0; `--five-fold` adds folds 1-4 for FIVE.
ROWS = {
    "M5": ("face-only M5 (clip vector, qFF / qFDA)", ["M5"], []),
    "attention": ("face-set attention (3rd place), ArcFace", ["attention"], []),
    "multimodal": ("multimodal: face + head + body + audio", ["multimodal"], []),
    "mm_face": ("  multimodal, face only", ["multimodal"], ["inputs.modalities=[face]"]),
    "mm_head": ("  multimodal, head only", ["multimodal"], ["inputs.modalities=[head]"]),
    "mm_body": ("  multimodal, body only", ["multimodal"], ["inputs.modalities=[body]"]),
    "mm_audio": ("  multimodal, audio only", ["multimodal"], ["inputs.modalities=[audio]"]),
}
FIVE = ("multimodal", "M5", "attention")
# name -> the runs whose trained members it blends (+ the prototype head or not)
MIXES = {
    "M5+multimodal": (("M5", "multimodal"), False),
    "M5+multimodal+proto": (("M5", "multimodal"), True),
    "M5+attention+multimodal": (("M5", "attention", "multimodal"), False),
    "M5+attention+multimodal+proto": (("M5", "attention", "multimodal"), True),
}


def train_row(name: str, folds: list[int], args, work: Path) -> dict:
    from rayvid.train.job import run_training

    label, archs, overrides = ROWS[name]
    run_dir = work / "runs" / (name if folds == [0] else f"{name}_5fold")
    if folds != [0]:  # reuse the single-fold run's fold 0 rather than retrain it
        src, dst = work / "runs" / name / "folds" / "0", run_dir / "folds" / "0"
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
    sets = ["openset.noise=none", f"data.dataset={args.dataset}", f"folds.run={folds}",
            f"model.archs=[{','.join(archs)}]", *overrides, *args.set]
    cfg = load_config(TrainJobConfig, None, sets)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else \
        run_training(cfg, run_dir)
    rates = [f["history"][-1]["samples_per_s"] for f in summary["folds"] if f.get("history")]
    return {"name": name, "label": label, "folds": len(folds), "run": str(run_dir),
            "blend_map": summary["eval"]["map"], "baseline_map": summary["baseline_map"],
            "alone_map": members_map(run_dir, [run_dir], False, args, work),
            "faceless_map": members_map(run_dir, [run_dir], True, args, work, faceless=True),
            "faceless_alone_map": members_map(run_dir, [run_dir], False, args, work,
                                              faceless=True),
            "fold_maps": [f["best_map"] for f in summary["folds"]],
            "samples_per_s": sum(rates) / max(len(rates), 1), "seconds": summary["seconds"]}


def members_map(out: Path, runs: list[Path], proto: bool, args, work: Path,
                faceless: bool = False) -> float:
    """Val mAP of the trained members of `runs` blended (weights 1, + the first run's
    prototype head at its weight when `proto`), by prediction only; cached in `out`."""
    from rayvid.infer.predict import predict_split
    from rayvid.model import run_folder

    tag = ("proto" if proto else "alone") + ("_faceless" if faceless else "")
    alt = out / f"score_{tag}"
    result = alt / "result.json"
    if result.exists():
        return json.loads(result.read_text())["map"]
    members, inputs, spec0 = [], set(), None
    for run in runs:
        spec = run_folder.read_ensemble(run)
        spec0 = spec0 or spec
        inputs |= set(spec.input_spec().kinds)
        for m in spec.members:
            if m.arch == "prototype" and not (proto and run == runs[0]):
                continue
            weight = m.weight if m.arch == "prototype" else 1.0
            members.append(dataclasses.replace(m, path=str((run / m.path).resolve()),
                                               weight=weight))
    if proto:  # the prototype's weight: the default's rule, 1 x the other members' total
        members = [dataclasses.replace(m, weight=float(len(members) - 1))
                   if m.arch == "prototype" else m for m in members]
    raw = spec0.input_spec().to_json()
    raw["kinds"] = [k for k in ("clip_vector", "face_set", "multimodal") if k in inputs]
    extra = {**spec0.extra, "inputs": raw}
    run_folder.write_ensemble(alt, dataclasses.replace(spec0, members=tuple(members),
                                                       extra=extra))
    dataset, gt = (faceless_split(args, work) if faceless else (args.dataset, args.gt))
    pred = predict_split(alt, dataset, "val", alt / "submission_val.txt", gt_path=gt)
    result.write_text(json.dumps({"map": pred["map"], "clips": pred["clips"]}))
    return pred["map"]


def faceless_split(args, work: Path) -> tuple[str, str]:
    """A dataset whose val split is the val clips with no face, and val_gt.txt restricted
    to them (identities without such a clip dropped)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rayvid.core.formats import clip_stem, read_gt, val_gt_line
    from rayvid.release.schema import META_FILE

    out = work / "faceless"
    gt = out / "val_gt.txt"
    if gt.exists():
        return str(out / "dataset"), str(gt)
    ds = out / "dataset"
    (ds / "val").mkdir(parents=True, exist_ok=True)
    table = pq.read_table(sorted(glob.glob(f"{args.dataset}/val/*.parquet")))
    table = table.filter(pc.equal(table.column("n_faces"), 0))
    pq.write_table(table, ds / "val" / "part-0.parquet")
    meta = json.loads((Path(args.dataset) / META_FILE).read_text())
    meta["splits"] = {"val": meta["splits"]["val"]}
    (ds / META_FILE).write_text(json.dumps(meta))
    keep = {clip_stem(c) for c in table.column("clip").to_pylist()}
    lines = []
    for identity, clips in sorted(read_gt(args.gt).items()):
        mine = [clip_stem(c) for c in clips if clip_stem(c) in keep]
        if mine:
            lines.append(val_gt_line(identity, mine))
    gt.write_text("\n".join(lines) + "\n")
    print(f"[modalities] faceless val split: {table.num_rows} clips, {len(lines)} identities",
          flush=True)
    return str(ds), str(gt)


def tables(rows: list[dict], mixes: list[dict]) -> str:
    base = next(r["baseline_map"] for r in rows if r["baseline_map"] is not None)
    m5 = next((r["samples_per_s"] for r in rows if r["name"] == "M5" and r["folds"] == 1), None)
    lines = ["| row | folds | val mAP, members alone | val mAP, + prototype head | vs baseline "
             "| faceless clips mAP (alone / + proto) | samples/s (vs M5) | minutes |",
             "|---|---|---|---|---|---|---|---|",
             f"| no-training qFF class-mean baseline | - | {base:.4f} | | | 0 (no face) | | |"]
    for r in rows:
        rate = f"{r['samples_per_s']:.0f}" + (f" ({r['samples_per_s'] / m5:.2f}x)" if m5 else "")
        best = max(r["alone_map"], r["blend_map"])
        lines.append(f"| {r['label'].strip()} | {r['folds']} | {r['alone_map']:.4f} | "
                     f"{r['blend_map']:.4f} | {best - base:+.4f} | "
                     f"{r['faceless_alone_map']:.4f} / {r['faceless_map']:.4f} | {rate} | "
                     f"{r['seconds'] / 60:.1f} |")
    if mixes:
        lines += ["", "| mixed ensemble (fold 0 members, weight 1 each) | val mAP | vs baseline "
                  "| faceless clips mAP |", "|---|---|---|---|"]
        for m in mixes:
            lines.append(f"| {m['name']} | {m['map']:.4f} | {m['map'] - base:+.4f} | "
                         f"{m['faceless_map']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], mixes: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r["baseline_map"] for r in rows if r["baseline_map"] is not None)
    labels = [f"{r['name']}{' x5' if r['folds'] > 1 else ''}" for r in rows] + \
        [m["name"] for m in mixes]
    alone = [r["alone_map"] for r in rows] + [m["map"] for m in mixes]
    blend = [r["blend_map"] for r in rows] + [0.0] * len(mixes)
    faceless = [r["faceless_alone_map"] for r in rows] + [m["faceless_map"] for m in mixes]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], alone, 0.4, label="members alone / mix")
    ax.bar([x + 0.2 for x in xs], blend, 0.4, label="+ prototype head")
    ax.axhline(base, color="gray", ls="--", lw=1, label="class-mean baseline")
    ax.axhline(base + 0.03, color="green", ls=":", lw=1, label="baseline + 0.03")
    ax.set_ylim(min(v for v in alone + blend if v > 0) - 0.05, 1.0)
    ax.set_ylabel("val mAP")
    ax.legend(fontsize=8, loc="lower right")
    bx.bar(list(xs), faceless, 0.5, color="tab:purple")
    bx.set_ylabel("val mAP, clips with no face")
    bx.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder for the runs and the tables")
    p.add_argument("--ids", type=int, default=1000, help="simulate a release of this size")
    p.add_argument("--release", help="an existing release (for val_gt.txt)")
    p.add_argument("--dataset", help="its prepared dataset")
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    p.add_argument("--mixes", default=",".join(MIXES), help=f"subset of {','.join(MIXES)}")
    p.add_argument("--five-fold", default="", help=f"also 5 folds of these rows (e.g. "
                   f"{','.join(FIVE)}), after the single-fold rows and the mixes")
    p.add_argument("--set", action="append", default=[], help="extra override for every row")
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.dataset:
        release, dataset = prepared_dataset(work, args.ids)
        args.release, args.dataset = str(release), str(dataset)
    args.gt = str(Path(args.release) / "val_gt.txt")

    import ray

    ray.init(num_cpus=args.num_cpus, logging_level="WARNING")
    rows, mixes = [], []

    def train(name: str, folds: list[int]) -> None:
        t0 = time.perf_counter()
        rows.append(train_row(name, folds, args, work))
        r = rows[-1]
        print(f"[modalities] {name:10s} x{len(folds)} alone {r['alone_map']:.4f}  +proto "
              f"{r['blend_map']:.4f}  baseline {r['baseline_map']:.4f}  faceless "
              f"{r['faceless_alone_map']:.4f}  {r['samples_per_s']:.0f} samples/s  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write(work, rows, mixes)

    for name in [n for n in args.rows.split(",") if n]:
        train(name, [0])
    for name in [m for m in args.mixes.split(",") if m]:
        runs, proto = MIXES[name]
        dirs = [work / "runs" / r for r in runs]
        if not all((d / "ensemble.json").exists() for d in dirs):
            continue
        out = work / "mixes" / name
        mixes.append({"name": name, "map": members_map(out, dirs, proto, args, work),
                      "faceless_map": members_map(out, dirs, proto, args, work, faceless=True)})
        print(f"[modalities] mix {name}: {mixes[-1]['map']:.4f} (faceless "
              f"{mixes[-1]['faceless_map']:.4f})", flush=True)
        write(work, rows, mixes)
    for name in [n for n in args.five_fold.split(",") if n]:
        train(name, [0, 1, 2, 3, 4])
    ray.shutdown()
    print("\n" + tables(rows, mixes) + f"\n\n{work / 'modalities.md'}, {work / 'modalities.png'}")
    return 0


def write(work: Path, rows: list[dict], mixes: list[dict]) -> None:
    """The tables and the plot as they stand (after every row: a stopped run keeps them)."""
    from rayvid.core.atomic import write_json, write_text

    write_json(work / "modalities.json", {"rows": rows, "mixes": mixes})
    write_text(work / "modalities.md", tables(rows, mixes))
    plot(rows, mixes, work / "modalities.png")


if __name__ == "__main__":
    sys.exit(main())
