"""Tests of the Serve application over real HTTP on 127.0.0.1 (rayvid.infer.app).

One Serve per module on the session's local Ray, with the app `rayvid`: a copy of
conftest's `trained_run` (two trained M5 members, unequal weights) with a `serving.json`
threshold, a search index built with `rayvid.infer.person_index.build_index` on the
simulated dataset's test split; the mixed tests add the app `mixed` at /mixed beside it: a
copy of `trained_mixed_run` (an M5 and a trained multimodal member).
Answers are checked against the same clips scored in-process (`inputs.build` +
`Ensemble.scores`); every bad input must get a 4xx with a message and leave the replicas
alive.

    pytest tests/test_serving.py          # ~1-2 minutes, most of it replica start-up
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MIXED_WEIGHTS, TRAINED_WEIGHTING, TRAINED_WEIGHTS

from rayvid.core import fusion, inputs
from rayvid.data.pipeline import ClipTransform
from rayvid.release import schema
from rayvid.model import run_folder
from rayvid.model.ensemble import Ensemble
from rayvid.infer.api import MAX_BODY_BYTES, MAX_CLIPS_PER_BATCH, MAX_FACES_PER_CLIP

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
WEIGHTING = fusion.Weighting.from_dict(TRAINED_WEIGHTING)
THRESHOLD = 0.3
MIXED_THRESHOLD = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def served(ray_local, sim_dataset, trained_run, tmp_path_factory):
    """configs/serve.yaml deployed as `serve deploy` does, with a test run, index and port."""
    import httpx
    import yaml
    from ray import serve

    from rayvid.infer.person_index import build_index
    from rayvid.infer.app import deploy_config, serve_config

    root = tmp_path_factory.mktemp("serving")
    run = Path(shutil.copytree(trained_run, root / "run"))
    run_folder.write_serving(run, run_folder.ServingSpec(THRESHOLD))
    index_dir = root / "index"
    build_index(run, sim_dataset, "test", index_dir, k=10, batch_size=128, num_actors=1)
    base = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    dashboard = ray_local.init(ignore_reinit_error=True).dashboard_url
    extra_apps: list[dict] = []  # other applications (add_app), kept by every deploy
    last: dict = {}

    def deploy(user_config: dict | None = None, per_deployment: int | None = None) -> None:
        cfg = serve_config(base, run, index_dir, port=port, user_config=user_config)
        if per_deployment is not None:
            cfg["applications"][0]["args"]["members_per_deployment"] = per_deployment
        last["app"] = cfg["applications"][0]
        cfg["applications"] += extra_apps
        deploy_config(cfg, dashboard)

    def add_app(app: dict) -> None:
        """Deploy another application beside `rayvid` (which keeps its last config)."""
        extra_apps.append(app)
        cfg = serve_config(base, run, index_dir, port=port)
        cfg["applications"] = [last["app"], *extra_apps]
        deploy_config(cfg, dashboard)

    # A port found free may be taken before Serve's proxy binds it: then deploy again on
    # another one (Serve fixes its HTTP port when it starts, so it restarts in between).
    for attempt in range(3):
        port = _free_port()
        deploy()
        if _answers(f"http://127.0.0.1:{port}/healthz", timeout_s=60):
            break
        serve.shutdown()
    else:
        pytest.fail("Serve's proxy never answered on a free port (3 tries)")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield {"client": client, "run": run, "index": index_dir, "deploy": deploy,
               "add_app": add_app, "base": base, "port": port}
    serve.shutdown()


@pytest.fixture(scope="module")
def clips(sim_dataset, served):
    """10 test clips with faces: request bodies and in-process (C,) scores."""
    table = pq.read_table(sorted((sim_dataset / "test").glob("*.parquet")))
    table = table.filter(table["n_faces"].to_numpy() > 0).slice(0, 10)
    feat, det, quality, offsets = schema.face_arrays(table)
    x, ok = fusion.qff(feat, det, quality, offsets, WEIGHTING)
    assert ok.all()
    ens = Ensemble.from_run(served["run"])
    scores = ens.scores(x) / np.float32(sum(TRAINED_WEIGHTS))
    bodies = [{"clip": table["clip"][i].as_py(), "faces": [
        {"det_score": float(det[f]), "quality_score": float(quality[f]),
         "feature": feat[f].astype(float).tolist(), "frame": 3, "bbox": [1, 2, 30, 40]}
        for f in range(offsets[i], offsets[i + 1])]} for i in range(len(table))]
    return bodies, scores


def _expected(scores: np.ndarray, k: int) -> list[int]:
    return (np.lexsort((np.arange(1, len(scores)), -scores[1:]))[:k] + 1).tolist()


def _check(answer: dict, scores: np.ndarray, k: int = 5, threshold: float = THRESHOLD) -> None:
    ids = [i["id"] for i in answer["identities"]]
    assert ids == _expected(scores, k)
    np.testing.assert_allclose([i["score"] for i in answer["identities"]], scores[ids], rtol=1e-5)
    best = scores[1:].max()
    assert answer["unknown"] == (best < threshold) and answer["usable"]
    assert answer["identity"] == (None if answer["unknown"] else ids[0])


def test_identify_matches_in_process_scoring(served, clips):
    bodies, scores = clips
    for body, s in zip(bodies[:4], scores):
        r = served["client"].post("/identify", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["clip"] == body["clip"] and r.json()["faces"] == len(body["faces"])
        _check(r.json(), s)


def test_batch_b64_and_concurrent_requests_agree(served, clips):
    bodies, scores = clips
    client = served["client"]
    r = client.post("/identify/batch", json={"clips": bodies, "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["clip"] for a in results] == [b["clip"] for b in bodies]
    for a, s in zip(results, scores):
        _check(a, s, k=3)
    b64 = [{"faces": [{"det_score": f["det_score"], "quality_score": f["quality_score"],
                       "feature_b64": base64.b64encode(np.asarray(f["feature"], "<f2").tobytes()).decode()}
                      for f in b["faces"]]} for b in bodies]
    r = client.post("/identify/batch", json={"clips": b64, "top_k": 3})
    assert [a["identities"] for a in r.json()["results"]] == [a["identities"] for a in results]
    with ThreadPoolExecutor(16) as pool:  # concurrent requests are batched together
        answers = list(pool.map(lambda b: client.post("/identify", json=b), bodies * 3))
    assert all(a.status_code == 200 for a in answers)
    for a, s in zip(answers, list(scores) * 3):
        _check(a.json(), s)


def test_clip_without_usable_face_is_unknown(served, clips):
    face = dict(clips[0][0]["faces"][0], quality_score=-5.0)  # W(q) = 0: qFF ok False
    r = served["client"].post("/identify", json={"faces": [face, face]})
    assert r.status_code == 200, r.text
    assert r.json()["unknown"] and not r.json()["usable"] and r.json()["identity"] is None


def test_search_health_and_docs(served, sim_dataset):
    client = served["client"]
    r = client.get("/search", params={"id": 3, "k": 4})
    assert r.status_code == 200, r.text
    table = pq.read_table(served["index"]).to_pylist()
    want = [row for row in table if row["identity"] == 3][:4]
    assert [h["clip"] for h in r.json()["hits"]] == [w["clip"] for w in want]
    assert [(h["frame_min"], h["frame_max"]) for h in r.json()["hits"]] == [
        (w["frame_min"], w["frame_max"]) for w in want]
    assert r.json()["index_version"] == 1
    health = client.get("/healthz").json()
    assert (health["status"], health["members"], health["weights"]) == ("ok", 2, list(TRAINED_WEIGHTS))
    assert health["input_kinds"] == ["clip_vector"]
    assert health["member_deployments"] == 1  # configs/serve.yaml packs the ensemble
    assert (health["unknown_threshold"], health["threshold_source"]) == (THRESHOLD, "serving.json")
    openapi = client.get("/openapi.json").json()
    assert {"/identify", "/identify/batch", "/search", "/healthz"} <= set(openapi["paths"])
    schemas = openapi["components"]["schemas"]
    assert {"heads", "bodies", "audio"} <= set(schemas["Clip"]["properties"])
    assert "weights the clip's head mean" in schemas["Head"]["properties"]["det_score"]["description"]
    assert "det_score" not in schemas["Body"]["properties"]
    assert "feature_b64" in schemas["Audio"]["properties"]
    assert client.get("/docs").status_code == 200


def _face(**kw) -> dict:
    return {"det_score": 0.99, "quality_score": 45.2, "feature": [0.5] * 512, **kw}


def _head(n: int = 512, **kw) -> dict:
    return {"det_score": 0.9, "feature": [0.25] * n, **kw}


B64_NAN = base64.b64encode(np.full(512, np.nan, "<f4").tobytes()).decode()
B64_ZERO = base64.b64encode(np.zeros(512, "<f2").tobytes()).decode()
BAD = {  # name: (method, path, json body | raw bytes, status, message fragment)
    "short feature": ("post", "/identify", {"faces": [_face(feature=[0.1] * 511)]}, 422, "at least 512"),
    "long feature": ("post", "/identify", {"faces": [_face(feature=[0.1] * 513)]}, 422, "at most 512"),
    "NaN": ("post", "/identify", b'{"faces": [{"det_score": 0.9, "quality_score": 40, "feature": [NaN'
            + b", 0" * 511 + b"]}]}", 422, "finite"),
    "Infinity": ("post", "/identify", b'{"faces": [{"det_score": Infinity, "quality_score": 40, '
                 b'"feature": [' + b"0, " * 511 + b"0]}]}", 422, "finite"),
    "beyond float16": ("post", "/identify", {"faces": [_face(feature=[1e5] * 512)]}, 422, "65504"),
    "string feature": ("post", "/identify", {"faces": [_face(feature=["a"] * 512)]}, 422, "number"),
    "empty faces": ("post", "/identify", {"faces": []}, 422, "has no face, head, body or audio"),
    "clip with nothing": ("post", "/identify/batch", {"clips": [{"faces": [_face()]}, {"clip": "c1"}]},
                          422, "clips.1: Value error, clip 'c1' has no face, head, body or audio"),
    "head too short": ("post", "/identify", {"faces": [_face()], "heads": [_head(300)]}, 422,
                       "heads.0.feature: 300 values, but the run's head features have 512"),
    "body base64 too short": ("post", "/identify/batch", {"clips": [{"faces": [_face()]}, {"bodies": [
        {"feature_b64": B64_ZERO[:-8]}]}]}, 422, "clips.1.bodies.0.feature_b64: feature_b64 must decode to 512"),
    "head lengths differ": ("post", "/identify/batch", {"clips": [{"heads": [_head()]}, {"heads": [_head(511)]}]},
                            422, "clips.1.heads.0.feature has 511 values but clips.0.heads.0.feature has 512"),
    "audio NaN base64": ("post", "/identify", {"audio": {"feature_b64": B64_NAN}}, 422, "audio.feature_b64"),
    "audio beyond float16": ("post", "/identify", {"audio": {"feature": [1e5] * 512}}, 422, "65504"),
    "audio as a list": ("post", "/identify", {"audio": [0.5] * 512}, 422, "audio: Input should be an object"),
    "head without det_score": ("post", "/identify", {"heads": [{"feature": [0.5] * 512}]}, 422,
                               "heads.0.det_score: Field required"),
    "body with det_score": ("post", "/identify", {"bodies": [{"feature": [0.5] * 512, "det_score": 1}]},
                            422, "Extra inputs"),
    "head with two features": ("post", "/identify", {"heads": [_head(feature_b64=B64_ZERO)]}, 422, "exactly one"),
    "too many faces": ("post", "/identify", {"faces": [_face(feature=[0] * 512)] * (MAX_FACES_PER_CLIP + 1)},
                       422, f"at most {MAX_FACES_PER_CLIP}"),
    "too many clips": ("post", "/identify/batch", {"clips": [{"faces": [_face()]}] * (MAX_CLIPS_PER_BATCH + 1)},
                       422, f"at most {MAX_CLIPS_PER_BATCH}"),
    "too many faces in all": ("post", "/identify/batch",
                              {"clips": [{"faces": [_face(feature=[0] * 512)] * 1000}] * 9}, 422, "limit is 8192"),
    "too many detections in all": ("post", "/identify/batch", {"clips": [
        {"faces": [_face(feature=[0] * 512)] * 500, "heads": [_head()] * 500}] * 9}, 422, "limit is 8192"),
    "empty batch": ("post", "/identify/batch", {"clips": []}, 422, "at least 1"),
    "missing det_score": ("post", "/identify", {"faces": [{"quality_score": 1, "feature": [0] * 512}]},
                          422, "Field required"),
    "unknown field": ("post", "/identify", {"faces": [_face(quality=3)]}, 422, "Extra inputs"),
    "two features": ("post", "/identify", {"faces": [_face(feature_b64=B64_ZERO)]}, 422, "exactly one"),
    "no feature": ("post", "/identify", {"faces": [{"det_score": 1, "quality_score": 1}]}, 422, "exactly one"),
    "bad base64": ("post", "/identify", {"faces": [{"det_score": 1, "quality_score": 1, "feature_b64": "@@"}]},
                   422, "base64"),
    "short base64": ("post", "/identify", {"faces": [{"det_score": 1, "quality_score": 1, "feature_b64": "AAAA"}]},
                     422, "bytes"),
    "NaN base64": ("post", "/identify", {"faces": [{"det_score": 1, "quality_score": 1, "feature_b64": B64_NAN}]},
                   422, "NaN"),
    "top_k 0": ("post", "/identify", {"faces": [_face()], "top_k": 0}, 422, "greater than or equal to 1"),
    "malformed JSON": ("post", "/identify", b'{"faces": [', 422, "Invalid JSON"),
    "JSON list": ("post", "/identify", [1, 2], 422, "should be an object"),
    "not JSON": ("post", "/identify/batch", b"hello", 422, "Invalid JSON"),
    "empty body": ("post", "/identify", b"", 422, "Invalid JSON"),
    "body too large": ("post", "/identify/batch", b" " * (MAX_BODY_BYTES + 1), 413, "Too Large"),
    "unknown identity": ("get", "/search?id=99999", None, 404, "unknown identity 99999"),
    "identity 0 (other)": ("get", "/search?id=0", None, 404, "unknown identity 0"),
    "id not a number": ("get", "/search?id=abc", None, 422, "valid integer"),
    "missing id": ("get", "/search", None, 422, "Field required"),
    "k too large": ("get", "/search?id=1&k=5000", None, 422, "less than or equal to 1000"),
    "wrong method": ("get", "/identify", None, 405, "Method Not Allowed"),
}


def test_bad_inputs_get_4xx_with_a_message_and_replicas_survive(served):
    client = served["client"]
    replica = client.get("/healthz").json()["replica"]
    failures = []
    for name, (method, path, body, status, fragment) in BAD.items():
        if isinstance(body, bytes):
            r = client.request(method, path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.request(method, path, json=body)
        detail = json.dumps(r.json()) if r.headers.get("content-type") == "application/json" else r.text
        if r.status_code != status or fragment not in detail:
            failures.append(f"{name}: {r.status_code} {detail[:300]}")
    assert not failures, "\n".join(failures)
    assert client.get("/healthz").json()["replica"] == replica  # same replica: nothing crashed
    assert client.post("/identify", json={"faces": [_face()]}).status_code == 200


def test_user_config_changes_threshold_weights_top_k_without_redeploy(served, clips):
    client, (bodies, scores) = served["client"], clips
    replica = client.get("/healthz").json()["replica"]
    served["deploy"]({"unknown_threshold": 1.0, "weights": [0.0, 2.0], "top_k": 2})
    health = client.get("/healthz").json()
    assert health["replica"] == replica  # reconfigured in place, not replaced
    assert (health["unknown_threshold"], health["weights"], health["top_k"]) == (1.0, [0.0, 2.0], 2)
    only_second = Ensemble.from_dirs([served["run"] / "folds/1/M5/best"])
    answer = client.post("/identify", json=bodies[0]).json()
    body = bodies[0]
    feat = np.array([f["feature"] for f in body["faces"]], np.float16)
    det = np.array([f["det_score"] for f in body["faces"]], np.float32)
    quality = np.array([f["quality_score"] for f in body["faces"]], np.float32)
    x, _ = fusion.qff(feat, det, quality, np.array([0, len(feat)]), WEIGHTING)
    _check(answer, only_second.scores(x)[0], k=2, threshold=1.0)
    assert answer["unknown"] and answer["identity"] is None
    served["deploy"]({"top_k": 5})
    health = client.get("/healthz").json()
    assert (health["unknown_threshold"], health["top_k"]) == (THRESHOLD, 5)
    _check(client.post("/identify", json=bodies[0]).json(), scores[0])


def test_search_reloads_an_updated_index(served):
    manifest_path = served["index"] / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tmp = manifest_path.with_name(".m.tmp")
    tmp.write_text(json.dumps({**manifest, "version": 2}))
    os.replace(tmp, manifest_path)  # as update_index's folder swap: a new manifest
    r = served["client"].get("/search", params={"id": 1, "k": 1})
    assert r.status_code == 200 and r.json()["index_version"] == 2


def test_one_deployment_per_checkpoint_scores_the_same(served, clips):
    client, (bodies, scores) = served["client"], clips
    served["deploy"](per_deployment=1)  # args change: the app is rebuilt with 2 members
    try:
        assert client.get("/healthz").json()["member_deployments"] == 2
        r = client.post("/identify/batch", json={"clips": bodies[:4]})
        assert r.status_code == 200, r.text
        for answer, want in zip(r.json()["results"], scores[:4]):
            _check(answer, want)
    finally:
        served["deploy"](per_deployment=0)


def test_member_groups():  # their blend: run_folder.weighted_mean (tests/test_run_folder.py)
    from rayvid.infer.app import member_groups

    assert member_groups(6, 0) == [[0, 1, 2, 3, 4, 5]]
    assert member_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert member_groups(3, 1) == [[0], [1], [2]]


def test_cli_bad_run_exits_2_before_starting_ray(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--run", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"serve: error: run {tmp_path} has no ensemble.json (is training finished?)"]


def test_faceless_clip_on_a_clip_vector_run_is_unknown(served, clips):
    """No member of an M5-only run can use a clip with only a head and audio: unknown,
    not usable, scores 0; the same clip with its faces is usable."""
    r = served["client"].post("/identify/batch", json={"clips": [
        {"clip": "no-face", "heads": [_head()], "audio": {"feature": [0.1] * 512}},
        {**clips[0][0], "heads": [_head()]}]})
    assert r.status_code == 200, r.text
    faceless, with_faces = r.json()["results"]
    assert faceless["unknown"] and not faceless["usable"] and faceless["identity"] is None
    assert faceless["best_score"] == 0.0 and faceless["faces"] == 0
    assert with_faces["usable"]
    _check(with_faces, clips[1][0])  # heads are ignored by clip-vector members


# ------------------------------------------------------------------ mixed ensembles


def _b64(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, "<f2").tobytes()).decode()


def _clip_body(parts: inputs.ClipParts, i: int, name: str, faces: bool = True,
               b64: bool = True) -> dict:
    """Clip i of `parts` as a request body: every face, head, body and audio vector."""
    def feat(v: np.ndarray) -> dict:
        return {"feature_b64": _b64(v)} if b64 else {"feature": v.astype(float).tolist()}

    f, h, b, a = parts.faces, parts.heads, parts.bodies, parts.audio
    body: dict = {"clip": name}
    if faces:
        body["faces"] = [{"det_score": float(f.det[j]), "quality_score": float(f.quality[j]),
                          **feat(f.feat[j])} for j in range(f.offsets[i], f.offsets[i + 1])]
    body["heads"] = [{"det_score": float(h.det[j]), "frame": 1, **feat(h.feat[j])}
                     for j in range(h.offsets[i], h.offsets[i + 1])]
    body["bodies"] = [{"bbox": [0, 0, 9, 9], **feat(b.feat[j])} for j in range(b.offsets[i], b.offsets[i + 1])]
    if a.present[i]:
        body["audio"] = feat(a.feat[i])
    return body


@pytest.fixture(scope="module")
def mixed(served, sim_dataset, trained_mixed_run, tmp_path_factory):
    """The app `mixed` (a copy of `trained_mixed_run`, threshold MIXED_THRESHOLD) at /mixed
    beside `rayvid`, and the val split's detections (`ClipParts`, labels) read as training
    and batch prediction read them."""
    from rayvid.infer.app import serve_config

    run = Path(shutil.copytree(trained_mixed_run, tmp_path_factory.mktemp("serving-mixed") / "run"))
    run_folder.write_serving(run, run_folder.ServingSpec(MIXED_THRESHOLD))
    app = serve_config(served["base"], run)["applications"][0]
    app.update(name="mixed", route_prefix="/mixed")
    served["add_app"](app)
    spec = run_folder.read_ensemble(run).input_spec()
    table = pq.read_table(sorted((sim_dataset / "val").glob("*.parquet")))
    parts = ClipTransform(kinds=spec.kinds, weighting=spec.weighting, dims=spec.dims).parts(table)
    return {"run": run, "spec": spec, "parts": parts, "label": table["label"].to_numpy(),
            "names": table["clip"].to_pylist()}


def _served_scores(client, bodies: list[dict], k: int) -> list[dict]:
    r = client.post("/mixed/identify/batch", json={"clips": bodies, "top_k": k})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_mixed_run_scores_equal_in_process_ensemble(served, mixed):
    """Served answers = weighted_mean(Ensemble.scores(inputs.build(parts))) of the same
    val clips (with faces, faceless, noise): no train/serve skew."""
    parts, label = mixed["parts"], mixed["label"]
    counts = [np.diff(p.offsets) for p in (parts.faces, parts.heads, parts.bodies)]
    has_any = (sum(counts) > 0) | parts.audio.present
    faceless = np.flatnonzero((counts[0] == 0) & has_any)[:4]
    rows = np.sort(np.concatenate([np.flatnonzero(counts[0] > 0)[:12], faceless]))
    assert len(faceless) == 4 and (label[rows] == 0).any()  # noise clips too
    sub = parts.take(rows)
    built = inputs.build(sub, mixed["spec"])
    want = run_folder.weighted_mean(Ensemble.from_run(mixed["run"]).scores(built), MIXED_WEIGHTS)
    bodies = [_clip_body(sub, i, mixed["names"][r], b64=bool(i % 2)) for i, r in enumerate(rows)]
    results = _served_scores(served["client"], bodies, k=10)
    assert [a["clip"] for a in results] == [b["clip"] for b in bodies]
    for answer, scores in zip(results, want):
        _check(answer, scores, k=10, threshold=MIXED_THRESHOLD)
    health = served["client"].get("/mixed/healthz").json()
    assert health["input_kinds"] == ["clip_vector", "multimodal"] and health["members"] == 2
    assert health["weights"] == list(MIXED_WEIGHTS)


def test_faceless_clips_get_identities_from_the_multimodal_member(served, mixed):
    """Known val clips sent with their heads, bodies and audio but no face: answered (not
    unknown) by the multimodal member, the true identity in the top 5 for most of them
    (a random ranking of 40 identities: 12.5%)."""
    parts, label = mixed["parts"], mixed["label"]
    rows = np.flatnonzero((label > 0) & (np.diff(parts.heads.offsets) > 0))[:64]
    sub = parts.take(rows)
    bodies = [_clip_body(sub, i, mixed["names"][r], faces=False) for i, r in enumerate(rows)]
    results = _served_scores(served["client"], bodies, k=5)
    assert all(a["usable"] and a["faces"] == 0 for a in results)
    answered = np.mean([not a["unknown"] for a in results])
    in_top5 = np.mean([label[r] in [i["id"] for i in a["identities"]] for r, a in zip(rows, results)])
    top1 = np.mean([a["identity"] == label[r] for r, a in zip(rows, results)])
    assert answered >= 0.8 and in_top5 >= 0.6 and top1 >= 0.4, (answered, in_top5, top1)
    # one naturally faceless clip over /identify, features as JSON numbers
    natural = [i for i, r in enumerate(rows) if np.diff(parts.faces.offsets)[r] == 0
               and not results[i]["unknown"]][0]
    body = _clip_body(sub, natural, "natural", faces=False, b64=False)
    r = served["client"].post("/mixed/identify", json=body)
    assert r.status_code == 200, r.text
    one, batched = r.json()["identities"], results[natural]["identities"]
    assert [i["id"] for i in one] == [i["id"] for i in batched]
    np.testing.assert_allclose([i["score"] for i in one], [i["score"] for i in batched], rtol=1e-5)
    assert not r.json()["unknown"] and r.json()["identity"] == results[natural]["identity"]


def test_mixed_run_bad_detections_get_422(served, mixed):
    client, parts = served["client"], mixed["parts"]
    good = _clip_body(parts.take(np.array([0])), 0, "good")
    r = client.post("/mixed/identify", json={**good, "heads": [_head(), _head(256)]})
    assert r.status_code == 422
    assert "heads.1.feature has 256 values but heads.0.feature has 512" in r.json()["detail"]
    r = client.post("/mixed/identify/batch", json={"clips": [good, {"heads": [
        {"det_score": 0.5, "feature_b64": _b64(np.ones(300))}]}]})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("clips.1.heads.0.feature_b64: feature_b64 must decode "
                                         "to 512 float16 (1024 bytes)")
    assert "got 600 bytes" in r.json()["detail"]
    r = client.post("/mixed/identify/batch", json={"clips": [good, {"clip": "nothing", "heads": []}]})
    assert r.status_code == 422 and "clips.1" in r.json()["detail"] and "'nothing'" in r.json()["detail"]
    assert client.post("/mixed/identify", json=good).status_code == 200
