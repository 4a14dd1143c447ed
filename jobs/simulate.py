"""Write a simulated iQIYI-VID-2019 release (official layout, py2 pickles) with rayvid's simulator.

    python jobs/simulate.py --out data/sim --ids 300 --seed 0
    python jobs/simulate.py --smoke-test        # 20 ids, 5 faces per clip, a temp folder (~5 s)

The simulated test key and every generator parameter go to OUT/_simulator/ (test_gt.txt,
params.json); the generative model is docs/simulator.md.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayvid.console import setup_console  # noqa: E402
from rayvid.release.simulator import SimParams, simulate_release  # noqa: E402

log = logging.getLogger("simulate")


def main() -> None:
    d = SimParams()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder (created)")
    ap.add_argument("--ids", type=int, default=10034, help="known identities (real release: 10034)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faces-per-clip", type=float, default=d.faces_per_clip,
                    help="mean faces per clip")
    ap.add_argument("--noise-fraction", type=float, default=d.noise_fraction,
                    help="share of noise clips in val and test")
    ap.add_argument("--smoke-test", action="store_true", help="20 ids, 5 faces per clip")
    args = ap.parse_args()
    if args.smoke_test:
        args.ids, args.faces_per_clip = 20, 5.0
        args.out = args.out or tempfile.mkdtemp(prefix="rayvid-sim-smoke-")
    elif not args.out:
        ap.error("--out is required (or --smoke-test)")
    setup_console()
    log.info("simulating %d ids, seed %d, %.1f faces/clip, noise %.2f -> %s", args.ids, args.seed,
             args.faces_per_clip, args.noise_fraction, args.out)
    summary = simulate_release(args.out, ids=args.ids, seed=args.seed,
                               faces_per_clip=args.faces_per_clip,
                               noise_fraction=args.noise_fraction)
    log.info("done: %d clips, %d faces, %.1f MB in %.1f s", summary["clips"], summary["faces"],
             summary["bytes"] / 1e6, summary["seconds"])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
