"""Benchmark: every stage at the release's size (10,034 identities) beside a 1,000-identity run.

    python bench/bench_scale.py --work /work/data/scale                  # 1000 and 10034 ids
    python bench/bench_scale.py --work DIR --ids 60 --max-steps 20       # a quick look (~5 min)
    python bench/bench_scale.py --work DIR --ids 10034 --stages predict,index,serve   # redo some

Per size N it runs the jobs a user runs, each as a fresh process, on this machine's local Ray:
`jobs/simulate.py` (the official layout, default faces per clip), `jobs/prepare.py`, one fold
of `jobs/train.py` (the default recipe, `folds.run=[0]`, passes cut to `--max-steps`; it
also predicts val and scores the no-training baseline, as the job does), `jobs/predict.py`
on test (scored against the simulator's key), `jobs/index.py` on test, and
`bench/serve_load.py` (the endpoint with the 10,035-class ensemble, fixed one replica per
deployment, /identify and /identify/batch over HTTP). Everything lives under WORK/N/ and a
stage whose output is complete is not rerun unless named in `--stages`.

Memory: a thread reads /proc every `--poll-s` for the stage's process tree (the job, its
Ray daemons and workers, prepare's processes): per process the kernel's peak RSS (VmHWM).
"driver" is the job's own process; "largest worker" the largest of its other processes
that are not Ray's daemons (gcs_server, raylet, dashboard, agents), named by its Ray task
or actor. VmHWM counts object-store pages a worker mapped; the sampled private peak
(RssAnon) is kept beside it in the JSON. Ends with a table per size, then the growth
N_large / N_small of wall time and peak RSS per stage: the target is peak RSS <= 1.5x for
prepare, train and predict (memory bounded by batch, not by release). Results:
WORK/scale.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import REPO, MiB

STAGES = ("simulate", "prepare", "train", "predict", "index", "serve")
BOUNDED = ("prepare", "train", "predict")  # the 1.5x target
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "agent",
               "runtime_env", "ray_client_server", "default_worker.py --worker-type=SPILL")


# ------------------------------------------------------------------ process tree memory


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon of a process in KiB ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


class TreeWatch(threading.Thread):
    """Peak memory of a process and all its descendants, polled from /proc."""

    def __init__(self, root: int, poll_s: float):
        super().__init__(daemon=True)
        self.root, self.poll_s = root, poll_s
        self.procs: dict[int, dict] = {}  # pid -> {name, hwm, anon} (KiB)
        self.tree_peak = 0  # largest sum of VmRSS over the tree at one poll (KiB)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.poll_s)

    def poll(self) -> None:
        kids, todo, total = _children(), [self.root], 0
        while todo:
            pid = todo.pop()
            todo.extend(kids.get(pid, []))
            s = _status(pid)
            if not s:
                continue
            p = self.procs.setdefault(pid, {"name": "?", "hwm": 0, "anon": 0, "names": []})
            name = _short(_name(pid))  # Ray renames a worker to its task or actor
            if name not in ("?", "ray::IDLE") and name not in p["names"]:
                p["names"].append(name)
            p["name"] = p["names"][-1] if p["names"] else name
            p["hwm"] = max(p["hwm"], s.get("VmHWM", 0))
            p["anon"] = max(p["anon"], s.get("RssAnon", 0))
            total += s.get("VmRSS", 0)
        self.tree_peak = max(self.tree_peak, total)

    def summary(self) -> dict:
        driver = self.procs.get(self.root, {"hwm": 0, "anon": 0, "name": "?"})
        workers = [p for pid, p in self.procs.items() if pid != self.root
                   and not any(d in p["name"] for d in RAY_DAEMONS)]
        top = max(workers, key=lambda p: p["hwm"], default={"hwm": 0, "anon": 0, "name": "-"})
        mib = 1024 / MiB
        return {"driver_mib": round(driver["hwm"] * mib), "driver_anon_mib": round(driver["anon"] * mib),
                "worker_mib": round(top["hwm"] * mib),
                "worker_anon_mib": round(max((p["anon"] for p in workers), default=0) * mib),
                "worker": top["name"], "worker_roles": top.get("names", [])[:6],
                "largest_private": [  # the processes with the most private memory (RssAnon)
                    {"name": p["name"], "anon_mib": round(p["anon"] * mib),
                     "hwm_mib": round(p["hwm"] * mib)}
                    for p in sorted(workers, key=lambda p: -p["anon"])[:4]],
                "processes": len(self.procs),
                "tree_rss_peak_mib": round(self.tree_peak * mib)}


def _short(name: str) -> str:
    """A worker's Ray name (`ray::ReadParquet->MapBatches(...)`), else its script."""
    m = re.match(r"(ray::\S+)", name)
    if m:
        return m.group(1).split(".")[0][:60]  # an actor's class, not the method it runs
    if "from multiprocessing" in name:
        return "multiprocessing worker"
    parts = [p for p in name.split() if p.endswith(".py")]
    return Path(parts[0]).name if parts else name[:40]


def run_stage(cmd: list[str], log_path: Path, poll_s: float, env: dict | None = None) -> dict:
    """Run one job in a fresh process, watching its tree; exits naming the log on failure."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, **(env or {})})
        watch = TreeWatch(child.pid, poll_s)
        watch.start()
        code = child.wait()
        watch.done.set()
        watch.join()
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"{' '.join(cmd[1:3])} failed ({code}); see {log_path}:\n"
                 + "\n".join(log_path.read_text().splitlines()[-30:]))
    return {"wall_s": round(wall, 1), **watch.summary()}


def last_json(log_path: Path) -> dict:
    """The last top-level JSON object a job printed (its summary line or block)."""
    text = log_path.read_text()
    for start in [m.start() for m in re.finditer(r"(?m)^\{", text)][::-1]:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    return {}


# ------------------------------------------------------------------ the stages


def stages_for(n: int, work: Path, args) -> dict:
    """{stage: (command, env, done?, units(log) -> (count, unit, extras))} for N identities."""
    py = sys.executable
    rel, run = work / "release", work / "run"
    ds = run / "dataset"
    key = rel / "_simulator" / "test_gt.txt"
    one_thread = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def sim_units(log):
        s = last_json(log)
        return s["faces"], "faces", {"clips": s["clips"], "release_mib": round(s["bytes"] / MiB)}

    def prep_units(log):
        meta = json.loads((ds / "_rayvid_dataset.json").read_text())
        splits = meta["splits"].values()
        return (sum(s["faces"] for s in splits), "faces",
                {"clips": sum(s["clips"] for s in splits), "num_classes": meta["num_classes"]})

    def train_units(log):
        s = json.loads((run / "summary.json").read_text())
        fold = s["folds"][0]
        last = fold["history"][-1]
        steps, batch = last["step"], s["config"]["optim"]["batch_size"]
        return (steps * batch, "samples",
                {"fold_s": fold["seconds"], "samples_per_s_fit": last.get("samples_per_s"),
                 "fold_map": fold["best_map"], "val_map": s["eval"]["map"],
                 "baseline_map": s["baseline_map"], "eval_clips": s["eval"]["clips"]})

    def predict_units(log):
        s = last_json(log)
        return s["clips"], "clips", {"test_map": s.get("map"), "actor_clips_per_s": s["clips_per_s"]}

    def index_units(log):
        s = last_json(log)
        return s["sources"][-1]["clips"], "clips", {"rows": s["rows"]}

    def serve_units(log):
        s = last_json(log)
        batch = s["identify_batch"]  # throughput: /identify/batch over HTTP, not the stage's wall
        return (batch["requests"] * args.batch_clips, "clips",
                {"per_s": batch["clips_per_s"], "deploy_s": s.get("deploy_s"),
                 "identify_clips_per_s": s["identify"]["clips_per_s"],
                 "identify_p50_ms": s["identify"]["p50_ms"],
                 "failed": s["identify"]["failed"] + batch["failed"]})

    train_sets = ["data.dataset=" + str(ds), "folds.run=[0]", f"optim.max_steps={args.max_steps}",
                  "train.epochs=2", "train.log_every_s=60"]
    return {
        "simulate": ([py, "jobs/simulate.py", "--out", str(rel), "--ids", str(n), "--seed", "0"],
                     one_thread, (rel / "val_gt.txt").exists(), sim_units),
        "prepare": ([py, "jobs/prepare.py", "--release", str(rel), "--out", str(ds), "--force"],
                    None, (ds / "_rayvid_dataset.json").exists(), prep_units),
        "train": ([py, "jobs/train.py", "--out", str(run)] + sum([["--set", s] for s in train_sets], []),
                  None, (run / "summary.json").exists(), train_units),
        "predict": ([py, "jobs/predict.py", "--run", str(run), "--dataset", str(ds), "--split", "test",
                     "--out", str(work / "submission_test.txt"), "--gt", str(key)],
                    None, (work / "submission_test.txt").exists(), predict_units),
        "index": ([py, "jobs/index.py", "--run", str(run), "--dataset", str(ds), "--split", "test",
                   "--out", str(work / "index")],
                  None, (work / "index").is_dir(), index_units),
        "serve": ([py, "bench/serve_load.py", "--run", str(run), "--replicas", "1", "--num-cpus", "2",
                   "--clients", "8", "--requests", str(args.requests), "--seconds", "10",
                   "--batch-clips", str(args.batch_clips), "--no-in-process"],
                  None, False, serve_units),
    }


def run_size(n: int, work: Path, args, results: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    rows = results.setdefault(str(n), {})
    for stage, (cmd, env, done, units) in stages_for(n, work, args).items():
        log = work / f"{stage}.log"
        if stage not in args.stages:
            continue
        if done and stage not in args.force:
            print(f"[{n}] {stage}: output kept from an earlier run (--force {stage} redoes it)",
                  flush=True)
            continue
        print(f"[{n}] {stage}: {' '.join(Path(c).name if '/' in c else c for c in cmd[1:])}",
              flush=True)
        row = run_stage(cmd, log, args.poll_s, env)
        count, unit, extra = units(log)
        row.update({"count": count, "unit": unit,
                    "per_s": round(count / row["wall_s"], 1) if count else None, **extra,
                    "load_avg_1m": round(os.getloadavg()[0], 1)})
        rows[stage] = row
        print(f"[{n}] {stage}: {row['wall_s']:.0f} s, {row['per_s']} {unit}/s, driver "
              f"{row['driver_mib']} MiB, largest worker {row['worker_mib']} MiB ({row['worker']})",
              flush=True)
        save(args.work, results)


def save(work: Path, results: dict) -> None:
    tmp = work / "scale.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(work / "scale.json")


def table(results: dict) -> None:
    sizes = sorted(results, key=int)
    head = f"{'ids':>6} {'stage':9} {'wall s':>8} {'throughput':>22} {'driver MiB':>10} {'worker MiB':>10}  worker"
    print(head)
    for n in sizes:
        for stage in STAGES:
            r = results[n].get(stage)
            if r:
                tp = f"{r['per_s']} {r['unit']}/s" if r["per_s"] else "-"
                print(f"{n:>6} {stage:9} {r['wall_s']:>8.0f} {tp:>22} {r['driver_mib']:>10} "
                      f"{r['worker_mib']:>10}  {r['worker']}")
    if len(sizes) < 2:
        return
    small, large = results[sizes[0]], results[sizes[-1]]
    print(f"growth {sizes[-1]} / {sizes[0]} ids (peak: the larger of driver and worker; VmHWM "
          f"counts the object-store pages a worker mapped, private = RssAnon):")
    ok = True
    for stage in STAGES:
        a, b = small.get(stage), large.get(stage)
        if not (a and b):
            continue
        peak = max(b["driver_mib"], b["worker_mib"]) / max(a["driver_mib"], a["worker_mib"], 1)
        priv = None
        if a.get("driver_anon_mib") and b.get("driver_anon_mib"):
            priv = (max(b["driver_anon_mib"], b["worker_anon_mib"])
                    / max(a["driver_anon_mib"], a["worker_anon_mib"], 1))
        flag = ""
        if stage in BOUNDED and priv is not None:
            flag = " (target <= 1.5: " + ("met" if priv <= 1.5 else "NOT met") + ")"
            ok &= priv <= 1.5
        print(f"  {stage:9} wall {b['wall_s'] / a['wall_s']:6.2f}x  driver "
              f"{b['driver_mib'] / max(a['driver_mib'], 1):5.2f}x  worker "
              f"{b['worker_mib'] / max(a['worker_mib'], 1):5.2f}x  peak VmHWM {peak:5.2f}x  "
              f"private " + (f"{priv:5.2f}x" if priv is not None else "  -  ") + flag)
    print("peak private memory bounded (prepare, train, predict): " + ("yes" if ok else "NO"))


def markdown(results: dict) -> None:
    """The table of docs/benchmarks.md: one row per stage, the sizes side by side."""
    sizes = sorted(results, key=int)
    cols = " | ".join(f"{n} ids: wall s / throughput / driver, largest worker MiB (private)"
                      for n in sizes)
    print(f"| stage | {cols} | growth: wall, peak private |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for stage in STAGES:
        cells = []
        for n in sizes:
            r = results[n].get(stage)
            if not r:
                cells.append("-")
                continue
            tp = f"{r['per_s']:,.0f} {r['unit']}/s" if r.get("per_s") else "-"
            anon = (f"{r['driver_anon_mib']}, {r['worker_anon_mib']}"
                    if r.get("driver_anon_mib") is not None else "-")
            cells.append(f"{r['wall_s']:,.0f} / {tp} / {r['driver_mib']}, {r['worker_mib']} ({anon})")
        growth = "-"
        a, b = results[sizes[0]].get(stage), results[sizes[-1]].get(stage)
        if a and b and len(sizes) > 1 and a.get("driver_anon_mib") and b.get("driver_anon_mib"):
            peak = (max(b["driver_anon_mib"], b["worker_anon_mib"])
                    / max(a["driver_anon_mib"], a["worker_anon_mib"]))
            growth = f"{b['wall_s'] / a['wall_s']:.1f}x, {peak:.2f}x"
        print(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder kept between runs (WORK/N/...)")
    ap.add_argument("--ids", default="1000,10034", help="sizes, comma-separated")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to run (others are skipped)")
    ap.add_argument("--force", default="", help="stages to rerun even when their output exists")
    ap.add_argument("--max-steps", type=int, default=300, help="training steps of the fold")
    ap.add_argument("--requests", type=int, default=300, help="requests per serve phase at most")
    ap.add_argument("--batch-clips", type=int, default=64, help="clips per /identify/batch request")
    ap.add_argument("--poll-s", type=float, default=0.5, help="memory poll interval")
    ap.add_argument("--table", action="store_true", help="print the table of WORK/scale.json and exit")
    ap.add_argument("--markdown", action="store_true", help="also print it as a Markdown table")
    args = ap.parse_args()
    args.work = Path(args.work).resolve()
    args.stages = set(args.stages.split(","))
    args.force = set(filter(None, args.force.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not args.table:
        for n in [int(x) for x in args.ids.split(",")]:
            run_size(n, args.work / str(n), args, results)
    table(results)
    if args.markdown:
        markdown(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
