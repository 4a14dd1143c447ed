"""rayvid's main job: K-fold training of the 4th-place recipe on Ray, then predict + score.

    python jobs/train.py                                   # embedded default, local Ray
    python jobs/train.py --smoke-test                      # the whole path in ~a minute
    python jobs/train.py --config my.yaml --set data.dataset=/data/iqiyi --out runs/exp1
    ray job submit --working-dir . -- python jobs/train.py --set train.use_gpu=true ...

Exits 2 with a one-line message on a bad config or bad data.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayvid.console import ray_init_options, setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.config import smoke_overrides, to_dict  # noqa: E402
from rayvid.train.config import TrainJobConfig  # noqa: E402


def main() -> int:
    p = cli.parser(__doc__, "YAML of TrainJobConfig keys (rayvid/train/config.py)", "optim.lr=3e-4")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny simulated run, ~1 minute (configs/smoke.yaml `train`)")
    args = p.parse_args()
    setup_console()
    cfg = cli.job_config("train", TrainJobConfig, args, flags={},
                         overrides=smoke_overrides("train") if args.smoke_test else [])
    if cfg is None:
        return 2
    import yaml
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    run_dir = Path(args.out or Path("runs") / (cfg.name + ("-smoke" if args.smoke_test else "")))

    import ray
    from rayvid.release.pickle_reader import ReleaseFormatError
    from rayvid.train.report import summary_lines
    from rayvid.train.job import run_training

    ray.init(address=os.environ.get("RAY_ADDRESS"), **ray_init_options())
    try:
        summary = run_training(cfg, run_dir)
    except (ReleaseFormatError, FileNotFoundError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(["", "== rayvid training summary =="] + summary_lines(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
