"""Serve a run folder over HTTP on 127.0.0.1 until interrupted (`rayvid.infer.app`).

    python jobs/serve.py                                   # runs/rayvid (jobs/train.py's default)
    python jobs/serve.py --run runs/exp1 --index index/ --port 8000
    python jobs/serve.py --run runs/rayvid-smoke --smoke-test   # serve, ask once, stop
    python jobs/serve.py --set run=runs/exp1 --set port=8001    # keys: rayvid/infer/config.py

Deploys configs/serve.yaml (or --config) with the run, index and port set, as
`serve deploy` does, and writes the resolved config to RUN/serve_config.yaml: edit its
`user_config` (threshold, weights, top_k) and `serve deploy` it to reconfigure the
running replicas without a restart. Before serving, calibrates the unknown threshold
into RUN/serving.json when the run has none and its dataset has a val split with noise
clips. Starts a local Ray of --num-cpus logical CPUs (or attaches to RAY_ADDRESS),
prints the URL and a curl example, blocks until Ctrl-C / SIGTERM, then shuts Serve
down. Exits 2 with a one-line error for a bad run, index or config.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from rayvid.console import ray_init_options, setup_console  # noqa: E402
from rayvid.config import ConfigError, load_config  # noqa: E402
from rayvid.infer import person_index as index, predict  # noqa: E402
from rayvid.model.run_folder import RunFolderError  # noqa: E402
from rayvid.core.atomic import write_text  # noqa: E402
from rayvid.infer.config import ServeJobConfig  # noqa: E402

FLAGS = {"run": "run", "index": "index", "port": "port", "config": "serve_config",
         "num_cpus": "num_cpus"}  # flag -> ServeJobConfig key


def example_clip(run: Path) -> dict:
    """An /identify body: the first clip of the run's dataset (val, else test) whose faces
    qFF can use, preferring a labelled known identity (the official fields only)."""
    import numpy as np
    import pyarrow.parquet as pq

    from rayvid.core import fusion
    from rayvid.release import schema

    weighting = predict.read_run(run).weighting
    for split in ("val", "test"):
        for part in sorted((run / "dataset" / split).glob("*.parquet")):
            table = pq.read_table(part)
            table = table.filter(table["n_faces"].to_numpy() > 0)
            feat, det, quality, offsets = schema.face_arrays(table)
            _, ok = fusion.qff(feat, det, quality, offsets, weighting)
            known = ok & (table["label"].to_numpy(zero_copy_only=False) > 0
                          if "label" in table.column_names else ok)
            for i in np.flatnonzero(known if known.any() else ok)[:1]:
                a, b = offsets[i], offsets[i + 1]
                return {"clip": table["clip"][int(i)].as_py(), "faces": [
                    {"det_score": float(d), "quality_score": float(q),
                     "feature": f.astype(float).tolist()}
                    for f, d, q in zip(feat[a:b], det[a:b], quality[a:b])]}
    return {"faces": [{"det_score": 0.99, "quality_score": 45.2, "feature": [0.01] * 512}]}


def example_faceless_clip(run: Path) -> dict | None:
    """An /identify body without faces: the first labelled val (else test) clip of the run's
    dataset that has no face but heads, with its heads, bodies and audio. None when the
    run has no multimodal member (nothing could answer it) or no such clip exists."""
    import numpy as np
    import pyarrow.parquet as pq

    from rayvid.release import schema

    spec = predict.read_run(run).ensemble.input_spec()
    if "multimodal" not in spec.kinds:
        return None
    hd, bd, ad = spec.dims
    for split in ("val", "test"):
        for part in sorted((run / "dataset" / split).glob("*.parquet")):
            table = pq.read_table(part)
            keep = (table["n_faces"].to_numpy() == 0) & (table["n_heads"].to_numpy() > 0)
            if "label" in table.column_names:
                keep &= table["label"].fill_null(-1).to_numpy() > 0
            if not keep.any():
                continue
            clip = table.filter(keep).slice(0, 1)
            heads, bodies = schema.head_arrays(clip, hd), schema.body_arrays(clip, bd)
            audio, present = schema.audio_arrays(clip, ad)
            body = {"clip": clip["clip"][0].as_py(),
                    "heads": [{"det_score": float(d), "feature": f.astype(float).tolist()}
                              for f, d in zip(heads.feat, heads.det)],
                    "bodies": [{"feature": f.astype(float).tolist()} for f in bodies.feat]}
            if present[0]:
                body["audio"] = {"feature": np.asarray(audio[0], float).tolist()}
            return body
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    S = argparse.SUPPRESS  # flags left out keep the config's value
    p.add_argument("--run", default=S, help="run folder of jobs/train.py (runs/rayvid)")
    p.add_argument("--index", default=S, help="person-search index of jobs/index.py (for /search)")
    p.add_argument("--port", type=int, default=S, help="HTTP port on 127.0.0.1 (8000)")
    p.add_argument("--config", default=S, help="Serve config file (configs/serve.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ServeJobConfig key (rayvid/infer/config.py), e.g. "
                        "--set num_cpus=8 (repeatable)")
    p.add_argument("--num-cpus", type=int, default=S, help="logical CPUs of a local Ray (4)")
    p.add_argument("--smoke-test", action="store_true", help="serve, send one clip, stop")
    args = p.parse_args()
    setup_console()
    import yaml

    try:
        cfg = load_config(ServeJobConfig, None, args.set,
                          flags={FLAGS[k]: v for k, v in vars(args).items() if k in FLAGS})
    except ConfigError as e:
        print(f"serve: config error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.run).resolve()
    try:
        predict.read_run(run)
        serving = index.read_serving(run)  # checked before Ray starts
        if cfg.index:
            index.read_manifest(cfg.index)
        base = yaml.safe_load(Path(cfg.serve_config).read_text())
    except (predict.PredictError, index.SearchIndexError, RunFolderError, OSError,
            yaml.YAMLError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from rayvid.infer.app import deploy_config, serve_config

    # Serve's replicas and its app builder import rayvid from this checkout too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    address = os.environ.get("RAY_ADDRESS") or None  # else a fresh local Ray
    ctx = ray.init(address=address or "local", num_cpus=None if address else cfg.num_cpus,
                   **ray_init_options())
    if serving is None and (run / "dataset" / "val").is_dir():
        cal = index.calibrate(run)
        print(f"calibrated: {json.dumps(cal)}" if cal else "not calibrated: default threshold")
    config = serve_config(base, run, cfg.index, port=cfg.port)
    resolved = run / "serve_config.yaml"
    write_text(resolved, yaml.safe_dump(config, sort_keys=False))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops Serve cleanly too
    try:
        deploy_config(config, ctx.dashboard_url)
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        # The serve CLI needs this to send the cluster's token (Ray 2.60 token auth).
        auth = "" if os.environ.get("RAY_AUTH_MODE") == "disabled" else "RAY_AUTH_MODE=token "
        body = run / "example_clip.json"
        write_text(body, json.dumps(example_clip(run)))
        faceless = example_faceless_clip(run)
        more = ""
        if faceless is not None:  # a clip only the multimodal members can answer
            write_text(run / "example_faceless_clip.json", json.dumps(faceless))
            more = (f"  curl -s -X POST {url}/identify -H 'content-type: application/json' "
                    f"-d @{run / 'example_faceless_clip.json'}   # no face: head, body, audio\n")
        print(f"serving {run} at {url}  (API docs: {url}/docs)\n"
              f"  curl -s -X POST {url}/identify -H 'content-type: application/json' -d @{body}\n"
              f"{more}"
              f"  curl -s '{url}/search?id=1&k=10'\n"
              f"change user_config in {resolved}, then: {auth}"
              f"serve deploy {resolved} -a http://{ctx.dashboard_url}", flush=True)
        if args.smoke_test:
            import httpx

            answer = httpx.post(f"{url}/identify", content=body.read_bytes(),
                                headers={"content-type": "application/json"}, timeout=60)
            print(f"POST /identify -> {answer.status_code} {answer.text}")
            return 0 if answer.status_code == 200 else 1
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    except RuntimeError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
