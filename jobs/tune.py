"""rayvid's sweep: Ray Tune trials that each train one fold, ASHA, fold mAP per epoch.

    python jobs/tune.py --smoke-test                        # tiny sweep, a few minutes
    python jobs/tune.py --config configs/tune.yaml --out runs/sweep1 --compare-defaults
    python jobs/tune.py --set base.data.dataset=/data/iqiyi --set search.gpus_per_trial=0.25
    python jobs/train.py --config runs/sweep1/best.yaml     # train the winner on all folds

Without RAY_ADDRESS it joins the machine's Ray cluster if one runs (`ray.init()`); with
RAY_ADDRESS=local, and for --smoke-test, it starts a fresh local Ray of its own.
Rerunning the same command resumes an interrupted sweep. Writes OUT/results.parquet,
OUT/map_vs_params.png, OUT/best.yaml and OUT/best.json. Exits 2 on a bad config.
"""

import argparse
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayvid.console import ray_init_options, setup_console  # noqa: E402
from rayvid.config import ConfigError, to_dict  # noqa: E402
from rayvid.tune.config import load_tune_config, smoke_tune_overrides  # noqa: E402


def _local_ray(ray) -> None:
    """A fresh local Ray for the smoke sweep: more logical CPUs than a small machine's cores
    (trials, their Train workers and Ray Data never wait on each other, as in
    tests/conftest.py), workers that import rayvid from this checkout whatever the current
    folder, and its dashboard address exported to every Ray process so that Train's
    placement-group cleaner finds this instance when others run on the machine."""
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ctx = ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), dashboard_port=port,
                       include_dashboard=True, **ray_init_options(),
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                           filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}})
        if ctx.dashboard_url and ctx.dashboard_url.endswith(f":{port}"):
            return
        ray.shutdown()  # the port was taken meanwhile: try another
    raise RuntimeError("could not start a local Ray with its dashboard")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML sweep config (see configs/tune.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set base.optim.passes=50 or "
                        "--set 'space.optim.lr={loguniform: [1e-4, 1e-3]}' (repeatable)")
    p.add_argument("--out", help="sweep folder (default: runs/<name>)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny simulated sweep, a few minutes (configs/smoke.yaml `train` + `tune`)")
    p.add_argument("--compare-defaults", action="store_true",
                   help="add one trial at the 4th place's code defaults")
    args = p.parse_args()
    setup_console()
    extra = (["search.compare_defaults=true"] if args.compare_defaults else [])
    try:
        smoke = smoke_tune_overrides() if args.smoke_test else []
        cfg = load_tune_config(args.config, smoke + extra + args.set)
    except ConfigError as e:
        print(f"tune: config error: {e}", file=sys.stderr)
        return 2
    import yaml
    print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    out = Path(args.out or Path("runs") / (cfg.name + ("-smoke" if args.smoke_test else "")))

    import ray
    from rayvid.tune.sweep import run_sweep
    from rayvid.tune.report import summary_lines

    address = os.environ.get("RAY_ADDRESS")
    if address == "local" or (args.smoke_test and address is None):
        _local_ray(ray)
    else:
        ray.init(address=address, **ray_init_options())
    try:
        summary = run_sweep(cfg, out)
    except ConfigError as e:
        print(f"tune: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(["", "== rayvid sweep summary =="] + summary_lines(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
