"""Ray Serve application: identify people in clips, search an index of clips by person.

    app = build_app("runs/exp1", index_dir="index/")        # or, from a Serve config file:
    serve.run(app)                                          #   import_path: rayvid.infer.app:app_builder

Deployments, composed through handles (design.md; Ray's model-composition pattern):

- `member-<g>` (`EnsembleMember`), each holding a group of the checkpoints of
  `RUN/ensemble.json` (all of them by default: `members_per_deployment=0`; 1 = one
  deployment per checkpoint), of any input kind (clip vector, face set, multimodal):
  the inputs of its members' kinds + the group's weights -> `Ensemble.partial_scores`
  (the weighted sum (n, C) of the sigmoid scores of the members that can use each clip,
  and their weight (n,)), `@serve.batch`ed across requests.
- `IdentifyIngress`: FastAPI + pydantic (`rayvid.infer.api`). It flattens the request's
  faces, heads, bodies and audio (`api.clip_parts`), `@serve.batch`es concurrent requests,
  builds the model inputs of the batch once with `rayvid.core.inputs.build` and the run's
  `InputSpec` (the one builder training and batch prediction use), makes one call per
  member deployment, adds the groups' parts and blends them (`run_folder.blend`: each clip
  rescaled over the members that could use it) into the weighted mean of sigmoids in
  [0, 1] (`run_folder.weighted_mean`), and answers the top-k identities, or "unknown" when
  the best score is below the threshold or no member with a non-zero weight can use the
  clip (`usable_clips`: a clip-vector member needs a face with a positive qFF weight, a
  face-set member a face, a multimodal member any modality).

`user_config` of the ingress (`ServingConfig`: unknown_threshold, weights, top_k, index)
and of a member (`MemberConfig`: its batch size and wait) is applied in `reconfigure`.
Replicas keep running when the app is deployed from a Serve config file (configs/
serve.yaml through `serve deploy`, `serve run` or `deploy_config`) and only a
`user_config` changes; Ray 2.60 gives every Python-API `serve.run` a fresh code version,
which replaces the replicas. Defaults: threshold from `RUN/serving.json` (`rayvid.infer.person_index.
calibrate`, else 0.5), weights from `ensemble.json`. `/search` reloads the index when its
manifest changes (`rayvid.infer.person_index.update_index`). Request features are cast to float16, the
precision of the prepared dataset, so a served clip scores exactly as in batch prediction
(`Ensemble.scores` of the same `inputs.build`).
Endpoints: POST /identify, POST /identify/batch, GET /search?id=N&k=100, GET /healthz,
GET /docs and /openapi.json.
"""

import asyncio
import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from rayvid.core import inputs
from rayvid.core.inputs import ClipParts
from rayvid.infer import person_index as index, predict
from rayvid.model import run_folder
from rayvid.infer.api import (
    MAX_BODY_BYTES, MAX_SEARCH_K, AppArgs, BatchRequest, BatchResponse, Clip, FieldError,
    Health, IdentifyRequest, IdentifyResponse, MemberConfig, SearchResponse, ServingConfig,
    answers, clip_parts, concat_parts,
)

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.5  # used only when the run has no serving.json
_RETRIES = 3  # member calls retried after a replica died (Serve routes to a live one)

# ------------------------------------------------------------------ numpy core


def member_groups(n_members: int, per_deployment: int) -> list[list[int]]:
    """Member indices per member deployment: 0 = all in one, k = consecutive groups of k."""
    size = per_deployment or n_members
    return [list(range(lo, min(lo + size, n_members))) for lo in range(0, n_members, size)]


def usable_clips(built: dict[str, np.ndarray], kinds: Sequence[str],
                 weights: Sequence[float]) -> np.ndarray:
    """(n,) bool: the clips some member with a non-zero weight answers for
    (`rayvid.core.inputs.answerable`). built: `inputs.build`'s output."""
    return inputs.answerable([k for k, w in zip(kinds, weights) if w > 0], built)


# ------------------------------------------------------------------ deployments


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                      "target_ongoing_requests": 8})
class EnsembleMember:
    """A group of checkpoint directories of any input kinds: the inputs of their kinds
    (`inputs.build`'s columns) and one weight per checkpoint -> `Ensemble.partial_scores`:
    (sums (n, C), used (n,)), the weighted sum of the sigmoid scores of the members that
    can use each clip and their total weight, to be added over groups and blended."""

    def __init__(self, checkpoints: list[str]) -> None:
        from rayvid.model.ensemble import Ensemble  # torch is imported in the replica only

        self.model = Ensemble.from_dirs(checkpoints)  # sum of w * sigmoid(scale * logits)
        self.checkpoints = checkpoints

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = MemberConfig.model_validate(config or {})
        self.score.set_max_batch_size(cfg.max_batch_size)
        self.score.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def score(self, xs: list[dict[str, np.ndarray]], weights: list[tuple[float, ...]]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(xs)
        for w in dict.fromkeys(weights):  # one forward pass per weight vector (normally one)
            idx = [i for i, wi in enumerate(weights) if wi == w]
            sizes = [len(next(iter(xs[i].values()))) for i in idx]
            batch = {c: np.concatenate([xs[i][c] for i in idx]) for c in xs[idx[0]]}
            sums, used = self.model.partial_scores(batch, weights=w)
            cut = np.cumsum(sizes)[:-1]
            for i, s, u in zip(idx, np.split(sums, cut), np.split(used, cut)):
                out[i] = (s, u)
        return out


api = FastAPI(title="rayvid", max_body_size=MAX_BODY_BYTES, version="1",
              description="Identify the person in a video clip from its faces (iQIYI-VID "
                          "features); search clips by person. " + __doc__.split("\n\n")[0])


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with a one-line message and the errors, without echoing 512-number inputs."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return JSONResponse(status_code=422, content={"detail": f"{where or 'body'}: {first['msg']}",
                                                  "errors": errors[:20]})


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a model that `_parse` validates (see `_openapi`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


_fastapi_openapi = api.openapi


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request models `_body` refers to."""
    if api.openapi_schema is None:
        schemas = _fastapi_openapi().setdefault("components", {}).setdefault("schemas", {})
        for model in (IdentifyRequest, BatchRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}), **{model.__name__: schema})
    return api.openapi_schema


api.openapi = _openapi


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """Validate the raw body with pydantic's JSON parser: ~2.5x less CPU than FastAPI's
    json.loads + validation on 512-number features. NaN/Infinity tokens parse and then
    fail the finite-number rule; errors become FastAPI's 422 (see `_validation_error`)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def _json(answer: dict[str, Any]) -> Response:
    """`answers` output (plain str/int/float/bool/None, the response model's fields) as
    JSON, without FastAPI re-validating it through the response model (~10x the CPU)."""
    return Response(json.dumps(answer, separators=(",", ":")).encode(), media_type="application/json")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                      "target_ongoing_requests": 64})
@serve.ingress(api)
class IdentifyIngress:
    """The HTTP API; fuses faces, fans out to the members, blends, thresholds, searches."""

    def __init__(self, run_dir: str, members: list[DeploymentHandle],
                 groups: list[list[int]], index_dir: str | None = None) -> None:
        from rayvid.model.architectures import input_kind_of  # torch: in the replica only
        from rayvid.model.checkpoints import read_model_config

        self.spec = predict.read_run(run_dir)
        self.inputs = self.spec.ensemble.input_spec()  # how training built the inputs
        self.kinds = [input_kind_of(read_model_config(d)["arch"])
                      for d in self.spec.ensemble.member_dirs(run_dir)]
        self.members, self.groups = members, groups  # handle g scores checkpoints groups[g]
        self.n_members = sum(len(g) for g in groups)
        # the input columns each member deployment needs (its members' kinds)
        self.columns = [sorted({c for i in idx for c in inputs.COLUMNS[self.kinds[i]]})
                        for idx in groups]
        serving = run_folder.read_serving(run_dir)
        self.defaults = {"unknown_threshold": serving.unknown_threshold if serving else DEFAULT_THRESHOLD,
                         "weights": self.spec.ensemble.weights, "top_k": DEFAULT_TOP_K,
                         "index": index_dir}
        self.threshold_source = run_folder.SERVING_FILE if serving else "default"
        self.index_dir: str | None = None
        self.index: "index.SearchIndex | None" = None
        self.index_stamp: int | None = None
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = ServingConfig.model_validate(config or {})
        given = cfg.model_dump(exclude_none=True)
        merged = {**self.defaults, **given}
        weights = merged["weights"]
        if len(weights) != self.n_members or sum(weights) <= 0:
            raise ValueError(f"weights must be {self.n_members} numbers >= 0 with a positive "
                             f"sum, got {weights}")
        self.threshold = float(merged["unknown_threshold"])
        self.weights, self.top_k = [float(w) for w in weights], int(merged["top_k"])
        if "unknown_threshold" in given:
            self.threshold_source = "user_config"
        if merged["index"] != self.index_dir:
            self.index_dir, self.index, self.index_stamp = merged["index"], None, None
            self._refresh_index()

    def _refresh_index(self) -> None:
        """(Re)load the index when its manifest changed; keep the old one while a new
        version is being swapped in."""
        if self.index_dir is None:
            return
        try:
            stamp = os.stat(Path(self.index_dir) / index.MANIFEST_FILE).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp != self.index_stamp:
            try:
                self.index, self.index_stamp = index.load_index(self.index_dir), stamp
            except (OSError, index.SearchIndexError) as e:
                log.warning("index %s not (re)loaded: %s", self.index_dir, e)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _scores(self, items: list[ClipParts]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Requests' flat detections -> per request (scores (n, C) float32, ok (n,) bool):
        one `inputs.build` over all their clips and one call per member deployment."""
        built = inputs.build(concat_parts(items), self.inputs)
        weights = self.weights
        ok = usable_clips(built, self.kinds, weights)
        used = [g for g, idx in enumerate(self.groups) if any(weights[i] > 0 for i in idx)]
        parts = await asyncio.gather(*(
            self._member(g, {c: built[c] for c in self.columns[g]},
                         tuple(weights[i] for i in self.groups[g])) for g in used))
        sums = np.sum([s for s, _ in parts], axis=0, dtype=np.float32)
        weight_used = np.sum([u for _, u in parts], axis=0, dtype=np.float32)
        scores = run_folder.weighted_mean(
            run_folder.blend(sums, weight_used, sum(weights)), weights)
        cut = np.cumsum([p.n for p in items])[:-1]
        return list(zip(np.split(scores, cut), np.split(ok, cut)))

    async def _member(self, g: int, x: dict[str, np.ndarray],
                      weights: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(_RETRIES):
            try:
                return await self.members[g].score.remote(x, weights)
            except (RayActorError, ActorUnavailableError) as e:
                if attempt == _RETRIES - 1:
                    raise
                log.warning("member-%d replica failed (%s); retrying", g, type(e).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))

    async def _identify(self, clips: Sequence[Clip], top_k: int | None,
                        single: bool = False) -> list[dict[str, Any]]:
        try:  # lengths against the run's dims: this request's 422, before batching
            parts = clip_parts(clips, self.inputs.dims, single=single)
        except FieldError as e:
            raise RequestValidationError([{"loc": e.loc, "msg": e.msg, "type": "value_error"}]) from None
        scores, ok = await self._scores(parts)
        return answers(scores, ok, top_k or self.top_k, self.threshold,
                       np.diff(parts.faces.offsets), [c.clip for c in clips])

    @api.post("/identify", response_model=IdentifyResponse, openapi_extra=_body(IdentifyRequest))
    async def identify(self, request: Request) -> Response:
        """One clip's faces (and heads, bodies, audio) -> its top-k identities, or unknown."""
        clip = await _parse(request, IdentifyRequest)
        return _json((await self._identify([clip], clip.top_k, single=True))[0])

    @api.post("/identify/batch", response_model=BatchResponse, openapi_extra=_body(BatchRequest))
    async def identify_batch(self, request: Request) -> Response:
        """Many clips -> one answer per clip, in order."""
        batch = await _parse(request, BatchRequest)
        return _json({"results": await self._identify(batch.clips, batch.top_k)})

    @api.get("/search", response_model=SearchResponse)
    async def search(self, id: int = Query(description="identity id, 1..num_classes-1"),
                     k: int = Query(100, ge=1, le=MAX_SEARCH_K)) -> dict[str, Any]:
        """The top-k clips of identity `id` in the index, best first, with frame ranges."""
        self._refresh_index()
        if self.index is None:
            raise HTTPException(503, "no search index is loaded (start with --index / args.index)")
        if not 1 <= id < self.index.num_classes:
            raise HTTPException(404, f"unknown identity {id}: ids are 1..{self.index.num_classes - 1}")
        return {"id": id, "hits": self.index.top(id, k),
                "index_version": self.index.manifest["version"]}

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        """Liveness and the settings in force."""
        return {"status": "ok", "members": self.n_members, "member_deployments": len(self.groups),
                "input_kinds": list(dict.fromkeys(self.kinds)),
                "num_classes": self.spec.num_classes,
                "unknown_threshold": self.threshold, "threshold_source": self.threshold_source,
                "weights": self.weights, "top_k": self.top_k, "index": self.index_dir,
                "index_version": self.index.manifest["version"] if self.index else None,
                "replica": serve.get_replica_context().replica_id.unique_id}


# ------------------------------------------------------------------ applications


def build_app(run_dir: str | os.PathLike, index_dir: str | os.PathLike | None = None, *,
              members: dict[str, Any] | None = None, ingress: dict[str, Any] | None = None,
              members_per_deployment: int = 0):
    """The Serve application of a run folder (and optionally a search index).

    members / ingress: deployment options (autoscaling_config, max_ongoing_requests,
    ray_actor_options, user_config, ...) for every member deployment / the ingress.
    members_per_deployment: checkpoints per member deployment (0 = all in one).
    Raises predict.PredictError for a missing or malformed run folder.
    """
    run_dir = Path(run_dir).resolve()
    dirs = predict.read_run(run_dir).ensemble.member_dirs(run_dir)
    groups = member_groups(len(dirs), members_per_deployment)
    handles = [EnsembleMember.options(name=f"member-{g}", **(members or {}))
               .bind([str(dirs[i]) for i in idx])
               for g, idx in enumerate(groups)]
    index_dir = str(Path(index_dir).resolve()) if index_dir else None
    return IdentifyIngress.options(**(ingress or {})).bind(str(run_dir), handles, groups, index_dir)


def app_builder(args: AppArgs):
    """Application builder for `serve run` / `serve deploy` config files (see AppArgs)."""
    return build_app(args.run, args.index, members=args.members, ingress=args.ingress,
                     members_per_deployment=args.members_per_deployment)


# ------------------------------------------------------------------ config-file deploys


def serve_config(base: dict[str, Any], run_dir: str | os.PathLike,
                 index_dir: str | os.PathLike | None = None, *, port: int | None = None,
                 user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config (`serve deploy` schema; `base` is e.g. configs/serve.yaml loaded) for
    this run: its first application's args get absolute run/index paths; `port` and the
    ingress's `user_config` replace the base's when given."""
    cfg = copy.deepcopy(base)
    app = cfg["applications"][0]
    app["args"] = {**app.get("args", {}), "run": str(Path(run_dir).resolve()),
                   "index": str(Path(index_dir).resolve()) if index_dir else None}
    if port is not None:
        cfg.setdefault("http_options", {})["port"] = port
    if user_config is not None:
        deployments = app.setdefault("deployments", [])
        entry = next((d for d in deployments if d["name"] == IdentifyIngress.name), None)
        if entry is None:
            deployments.append(entry := {"name": IdentifyIngress.name})
        entry["user_config"] = user_config
    return cfg


def deploy_config(config: dict[str, Any], dashboard_url: str, timeout_s: float = 600.0) -> None:
    """Deploy `config` as `serve deploy` does (the dashboard's REST API), then wait until
    every application runs the new config. Only `user_config` changed: replicas are
    reconfigured in place. Raises RuntimeError when a deploy fails or times out."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    submitted = time.time()
    ServeSubmissionClient(url).deploy_applications(config)
    names = [a["name"] for a in config["applications"]]
    while True:
        apps = serve.status().applications
        states = [apps.get(n) for n in names]
        failed = [f"{n}: {a.message}" for n, a in zip(names, states) if a and a.status == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError("deploy failed: " + "; ".join(failed))
        if all(a and a.status == "RUNNING" and a.last_deployed_time_s >= submitted - 1
               and all(d.status == "HEALTHY" for d in a.deployments.values()) for a in states):
            return
        if time.time() - submitted > timeout_s:
            raise RuntimeError(f"deploy timed out after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)
