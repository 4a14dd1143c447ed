"""Write a simulated iQIYI-VID-2019 release (official layout, py2 pickles) with rayvid's simulator.

    python jobs/simulate.py --out data/sim --ids 300 --seed 0
    python jobs/simulate.py --smoke-test        # 20 ids, 5 faces per clip, a temp folder (~5 s)
    python jobs/simulate.py --out data/sim --set params.faces_sigma=0.8   # rayvid/release/config.py

The simulated test key and every generator parameter go to OUT/_simulator/ (test_gt.txt,
params.json); the generative model is docs/simulator.md.
"""

import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayvid.console import setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.config import smoke_overrides  # noqa: E402
from rayvid.release.config import SimulateJobConfig  # noqa: E402
from rayvid.release.simulator import simulate_release  # noqa: E402

FLAGS = {"out": "out", "ids": "ids", "seed": "seed", "faces_per_clip": "params.faces_per_clip",
         "noise_fraction": "params.noise_fraction"}  # flag -> config key

log = logging.getLogger("simulate")


def main() -> int:
    ap = cli.parser(__doc__, "YAML of SimulateJobConfig keys (rayvid/release/config.py)",
                    "params.faces_sigma=0.8")
    S = cli.KEEP
    ap.add_argument("--out", default=S, help="output folder (created)")
    ap.add_argument("--ids", type=int, default=S, help="known identities (real release: 10034)")
    ap.add_argument("--seed", type=int, default=S)
    ap.add_argument("--faces-per-clip", type=float, default=S, help="mean faces per clip")
    ap.add_argument("--noise-fraction", type=float, default=S,
                    help="share of noise clips in val and test")
    ap.add_argument("--smoke-test", action="store_true",
                    help="20 ids, 5 faces per clip (configs/smoke.yaml `simulate`)")
    args = ap.parse_args()
    setup_console()
    flags = {FLAGS[k]: v for k, v in vars(args).items() if k in FLAGS}
    if args.smoke_test:
        flags.setdefault("out", tempfile.mkdtemp(prefix="rayvid-sim-smoke-"))
    cfg = cli.job_config("simulate", SimulateJobConfig, args, flags=flags,
                         overrides=smoke_overrides("simulate") if args.smoke_test else [])
    if cfg is None:
        return 2
    p = cfg.params
    log.info("simulating %d ids, seed %d, %.1f faces/clip, noise %.2f -> %s", cfg.ids, cfg.seed,
             p.faces_per_clip, p.noise_fraction, cfg.out)
    summary = simulate_release(cfg.out, ids=cfg.ids, seed=cfg.seed, **p.as_dict())
    log.info("done: %d clips, %d faces, %.1f MB in %.1f s", summary["clips"], summary["faces"],
             summary["bytes"] / 1e6, summary["seconds"])
    print(json.dumps(summary, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
