"""Build or update the person-search index that `GET /search` reads (`rayvid.infer.person_index`).

    python jobs/index.py --run runs/rayvid --dataset runs/rayvid/dataset --split test --out index/
    python jobs/index.py --run runs/rayvid --dataset data/new-clips --split test --out index/ --update
    python jobs/index.py --config index.yaml --set k=50        # keys: rayvid/infer/config.py

Ray Data batch inference over a prepared split with the run's ensemble (qFF, the
`rayvid.infer.predict` scorer); keeps each identity's top `--k` clips with scores and frame
ranges. `--update` scores only the new split and merges it into the stored top-k. Also
calibrates the run's "unknown" threshold into RUN/serving.json when it has none (or with
`--calibrate`) from the val split of `--calibration-dataset` (default RUN/dataset).
Attaches to RAY_ADDRESS or starts a local Ray. Exits 2 with a one-line error on bad input.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rayvid.console import ray_init_options, setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.infer import person_index as index, predict  # noqa: E402
from rayvid.model.run_folder import RunFolderError  # noqa: E402
from rayvid.infer.config import IndexJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__, "YAML of IndexJobConfig keys (rayvid/infer/config.py)", "k=50")
    S = cli.KEEP
    p.add_argument("--run", default=S, help="run folder with ensemble.json")
    p.add_argument("--dataset", default=S, help="prepared dataset holding the clip library")
    p.add_argument("--split", default=S, help="split of --dataset to index (test)")
    p.add_argument("--out", default=S, help="index folder")
    p.add_argument("--update", action="store_true", default=S, help="add --split to the existing index")
    p.add_argument("--k", type=int, default=S, help=f"clips kept per identity ({index.DEFAULT_K})")
    p.add_argument("--batch-size", type=int, default=S, help="clips per scoring batch (4096)")
    p.add_argument("--num-actors", type=int, default=S, help="scoring actors (default: one per GPU)")
    p.add_argument("--calibrate", action="store_true", default=S, help="recalibrate RUN/serving.json")
    p.add_argument("--calibration-dataset", default=S, help="dataset with a labelled val split")
    p.add_argument("--target-far", type=float, default=S, help="calibrate at this false-accept rate "
                                                               "(default: the max-F1 threshold)")
    args = p.parse_args(argv)
    setup_console()
    if (cfg := cli.job_config("index", IndexJobConfig, args)) is None:
        return 2
    try:  # check the inputs before starting Ray
        predict.read_run(cfg.run)
        predict.check_split(cfg.dataset, cfg.split)
        if cfg.update and index.read_manifest(cfg.out)["run"] != str(Path(cfg.run).resolve()):
            raise index.SearchIndexError(f"{cfg.out} was built with run "
                                         f"{index.read_manifest(cfg.out)['run']}, not {cfg.run}")
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS"), **ray_init_options())
        if cfg.update:
            manifest = index.update_index(cfg.out, cfg.dataset, cfg.split,
                                          batch_size=cfg.batch_size, num_actors=cfg.num_actors)
        else:
            manifest = index.build_index(cfg.run, cfg.dataset, cfg.split, cfg.out, k=cfg.k,
                                         batch_size=cfg.batch_size, num_actors=cfg.num_actors)
        cal_ds = Path(cfg.calibration_dataset or Path(cfg.run) / "dataset")
        if (cfg.calibrate or index.read_serving(cfg.run) is None) and (cal_ds / "val").is_dir():
            cal = index.calibrate(cfg.run, cal_ds, "val", target_far=cfg.target_far,
                                  batch_size=cfg.batch_size, num_actors=cfg.num_actors)
            print(f"calibrated: {json.dumps(cal)}" if cal else "not calibrated (no noise clips)")
    except (predict.PredictError, index.SearchIndexError, RunFolderError, OSError) as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in manifest.items() if k != "weights"}))
    src = manifest["sources"][-1]
    print(f"index {cfg.out} version {manifest['version']}: {manifest['rows']} rows "
          f"(top {manifest['k']} of {manifest['num_classes'] - 1} identities); "
          f"scored {src['clips']} clips of {src['dataset']}/{src['split']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
