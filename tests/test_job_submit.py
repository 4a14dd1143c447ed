"""Job submission against a real local Ray head, the way a cluster user submits.

Starts `ray start --head --block` on explicit, non-default ports with its own short
`--temp-dir` (inside `unshare -p -f --mount-proc --kill-child` where that works), submits
jobs with the `ray job submit` CLI and stops only the processes it started: the `ray start`
process and its descendants, by pid. It never calls `ray stop`, which would kill every Ray
on the machine (`../shared/docs/ray-notes.md`).

    pytest -m "ray and slow" tests/test_job_submit.py
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The venv's bin, not resolved: its `python` and `ray` are the ones with Ray installed.
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
NUM_CPUS = 4  # logical CPUs, more than the 2 cores here: Train + Data need headroom
# Ports come from 20000-32767: above Ray's default worker range (10002-19999) and below
# the kernel's ephemeral range, so neither another Ray nor outgoing connections take them.
PORT_LOW, PORT_HIGH = 20000, 32767
N_WORKER_PORTS = 64


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_ports(n: int, taken: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(PORT_LOW, PORT_HIGH)
        if port not in taken and _port_free(port):
            taken.add(port)
            ports.append(port)
    return ports


def _free_port_range(size: int, taken: set[int]) -> tuple[int, int]:
    while True:
        lo = random.randint(PORT_LOW, PORT_HIGH - size)
        rng = range(lo, lo + size)
        if not taken.intersection(rng) and all(_port_free(p) for p in rng):
            taken.update(rng)
            return lo, lo + size - 1


def _unshare_works() -> bool:
    """A private pid namespace: when its first process dies, the kernel kills the rest."""
    if shutil.which("unshare") is None:
        return False
    cmd = ["unshare", "-p", "-f", "--mount-proc", "--kill-child", "true"]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _base_env(auth_token: Path | None) -> dict[str, str]:
    """Environment of the head and its clients: venv first, quiet, and an explicit auth mode.

    Token auth is on by default in 2.60 wherever ~/.ray/auth_token exists, so the mode is
    always explicit; a token comes from its own file, never from the shared ~/.ray.
    """
    drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled" if auth_token is None else "token",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_DATA_LOG_LEVEL="WARNING",
    )
    if auth_token is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(auth_token)
    return env


@dataclass
class LocalHead:
    """A `ray start --head --block` process and how to reach its job server."""

    proc: subprocess.Popen
    dashboard_url: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    env: dict[str, str]  # the environment clients (and the head) run with
    temp_dir: Path
    log_path: Path
    gcs_address: str = ""  # 127.0.0.1:PORT, what a second node's `ray start --address` takes

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def start_head(
    num_cpus: int = NUM_CPUS, auth_token: Path | None = None, timeout_s: float = 180,
    attempts: int = 3, resources: dict[str, float] | None = None,
) -> LocalHead:
    """Start a Ray head on explicit free ports; return once it accepts jobs.

    auth_token: a file holding the token the head requires; None: auth disabled.
    A `ray start` that exits while starting is retried on fresh ports: on a loaded
    machine its own wait for the GCS can time out ("Failed to get node info: Deadline
    Exceeded", seen with load ~15 on 2 cores); that is Ray's start-up, not the job API.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_head_once(num_cpus, auth_token, timeout_s, resources)
        except HeadExited:
            if attempt == attempts:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


class HeadExited(RuntimeError):
    """`ray start` exited before the head was ready."""


def _start_head_once(num_cpus: int, auth_token: Path | None, timeout_s: float,
                     resources: dict[str, float] | None = None) -> LocalHead:
    taken: set[int] = set()
    gcs, dash, agent_http, agent_grpc, client, node_mgr, obj_mgr, runtime_env, metrics = (
        _free_ports(9, taken)
    )
    min_worker, max_worker = _free_port_range(N_WORKER_PORTS, taken)
    # Short: Ray puts unix sockets under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rvray-", dir="/tmp"))
    cmd = [
        RAY, "start", "--head", "--block",
        "--dashboard-host=127.0.0.1",  # (--node-ip-address=127.0.0.1 is resolved away)
        f"--port={gcs}", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={min_worker}", f"--max-worker-port={max_worker}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    if _unshare_works():
        cmd = ["unshare", "-p", "-f", "--mount-proc", "--kill-child", *cmd]
    env = _base_env(auth_token)
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = LocalHead(proc, f"http://127.0.0.1:{dash}", env, temp_dir, log_path,
                     gcs_address=f"127.0.0.1:{gcs}")
    try:
        # The job API answers first; submissions fail ("No available agent") until the
        # head's dashboard agent, which runs the jobs, listens too.
        urls = [f"{head.dashboard_url}/api/jobs/", f"http://127.0.0.1:{agent_http}/"]
        _wait_ready(head, urls, timeout_s)
    except HeadExited:
        try:
            stop_head(head)  # its processes, if any are left
        except AssertionError:
            pass  # "the head exited": known, and raised below with its log
        raise
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_ready(head: LocalHead, urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise HeadExited(f"ray start exited {head.proc.returncode}:\n{head.log_tail()}")
        if _http_answers(pending[0]):
            pending.pop(0)
        else:
            time.sleep(1)
    if pending:
        raise TimeoutError(f"{pending[0]} silent after {timeout_s}s:\n{head.log_tail()}")


def _http_answers(url: str) -> bool:
    """Any HTTP answer, an error status included, means the server is up."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def stop_head(head: LocalHead) -> None:
    """Stop the `ray start` process and every descendant of it, and nothing else.

    `ray start --block` runs all of the node's processes as its descendants (GCS, raylet,
    dashboard, workers, job drivers), so its process tree is exactly this cluster. The
    descendants get SIGTERM (what `ray stop` sends) and 5 s, then the root gets SIGKILL:
    `unshare` ignores SIGTERM, and a pid namespace's first process ignores signals it has
    no handler for; killing `unshare --kill-child` tears the whole namespace down.
    """
    died = head.proc.poll()
    try:
        root = psutil.Process(head.proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in reversed(tree[1:]):  # leaves first; psutil checks for pid reuse
        _signal(p, kill=False)
    _wait_gone(tree[1:], timeout_s=5)  # the raylet drains for ~12 s; not needed here
    head.proc.kill()
    head.proc.wait(timeout=30)
    for p in _wait_gone(tree, timeout_s=10):
        _signal(p, kill=True)
    alive = _wait_gone(tree, timeout_s=10)
    assert not alive, f"Ray processes survived: {[p.pid for p in alive]}"
    log = head.log_tail()
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    # Something else stopped this head (a `ray stop` elsewhere on the machine?): say so.
    assert died is None, f"the Ray head exited {died} during the tests:\n{log}"


def _signal(p: psutil.Process, kill: bool) -> None:
    try:
        p.kill() if kill else p.terminate()
    except psutil.NoSuchProcess:
        pass


def _running(p: psutil.Process) -> bool:
    # A zombie has exited; it only waits for a parent (or a non-reaping init) to reap it.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `procs` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def ray_cli(
    head: LocalHead, *args: str, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env or head.env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip


def submit(
    head: LocalHead,
    entrypoint: list[str],
    working_dir: Path = REPO,
    timeout_s: float = 300,
    env: dict[str, str] | None = None,
) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` (waits for the job, streams its logs); returns (job id, result)."""
    job_id = f"rayvid-test-{uuid.uuid4().hex[:8]}"
    res = ray_cli(
        head, "job", "submit", f"--address={head.dashboard_url}",
        f"--submission-id={job_id}", f"--working-dir={working_dir}", "--", *entrypoint,
        timeout_s=timeout_s, env=env,
    )  # fmt: skip
    return job_id, res


def job_status(head: LocalHead, job_id: str) -> str:
    """The job's status as `ray job status` prints it: SUCCEEDED, FAILED, STOPPED, ..."""
    res = ray_cli(
        head, "job", "status", f"--address={head.dashboard_url}", "--log-color=false",
        job_id, timeout_s=60,
    )  # fmt: skip
    out = res.stdout + res.stderr
    # Terminal states get a sentence ("Job 'x' succeeded"), others "Status for job 'x': S".
    words = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
    match = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)
    if match:
        return words[match.group(1)]
    match = re.search(rf"Status for job '{job_id}': (\w+)", out)
    assert match, f"no status in:\n{out}"
    return match.group(1)


def _explain(res: subprocess.CompletedProcess, head: LocalHead) -> str:
    return (
        f"rc={res.returncode}\n--- stdout\n{res.stdout[-6000:]}\n--- stderr\n"
        f"{res.stderr[-3000:]}\n--- ray start log\n{head.log_tail()}"
    )


@pytest.mark.timeout(300)
def test_token_auth_needs_the_clusters_token(tmp_path: Path):
    """As on the cluster: a head with token auth refuses a client without its token."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    head = start_head(num_cpus=1, auth_token=token)
    try:
        anonymous = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        anonymous["RAY_AUTH_MODE"] = "disabled"
        entry = ["python", "-c", "print('hello')"]
        _, res = submit(head, entry, working_dir=tmp_path, env=anonymous, timeout_s=120)
        assert res.returncode != 0, _explain(res, head)
        assert "Authentication" in res.stderr, _explain(res, head)
        job_id, res = submit(head, entry, working_dir=tmp_path, timeout_s=240)
        assert res.returncode == 0, _explain(res, head)
        assert job_status(head, job_id) == "SUCCEEDED"
    finally:
        stop_head(head)


@pytest.fixture(scope="module")
def head():
    h = start_head()
    yield h
    stop_head(h)


@pytest.mark.timeout(300)
def test_submit_trivial_job(head: LocalHead):
    """The mechanics: the job's `python` has Ray, attaches to this head and sees its CPUs."""
    probe = (
        "import json, ray; ray.init(logging_level='ERROR'); "
        "print('RESOURCES=' + json.dumps(ray.cluster_resources()))"
    )
    job_id, res = submit(head, ["python", "-c", probe], timeout_s=240)
    assert res.returncode == 0, _explain(res, head)
    assert job_status(head, job_id) == "SUCCEEDED"
    match = re.search(r"RESOURCES=(\{.*\})", res.stdout)
    assert match, _explain(res, head)
    assert json.loads(match.group(1))["CPU"] == NUM_CPUS


@pytest.mark.timeout(300)
def test_failing_job_is_reported(head: LocalHead, tmp_path: Path):
    """A job that exits non-zero makes `ray job submit` fail and its status FAILED."""
    job_id, res = submit(
        head, ["python", "-c", "raise SystemExit(3)"], working_dir=tmp_path, timeout_s=240
    )
    assert res.returncode != 0, _explain(res, head)
    assert job_status(head, job_id) == "FAILED"


# About a minute on a quiet machine, 3 in CI; 11 min were seen on 2 cores shared with other
# jobs. On demand (-m soak): tests/test_console.py runs the same job in CI, and the other
# tests here cover submission itself.
@pytest.mark.soak
@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    not (REPO / "jobs" / "train.py").exists(), reason="jobs/train.py not written yet"
)
def test_train_smoke_test_job(head: LocalHead, tmp_path: Path):
    """`jobs/train.py --smoke-test` as a submitted job writes a complete run folder.

    The out dir is an absolute local path, a stand-in for shared storage on a cluster;
    the job simulates its own data, so nothing but the repo goes through `--working-dir`.
    The recipe is a margin head with the UIR open-set loss (issue 13): `cosine_mlp` with
    CosFace, val's noise pushed towards uniform, the member calibrated.
    """
    run_dir = tmp_path / "run"
    entry = ["python", "jobs/train.py", "--smoke-test", "--out", str(run_dir),
             "--set", "model.archs=[cosine_mlp]", "--set", "loss.cosine_stages=cosface",
             "--set", "openset.noise=uir"]
    t0 = time.monotonic()
    job_id, res = submit(head, entry, timeout_s=1200)
    print(f"job took {time.monotonic() - t0:.0f}s; its output ends:\n{res.stdout[-3000:]}")
    assert res.returncode == 0, _explain(res, head)
    assert job_status(head, job_id) == "SUCCEEDED"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["members"] >= 1 and summary["eval"]["part"] == "unseen"
    assert summary["config"]["loss"]["cosine_stages"][0]["weights"] == {"cosface": 1.0}
    # ensemble.json lists checkpoint directories relative to the run folder (design.md §4).
    members = json.loads((run_dir / "ensemble.json").read_text())["members"]
    assert members
    for member in members:
        ckpt = run_dir / member["path"]
        assert (ckpt / "model.pt").is_file(), ckpt
        config = json.loads((ckpt / "model_config.json").read_text())
        assert config["arch"] == "cosine_mlp" and config["extra"]["calibration"]["a"] > 0


# ------------------------------------------------------------------ two nodes on one machine


def start_worker_node(head: LocalHead, num_cpus: int, resources: dict[str, float],
                      timeout_s: float = 180) -> LocalHead:
    """A second node: `ray start --address=<head's GCS> --block` with its own CPUs, custom
    resources and ports, in its own process tree (and pid namespace where unshare works),
    joined to `head`; returns once the head lists two alive nodes. Stop it with `stop_head`."""
    taken: set[int] = set()
    # Its own temp dir, as a real node has its own disk: two runtime-env agents unpacking
    # the job's working_dir into one session folder race (a module went missing mid-import).
    temp_dir = Path(tempfile.mkdtemp(prefix="rvray2-", dir="/tmp"))
    node_mgr, obj_mgr, agent_http, agent_grpc, runtime_env, metrics = _free_ports(6, taken)
    min_worker, max_worker = _free_port_range(N_WORKER_PORTS, taken)
    cmd = [
        RAY, "start", f"--address={head.gcs_address}", "--block",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={min_worker}", f"--max-worker-port={max_worker}",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    if _unshare_works():
        cmd = ["unshare", "-p", "-f", "--mount-proc", "--kill-child", *cmd]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=head.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    node = LocalHead(proc, head.dashboard_url, head.env, temp_dir, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while len(alive_nodes(head)) < 2:
            if proc.poll() is not None:
                raise HeadExited(f"the second `ray start` exited {proc.returncode}:\n"
                                 f"{node.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no second node after {timeout_s}s:\n{node.log_tail()}")
            time.sleep(1)
    except BaseException:
        stop_head(node)
        raise
    return node


def state_list(head: LocalHead, kind: str, limit: int = 10000) -> list[dict]:
    """`ray list <kind> --detail` against the head's state API, as JSON rows."""
    res = ray_cli(head, "list", kind, f"--address={head.dashboard_url}", "--detail",
                  "--format=json", f"--limit={limit}", timeout_s=120)
    assert res.returncode == 0, f"ray list {kind}: {res.stderr[-2000:]}"
    return json.loads(res.stdout[res.stdout.index("["):])


def alive_nodes(head: LocalHead) -> dict[str, dict]:
    """{node id: node row} of the alive nodes."""
    try:
        rows = state_list(head, "nodes")
    except (AssertionError, ValueError, subprocess.TimeoutExpired):
        return {}  # the state API is not up yet
    return {r["node_id"]: r for r in rows if r["state"] == "ALIVE"}


@pytest.mark.timeout(1200)
def test_two_node_cluster_spreads_data_reads_and_train_workers(tmp_path: Path):
    """issue 14: "streams the feature set across nodes", shown. A head and a second node
    on this machine (`ray start --head`, `ray start --address`), 2 logical CPUs and a
    custom resource each; `ray job submit` of the smoke training with two DDP workers
    spread over the nodes (`train.placement_strategy=SPREAD`). Asserted from the job's
    own record (each rank's node id in the fold history, each rank's rows) and from
    Ray's state API (the nodes that ran Ray Data's read tasks): both nodes did both."""
    head = start_head(num_cpus=2, resources={"rayvid_head": 1})
    try:
        node = start_worker_node(head, num_cpus=2, resources={"rayvid_node2": 1})
        try:
            nodes = alive_nodes(head)
            assert len(nodes) == 2
            by_resource = {next(k for k in n["resources_total"] if k.startswith("rayvid_")): i
                           for i, n in nodes.items()}
            assert set(by_resource) == {"rayvid_head", "rayvid_node2"}, nodes
            run_dir = tmp_path / "run"
            entry = ["python", "jobs/train.py", "--smoke-test", "--out", str(run_dir),
                     "--set", "train.num_workers=2", "--set", "train.placement_strategy=SPREAD"]
            t0 = time.monotonic()
            job_id, res = submit(head, entry, timeout_s=900)
            print(f"job took {time.monotonic() - t0:.0f}s; its output ends:\n{res.stdout[-2000:]}")
            assert res.returncode == 0, _explain(res, head)
            assert job_status(head, job_id) == "SUCCEEDED"

            # Train: one DDP rank on each node, each with rows of its own shard
            results = list(run_dir.glob("folds/*/*/result.json"))
            assert results, sorted(p.name for p in run_dir.iterdir())
            last = json.loads(results[0].read_text())["history"][-1]
            assert sorted(last["rank_nodes"]) == sorted(nodes), (last, nodes)
            assert len(last["rank_rows"]) == 2 and min(last["rank_rows"]) > 0, last
            actors = [a for a in state_list(head, "actors")
                      if "TrainWorker" in a["class_name"]]
            assert {a["node_id"] for a in actors} == set(nodes), actors

            # Data: Ray Data's read tasks ran on both nodes
            tasks = state_list(head, "tasks")
            reads = [t for t in tasks if "Read" in t["name"] and t.get("node_id")]
            where = {}
            for t in reads:
                where.setdefault(t["node_id"], set()).add(t["name"])
            print({i[:8]: sorted(v)[:3] for i, v in where.items()})
            assert set(where) == set(nodes), (
                f"read tasks ran on {sorted(where)}, nodes are {sorted(nodes)}; "
                f"{len(reads)} of {len(tasks)} tasks are reads")
        finally:
            stop_head(node)
    finally:
        stop_head(head)
