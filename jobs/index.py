"""Build or update the person-search index that `GET /search` reads (`rayvid.infer.person_index`).

    python jobs/index.py --run runs/rayvid --dataset runs/rayvid/dataset --split test --out index/
    python jobs/index.py --run runs/rayvid --dataset data/new-clips --split test --out index/ --update

Ray Data batch inference over a prepared split with the run's ensemble (qFF, the
`rayvid.infer.predict` scorer); keeps each identity's top `--k` clips with scores and frame
ranges. `--update` scores only the new split and merges it into the stored top-k. Also
calibrates the run's "unknown" threshold into RUN/serving.json when it has none (or with
`--calibrate`) from the val split of `--calibration-dataset` (default RUN/dataset).
Attaches to RAY_ADDRESS or starts a local Ray. Exits 2 with a one-line error on bad input.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rayvid.console import ray_init_options, setup_console  # noqa: E402
from rayvid.infer import person_index as index, predict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder with ensemble.json")
    p.add_argument("--dataset", required=True, help="prepared dataset holding the clip library")
    p.add_argument("--split", default="test", help="split of --dataset to index")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--update", action="store_true", help="add --split to the existing index")
    p.add_argument("--k", type=int, default=index.DEFAULT_K, help="clips kept per identity")
    p.add_argument("--batch-size", type=int, default=4096, help="clips per scoring batch")
    p.add_argument("--num-actors", type=int, help="scoring actors (default: one per GPU)")
    p.add_argument("--calibrate", action="store_true", help="recalibrate RUN/serving.json")
    p.add_argument("--calibration-dataset", help="dataset with a labelled val split")
    p.add_argument("--target-far", type=float, help="calibrate at this false-accept rate "
                                                    "(default: the max-F1 threshold)")
    args = p.parse_args(argv)
    setup_console()
    try:  # check the inputs before starting Ray
        predict.read_run(args.run)
        predict.check_split(args.dataset, args.split)
        if args.update and index.read_manifest(args.out)["run"] != str(Path(args.run).resolve()):
            raise index.SearchIndexError(f"{args.out} was built with run "
                                         f"{index.read_manifest(args.out)['run']}, not {args.run}")
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS"), **ray_init_options())
        if args.update:
            manifest = index.update_index(args.out, args.dataset, args.split,
                                          batch_size=args.batch_size, num_actors=args.num_actors)
        else:
            manifest = index.build_index(args.run, args.dataset, args.split, args.out, k=args.k,
                                         batch_size=args.batch_size, num_actors=args.num_actors)
        cal_ds = Path(args.calibration_dataset or Path(args.run) / "dataset")
        if (args.calibrate or index.read_serving(args.run) is None) and (cal_ds / "val").is_dir():
            cal = index.calibrate(args.run, cal_ds, "val", target_far=args.target_far,
                                  batch_size=args.batch_size, num_actors=args.num_actors)
            print(f"calibrated: {json.dumps(cal)}" if cal else "not calibrated (no noise clips)")
    except (predict.PredictError, index.SearchIndexError, OSError) as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in manifest.items() if k != "weights"}))
    src = manifest["sources"][-1]
    print(f"index {args.out} version {manifest['version']}: {manifest['rows']} rows "
          f"(top {manifest['k']} of {manifest['num_classes'] - 1} identities); "
          f"scored {src['clips']} clips of {src['dataset']}/{src['split']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
