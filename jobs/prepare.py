"""Convert an iQIYI-VID-2019 release (official or simulated) into rayvid's Parquet dataset.

    python jobs/prepare.py --release data/iqiyi --out data/iqiyi-ds [--on-bad-clip skip] [--force]
                           [--workers N]
    python jobs/prepare.py --smoke-test          # simulate a tiny release and convert it (~30 s)
    python jobs/prepare.py --config prep.yaml --set workers=2   # keys: rayvid/release/config.py

Bounded memory per process (an external hash join, see rayvid/release/prepare.py); `--workers N`
processes read pickles and write buckets side by side (default: one per CPU, at most 4;
1: everything in this process). Prints one line per pickle (items, items/s) and per split,
and a summary with the peak RSS of this process and of its workers. Bad input exits 2 with
a one-line error.
"""

import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from rayvid.console import setup_console  # noqa: E402
import _cli as cli  # noqa: E402
from rayvid.config import ConfigError, load_config, smoke_overrides  # noqa: E402
from rayvid.release.config import PrepareJobConfig, SimulateJobConfig  # noqa: E402
from rayvid.release.prepare import (DatasetExistsError, children_peak_rss_bytes,  # noqa: E402
                            peak_rss_bytes, prepare_release)
from rayvid.release.schema import DatasetFormatError  # noqa: E402
from rayvid.core.formats import GroundTruthError  # noqa: E402
from rayvid.release.pickle_reader import ReleaseFormatError  # noqa: E402

log = logging.getLogger("prepare")
MiB = 1 << 20


def show(event: dict) -> None:
    """Progress callback: one line per pickle read, one per split written."""
    rss = f"peak RSS {event['peak_rss_bytes'] / MiB:.0f} MiB"
    if event["event"] == "file":
        rate = event["items"] / max(event["seconds"], 1e-9)
        log.info("%-22s %7d items %6.1f s %7.0f items/s  %s%s", Path(event["file"]).name,
                 event["items"], event["seconds"], rate, rss, "" if event["done"] else " ...")
    else:
        log.info("%-22s %7d clips %6.1f s  %d faces, %d buckets  %s", f"wrote {event['split']}/",
                 event["clips"], event["seconds"], event["faces"], event["buckets"], rss)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "YAML of PrepareJobConfig keys (rayvid/release/config.py)", "workers=2")
    S = cli.KEEP
    ap.add_argument("--release", default=S, help="release folder (face_train_v2.pickle, train_gt.txt, ...)")
    ap.add_argument("--out", default=S, help="dataset folder to write")
    ap.add_argument("--on-bad-clip", choices=("fail", "skip"), default=S)
    ap.add_argument("--force", action="store_true", default=S, help="rebuild an existing dataset")
    ap.add_argument("--bucket-mib", type=int, default=S, help="target spill bucket size (64)")
    ap.add_argument("--workers", type=int, default=S,
                    help="processes reading and writing side by side (default: CPUs, at most "
                    "4; 1: all in this process)")
    ap.add_argument("--smoke-test", action="store_true",
                    help="simulate a tiny release and convert it (configs/smoke.yaml `prepare`)")
    args = ap.parse_args(argv)
    setup_console()
    flags = {k: v for k, v in vars(args).items() if k in PrepareJobConfig.model_fields}
    try:
        if args.smoke_test:
            from rayvid.release.simulator import simulate_release

            tmp = tempfile.mkdtemp(prefix="rayvid-prepare-smoke-")
            sim = load_config(SimulateJobConfig, None, smoke_overrides("prepare"),
                              flags={"out": f"{tmp}/release"})
            simulate_release(sim.out, ids=sim.ids, seed=sim.seed, **sim.params.as_dict())
            flags = {**flags, "release": sim.out, "out": flags.get("out", f"{tmp}/dataset")}
    except ConfigError as e:
        print(f"prepare: config error: {e}", file=sys.stderr)
        return 2
    if (cfg := cli.job_config("prepare", PrepareJobConfig, args, flags=flags)) is None:
        return 2
    try:
        meta = prepare_release(cfg.release, cfg.out, on_bad_clip=cfg.on_bad_clip,
                               force=cfg.force, bucket_bytes=cfg.bucket_mib * MiB, progress=show,
                               workers=cfg.workers)
    except (ReleaseFormatError, GroundTruthError, DatasetExistsError, DatasetFormatError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    if meta.get("already_prepared"):
        print(f"{cfg.out} is already prepared (from {meta['source']}); nothing to do, "
              "--force rebuilds it")
        return 0
    clips = sum(s["clips"] for s in meta["splits"].values())
    faces = sum(s["faces"] for s in meta["splits"].values())
    secs = max(meta["seconds"], 1e-9)
    print(f"prepared {cfg.out}: " + ", ".join(f"{k} {s['clips']} clips / {s['faces']} faces"
                                                for k, s in meta["splits"].items()))
    print(f"{clips / secs:.0f} clips/s, {faces / secs:.0f} faces/s in {secs:.1f} s with "
          f"{meta['workers']} worker(s); skipped {meta['skipped']['count']} bad clips")
    print(f"peak RSS {peak_rss_bytes() / MiB:.0f} MiB this process, "
          f"{children_peak_rss_bytes() / MiB:.0f} MiB largest worker (getrusage RUSAGE_SELF / "
          f"RUSAGE_CHILDREN); RSS now {psutil.Process().memory_info().rss / MiB:.0f} MiB (psutil)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
