"""Batch prediction: a split of a prepared dataset -> the official submission (`rayvid.infer.predict`).

    python jobs/predict.py --run runs/exp1 --dataset data/iqiyi-ds --split test \
        --out out/submission.txt [--per-clip out/test_top5.parquet] [--gt val_gt.txt] \
        [--fusion vote]
    python jobs/predict.py --config predict.yaml --set split=val   # keys: rayvid/infer/config.py

Attaches to the Ray cluster of `RAY_ADDRESS` / `ray start` (as under `ray job submit`), else
starts a local one; run it from the repo root so Ray's workers import the same `rayvid`.
Prints progress and a summary (clips, clips/s, outputs, mAP when a gt is known); exits 2
with a one-line error for a missing or malformed input.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rayvid.console import ray_init_options, setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.infer import predict  # noqa: E402
from rayvid.infer.config import PredictJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "YAML of PredictJobConfig keys (rayvid/infer/config.py)",
                        "batch_size=1024")
    S = cli.KEEP
    parser.add_argument("--run", default=S, help="run folder with ensemble.json")
    parser.add_argument("--dataset", default=S, help="prepared dataset folder")
    parser.add_argument("--split", default=S, choices=["val", "test"])
    parser.add_argument("--out", default=S, help="submission file to write")
    parser.add_argument("--per-clip", default=S,
                        help="Parquet of every clip's top-k classes and scores")
    parser.add_argument("--top-k-clip", type=int, default=S, help="classes per clip in --per-clip (5)")
    parser.add_argument("--gt", default=S, help="val_gt.txt-format file to score the submission against")
    parser.add_argument("--num-actors", type=int, default=S, help="scoring actors (default: one per GPU)")
    parser.add_argument("--batch-size", type=int, default=S, help="clips per scoring batch (4096)")
    parser.add_argument("--fusion", default=S, choices=predict.FUSIONS,
                        help="qff: one fused feature per clip (default); vote: the clip-vector "
                             "members score every face and average (per-frame voting)")
    parser.add_argument("--part", default=S, choices=["seen", "unseen"],
                        help="val only: predict and score this part (unseen: the clips an "
                             "open-set run never trained on)")
    args = parser.parse_args(argv)
    setup_console()
    if (cfg := cli.job_config("predict", PredictJobConfig, args)) is None:
        return 2
    try:  # check the inputs before starting or attaching to Ray
        predict.read_run(cfg.run)
        predict.find_gt(predict.check_split(cfg.dataset, cfg.split), cfg.split, cfg.gt)
        import ray

        ray.init(**ray_init_options())
        summary = predict.predict_split(
            cfg.run, cfg.dataset, cfg.split, cfg.out, per_clip_path=cfg.per_clip,
            top_k_clip=cfg.top_k_clip, batch_size=cfg.batch_size, num_actors=cfg.num_actors,
            gt_path=cfg.gt, fusion=cfg.fusion, part=cfg.part,
            unseen_fraction=cfg.unseen_fraction)
    except (predict.PredictError, OSError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    print(f"predicted {summary['clips']} clips ({summary['not_ok']} without a usable face, "
          f"{summary['fusion']}) at "
          f"{summary['clips_per_s']:.0f} clips/s -> {summary['submission']}"
          + (f", {summary['per_clip']}" if summary["per_clip"] else "")
          + (f"; mAP {summary['map']:.4f}" if "map" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
