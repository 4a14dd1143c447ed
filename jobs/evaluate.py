"""Score a submission with the official iQIYI-VID-2019 mAP (`rayvid.core.metrics`).

    python jobs/evaluate.py --gt val_gt.txt --submission submission.txt [--per-id-csv ap.csv]
    python jobs/evaluate.py --config eval.yaml --set max_id=100   # keys: rayvid/infer/config.py

Prints `mAP 0.XXXX over N identities` and the 5 worst identities; exits 2 with a one-line
error on a malformed or missing file.
"""

import csv
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rayvid.console import setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.core import formats, metrics  # noqa: E402
from rayvid.infer.config import EvaluateJobConfig  # noqa: E402

logger = logging.getLogger("evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "YAML of EvaluateJobConfig keys (rayvid/infer/config.py)",
                        "max_id=100")
    S = cli.KEEP
    parser.add_argument("--gt", default=S, help="val_gt.txt-format file")
    parser.add_argument("--submission", default=S, help="submission file")
    parser.add_argument("--per-id-csv", default=S, help="write id,ap,n_relevant per gt identity here")
    parser.add_argument("--max-id", type=int, default=S, help=f"largest identity id ({formats.NUM_IDENTITIES})")
    args = parser.parse_args(argv)
    setup_console()
    if (cfg := cli.job_config("evaluate", EvaluateJobConfig, args)) is None:
        return 2
    try:
        gt = formats.read_gt(cfg.gt, cfg.max_id)
        submission = formats.read_submission(cfg.submission)
    except (OSError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if extra := len(submission.keys() - gt.keys()):
        logger.warning("%d submission ids are not in the gt: ignored", extra)
    result = metrics.score_identities(gt, submission)
    print(f"mAP {result.map:.4f} over {len(gt)} identities")
    for identity, ap in result.worst(5):
        print(f"  worst: id {identity}  AP {ap:.4f}  |G| {len(gt[identity])}")
    if cfg.per_id_csv:
        with open(cfg.per_id_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "ap", "n_relevant"])
            for identity, ap in sorted(result.per_id.items()):
                writer.writerow([identity, f"{ap:.6f}", len(gt[identity])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
