"""Load and fault benchmark of the Serve app (rayvid.infer.app) over HTTP on 127.0.0.1.

    python bench/serve_load.py --run runs/rayvid                  # starts the app itself
    python bench/serve_load.py --run runs/rayvid --replicas 1 --encoding b64
    python bench/serve_load.py --run runs/rayvid --replicas 2 --kill-replica
    python bench/serve_load.py --run runs/rayvid --url http://127.0.0.1:8000   # a running app

Clips come from RUN/dataset (test split, else val). Phases, each bounded by a request
count and a duration:
1. the limit: the same clips fused (`fusion.qff`) and scored (`Ensemble.scores`) in this
   process: one clip at a time (latency) and `--batch-clips` at a time (clips/s);
2. `/identify`: `--clients` closed-loop clients, one clip per request: clips/s, p50/p99;
3. `/identify/batch`: `--batch-clients` clients x `--batch-clips` clips per request;
4. with `--kill-replica`: `/identify` load while `ray.kill` ends one member replica:
   failed requests (non-200 or transport errors) and recovery time (kill -> Serve reports
   the member's replicas running again), plus the worst latency around the kill.
Bodies are encoded before timing (`--encoding json`: 512 numbers per face, the official
fields; `b64`: `feature_b64`, float16). Prints one JSON summary line at the end.
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from _common import REPO, ray_env

from rayvid.core import fusion
from rayvid.infer import predict
from rayvid.release import schema


def load_clips(run: Path, n: int) -> list[dict]:
    """Up to n clips with faces: flat arrays for in-process scoring. Reads Parquet batches
    until it has them (a release-sized split never enters memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("test", "val"):
        clips = []
        for path in sorted((run / "dataset" / split).glob("*.parquet")):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                table = pa.Table.from_batches([batch])
                table = table.filter(table["n_faces"].to_numpy() > 0)
                feat, det, quality, offsets = schema.face_arrays(table)
                clips += [{"feat": feat[a:b], "det": det[a:b], "quality": quality[a:b]}
                          for a, b in zip(offsets[:-1], offsets[1:])]
                if len(clips) >= n:
                    return clips[:n]
        if clips:
            return clips
    raise SystemExit(f"{run}/dataset has no test or val split to draw clips from")


def clip_body(clip: dict, encoding: str) -> dict:
    faces = []
    for f, d, q in zip(clip["feat"], clip["det"], clip["quality"]):
        face = {"det_score": float(d), "quality_score": float(q)}
        if encoding == "b64":
            face["feature_b64"] = base64.b64encode(f.astype("<f2").tobytes()).decode()
        else:
            face["feature"] = f.astype(float).tolist()
        faces.append(face)
    return {"faces": faces}


def in_process(run: Path, clips: list[dict], batch: int, seconds: float,
               batch_bodies: list[bytes]) -> dict:
    """The limit, in this process with one torch thread (as in a replica): qFF +
    `Ensemble.scores` of one clip (latency) and of `batch` clips (clips/s); and the whole
    work of one /identify/batch body without Serve: pydantic parse, `clip_parts`,
    `inputs.build` (qFF and any other kind the run's members take), scores, answers (clips/s
    incl. JSON decode)."""
    import torch

    from rayvid.model.ensemble import Ensemble
    from rayvid.core import inputs
    from rayvid.infer.api import BatchRequest, answers, clip_parts

    torch.set_num_threads(1)  # as in a replica (Ray sets OMP_NUM_THREADS=1): one core
    ens, weighting = Ensemble.from_run(run), predict.read_run(run).weighting
    spec = predict.read_run(run).ensemble.input_spec()

    def score(feat, det, quality, counts) -> np.ndarray:
        x, ok = fusion.qff(feat, det, quality, fusion.offsets_from_counts(counts), weighting)
        return ens.scores(x), ok

    def arrays(group: list[dict]):
        return (np.concatenate([c["feat"] for c in group]), np.concatenate([c["det"] for c in group]),
                np.concatenate([c["quality"] for c in group]), np.array([len(c["det"]) for c in group]))

    lat, t0 = [], time.perf_counter()
    for i in range(2000):
        t = time.perf_counter()
        score(*arrays([clips[i % len(clips)]]))
        lat.append(time.perf_counter() - t)
        if t - t0 > seconds:
            break
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        score(*arrays([clips[(n + j) % len(clips)] for j in range(batch)]))
        n += batch
    batched = n / (time.perf_counter() - t0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and batch_bodies:
        req = BatchRequest.model_validate_json(batch_bodies[n % len(batch_bodies)])
        parts = clip_parts(req.clips, spec.dims)
        built = inputs.build(parts, spec)
        counts = np.diff(parts.faces.offsets)
        json.dumps(answers(ens.scores(built), built["ok"], 5, 0.5, counts, [None] * len(counts)))
        n += 1
    with_json = n * batch / max(time.perf_counter() - t0, 1e-9)
    return {"single_clips_per_s": round(len(lat) / sum(lat), 1), **_percentiles(lat),
            "batch_clips_per_s": round(batched, 1),
            "batch_with_json_decode_clips_per_s": round(with_json, 1)}


def _percentiles(lat: list[float]) -> dict:
    if not lat:
        return {"p50_ms": None, "p99_ms": None}
    a = np.asarray(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


async def drive(url: str, path: str, bodies: list[bytes], clips_per_body: int, clients: int,
                requests: int, seconds: float, on_start=None, method: str = "POST") -> dict:
    """Closed-loop load: `clients` workers send bodies until `requests` or `seconds`.
    aiohttp (installed with Ray's dashboard), one keep-alive connection per client: a
    cheaper client than httpx, which matters when it shares the 2 cores with the server."""
    import aiohttp

    results: list[tuple[float, float, bool]] = []  # (end time, latency, ok)
    errors: dict[str, int] = {}
    count = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal count
            while count < requests and time.perf_counter() - t0 < seconds:
                body = bodies[count % len(bodies)]
                count += 1
                t = time.perf_counter()
                try:
                    req = client.get(path) if method == "GET" else client.post(
                        path, data=body, headers=headers)
                    async with req as r:
                        await r.read()
                        ok = r.status == 200
                    if not ok:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    ok = False
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                results.append((time.perf_counter() - t0, time.perf_counter() - t, ok))

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        hook = asyncio.create_task(on_start(t0)) if on_start else None
        await asyncio.gather(*tasks)
        extra = await hook if hook else None
        wall = time.perf_counter() - t0
    good = [lat for _, lat, ok in results if ok]
    out = {"requests": len(results), "failed": len(results) - len(good),
           "failed_pct": round(100 * (len(results) - len(good)) / max(len(results), 1), 3),
           "errors": errors, "clips_per_s": round(len(good) * clips_per_body / wall, 1),
           "requests_per_s": round(len(good) / wall, 1), "seconds": round(wall, 2),
           **_percentiles(good)}
    if extra is not None:
        out.update(extra(results))
    return out


def member_replicas(name: str) -> set[str]:
    """Actor names of the live replicas of deployment `name` of app rayvid."""
    import ray

    prefix = f"SERVE_REPLICA::rayvid#{name}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def kill_one(delay_s: float, member: str = "member-0"):
    """on_start hook: after `delay_s`, ray.kill one replica of `member`; then time its recovery."""
    import ray
    from ray import serve

    def recovered_count(victim: str, before: int) -> bool:
        now = member_replicas(member) - {victim}
        dep = serve.status().applications["rayvid"].deployments[member]
        return (len(now) >= before and dep.replica_states.get("RUNNING", 0) >= before
                and dep.status == "HEALTHY")

    async def hook(t0: float):  # blocking Ray calls run in threads: the clients keep going
        await asyncio.sleep(delay_s)
        before = await asyncio.to_thread(member_replicas, member)
        victim = sorted(before)[0]
        handle = await asyncio.to_thread(ray.get_actor, victim, namespace="serve")
        await asyncio.to_thread(ray.kill, handle, no_restart=True)
        t_kill = time.perf_counter() - t0
        recovered = None
        while time.perf_counter() - t0 < t_kill + 120:
            await asyncio.sleep(0.2)
            if await asyncio.to_thread(recovered_count, victim, len(before)):
                recovered = time.perf_counter() - t0 - t_kill
                break

        def summary(results):
            near = [lat for end, lat, _ in results if end - lat <= t_kill + (recovered or 60) and end >= t_kill]
            return {"killed": victim, "replicas_before": len(before), "kill_at_s": round(t_kill, 2),
                    "recovery_s": round(recovered, 2) if recovered is not None else None,
                    "worst_latency_near_kill_ms": round(1e3 * max(near), 1) if near else None}
        return summary
    return hook


def start_app(run: Path, replicas: int | None, num_cpus: int, per_deployment: int | None = None) -> str:
    """Deploy configs/serve.yaml for `run` on a free loopback port; returns the URL."""
    import ray
    import yaml

    from rayvid.infer.app import deploy_config, serve_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    app = base["applications"][0]
    if per_deployment is not None:
        app["args"]["members_per_deployment"] = per_deployment
    if replicas:  # fixed replica counts: per-replica numbers, no autoscaling mid-run
        for opts in [app["args"]["members"], *app.get("deployments", [])]:
            opts["autoscaling_config"] = {**opts.get("autoscaling_config", {}),
                                          "min_replicas": replicas, "max_replicas": replicas}
    ray_env()
    address = os.environ.get("RAY_ADDRESS") or None  # else a fresh local Ray of num_cpus
    ctx = ray.init(address=address or "local", num_cpus=None if address else num_cpus,
                   logging_level="ERROR", log_to_driver=False)
    deploy_config(serve_config(base, run, None, port=port), ctx.dashboard_url)
    return f"http://127.0.0.1:{port}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (clips from RUN/dataset)")
    p.add_argument("--url", help="a running app (default: start one from configs/serve.yaml)")
    p.add_argument("--replicas", type=int, help="fixed replicas per deployment (default: autoscaling)")
    p.add_argument("--clients", type=int, default=32, help="concurrent /identify clients")
    p.add_argument("--requests", type=int, default=3000, help="requests per phase at most")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per phase at most")
    p.add_argument("--batch-clips", type=int, default=64, help="clips per /identify/batch request")
    p.add_argument("--batch-clients", type=int, default=4, help="concurrent /identify/batch clients")
    p.add_argument("--encoding", choices=["json", "b64"], default="json", help="feature encoding")
    p.add_argument("--kill-replica", action="store_true", help="kill a member replica under load")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--members-per-deployment", type=int, default=None,
                   help="checkpoints per member deployment (default: configs/serve.yaml's, 0 = all in one)")
    p.add_argument("--no-in-process", action="store_true",
                   help="skip the in-process limit (and the ratios); needed for runs with "
                        "head/body/audio members, which the in-process phase does not feed")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run = Path(args.run).resolve()
    clips = load_clips(run, 512)
    faces = np.mean([len(c["det"]) for c in clips])
    singles = [json.dumps(clip_body(c, args.encoding)).encode() for c in clips]
    chunks = [clips[i:i + args.batch_clips] for i in range(0, len(clips), args.batch_clips)]
    batches = [json.dumps({"clips": [clip_body(c, args.encoding) for c in g]}).encode()
               for g in chunks if len(g) == args.batch_clips]
    limit = None if args.no_in_process else in_process(run, clips, args.batch_clips,
                                                       min(args.seconds, 10.0), batches)
    t_deploy = time.perf_counter()
    url = args.url or start_app(run, args.replicas, args.num_cpus, args.members_per_deployment)
    deploy_s = round(time.perf_counter() - t_deploy, 1)  # Ray up + every deployment ready
    summary = {"url": url, "encoding": args.encoding, "clips": len(clips), "faces_per_clip": round(float(faces), 2),
               "replicas": args.replicas or "autoscaling",
               "members_per_deployment": args.members_per_deployment, "load_avg_1m": os.getloadavg()[0],
               "deploy_s": None if args.url else deploy_s, "in_process": limit}
    asyncio.run(drive(url, "/identify", singles, 1, 8, 100, 20))  # warm-up
    # Serve's own floor on this machine: proxy + ingress, no body, no model.
    summary["healthz"] = asyncio.run(drive(url, "/healthz", [b""], 1, args.clients,
                                           args.requests, min(args.seconds, 10.0), method="GET"))
    summary["identify"] = asyncio.run(drive(url, "/identify", singles, 1, args.clients,
                                            args.requests, args.seconds))
    summary["identify_batch"] = asyncio.run(drive(url, "/identify/batch", batches, args.batch_clips,
                                                  args.batch_clients, args.requests, args.seconds))
    ident, batch = summary["identify"], summary["identify_batch"]
    summary["ratios"] = {} if limit is None else {  # served / in-process limit (latency: higher is worse)
        "identify_p50_vs_in_process": round(ident["p50_ms"] / limit["p50_ms"], 1),
        "identify_p99_vs_in_process": round(ident["p99_ms"] / limit["p99_ms"], 1),
        "identify_clips_per_s_vs_in_process_single": round(
            ident["clips_per_s"] / limit["single_clips_per_s"], 3),
        "batch_clips_per_s_vs_in_process": round(batch["clips_per_s"] / limit["batch_clips_per_s"], 3),
        "batch_clips_per_s_vs_in_process_with_json": round(
            batch["clips_per_s"] / max(limit["batch_with_json_decode_clips_per_s"], 1e-9), 3)}
    if args.kill_replica:
        summary["kill"] = asyncio.run(drive(url, "/identify", singles, 1, args.clients, 10 ** 9,
                                            max(args.seconds, 30.0), on_start=kill_one(5.0)))
    summary["load_avg_1m_end"] = os.getloadavg()[0]
    for phase in ("healthz", "identify", "identify_batch", "kill"):
        if phase in summary:
            s = summary[phase]
            print(f"{phase:15s} {s['clips_per_s']:8.1f} clips/s  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  "
                  f"failed {s['failed']}/{s['requests']}" + (f"  recovery {s['recovery_s']} s" if "recovery_s" in s else ""))
    if limit is not None:
        print(f"in-process      {limit['batch_clips_per_s']:8.1f} clips/s batched "
              f"({limit['batch_with_json_decode_clips_per_s']} with JSON decode); one clip p50 "
              f"{limit['p50_ms']} ms p99 {limit['p99_ms']} ms")
    print("ratios (served / in-process): " + ", ".join(f"{k} {v}" for k, v in summary["ratios"].items()))
    print(json.dumps(summary))
    if not args.url:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
