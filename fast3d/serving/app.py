"""The HTTP server: a FastAPI app on a Ray Serve deployment with dynamic batching.

Routes (OpenAPI at ``/openapi.json``, interactive at ``/docs``):

* ``POST /v1/reconstruct``: images (+ cameras) -> the 3DGS PLY (``format=ply``, the default) or
  the ``.splat`` layout (``format=splat``, :mod:`fast3d.io.splat`). The body is binary unless the
  request says ``Accept: application/json``: then a JSON object with the file in base64 and, when
  ``turntable`` is true, the turntable as a base64 GIF; when ``viewer`` is true, the ``.splat`` as
  ``splat_base64`` (the page's viewer reads it). Per-stage latencies (decode, queue, model,
  render, encode, total) come in the ``Server-Timing`` header (and ``latency_ms`` in JSON); the
  batch the request ran in, in ``X-Fast3d-Batch-Size``.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (model loaded and warmed up; a replica
  only receives traffic once its constructor, which loads and warms the model, returned).
* ``GET /metrics``: Prometheus text of every replica, each series labelled with its ``replica``
  (:mod:`fast3d.serving.metrics`: replicas push to a board the scraped replica merges from).
* ``GET /``: the upload page (``fast3d/serving/static``): the turntable, the file to download and
  an interactive splat viewer (gsplat.js, vendored in ``static/vendor`` with its licence and
  ``fetch.sh``, which re-fetches it pinned).

Batching: concurrent requests that reach a replica within ``max_wait_ms`` of the first are run
as one batch of at most ``max_batch`` (Ray Serve's ``@serve.batch``), one forward and one
rasterization. Bounds: each replica takes ``max_ongoing_requests`` at once and each proxy queues
``max_queued_requests`` more; past that Ray answers 503 with ``Retry-After``. A request still
waiting or running after ``deadline_s`` (or the smaller ``X-Deadline-Ms`` the client sends) gets
504. Bodies over ``max_body_bytes`` get 413. With an API key every route but ``/``, its static
files, ``/healthz``, ``/readyz`` and the API's description (``/openapi.json``, ``/docs``: the
routes and their parameters, nothing of the model, the requests or the metrics) needs
``Authorization: Bearer KEY`` (compared in constant time).
"""

# No ``from __future__ import annotations`` here: Ray Serve's class-based FastAPI views read the
# route methods' annotations (``request: Request``) as objects.
import asyncio
import base64
import hmac
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from fast3d.serving.pipelines import GeneratePipeline, RequestError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8", "viewer.js": "text/javascript; charset=utf-8",
                "vendor/gsplat.js": "text/javascript; charset=utf-8", "vendor/LICENSE.gsplat": "text/plain; charset=utf-8"}
MEDIA = {"ply": "application/octet-stream", "splat": "application/octet-stream"}
FILENAMES = {("lgm", "ply"): "gaussians.ply", ("lrm", "ply"): "points.ply"}


@dataclass
class ServeOptions:
    """What a replica needs (the CLI's flags)."""
    checkpoint: str
    max_batch: int = 8
    max_wait_ms: float = 5.0
    deadline_s: float = 60.0
    max_body_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4 * 1024 * 1024   # per image: 2048^2, 8x what the models take; 8 images decode to <= 512 MiB
    turntable_frames: int = 12
    api_key: str | None = None
    device: str | None = None
    threads: int | None = None
    fixed_batch: bool | None = None   # None: on the CPU (see fast3d.serving.pipelines)
    mv_model: str | None = None       # serve the generate model: this mvdiff model, then `checkpoint`
    views: list[int] | None = None    # with mv_model: the views the reconstructor takes (None: all)
    dtype: str = "fp32"               # fp32 | bf16: the network under bf16 autocast (fast3d.serving.accel)
    compile: bool = False             # torch.compile the model's forward
    cuda_graphs: bool = False         # CUDA graphs of the forward and turntable render per batch size (CUDA, LGM)

    def validate(self) -> "ServeOptions":
        from fast3d import checks

        checks.positive_int("max_batch", self.max_batch)
        checks.positive_int("max_body_bytes", self.max_body_bytes)
        checks.positive_int("max_pixels", self.max_pixels)
        checks.positive_int("turntable_frames", self.turntable_frames)
        checks.positive_int("threads", self.threads, optional=True)
        checks.one_of("dtype", self.dtype, ("fp32", "bf16"))
        checks.boolean("compile", self.compile)
        checks.boolean("cuda_graphs", self.cuda_graphs)
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 10_000):
            raise ValueError(f"max_wait_ms must be a number in [0, 10000]; got {self.max_wait_ms!r}")
        if not (isinstance(self.deadline_s, (int, float)) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be a positive number; got {self.deadline_s!r}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError("api_key must be at least 16 characters")
        return self


app = FastAPI(title="fast3d serve", description=__doc__.split("\n\n")[0],
              version="1", docs_url="/docs", openapi_url="/openapi.json")

_SAMPLING = {k: {"type": "integer" if t is int else "number", "minimum": lo, "maximum": hi,
                 "description": "the generate model's sampling (fast3d serve --mv-model) only"}
             for k, (t, lo, hi) in GeneratePipeline.params.items()}
_RECONSTRUCT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "one file part per view, in order (LGM: 4, LRM: 1, generate: 1)"},
        "cameras": {"type": "string", "description": "JSON: {viewmats|c2w, Ks} (LRM also azimuth_deg, ...)"},
        "format": {"type": "string", "enum": ["ply", "splat"]},
        "turntable": {"type": "boolean", "description": "render a turntable GIF (JSON responses only)"},
        "viewer": {"type": "boolean", "description": "add the .splat as splat_base64 (JSON responses only)"},
        **_SAMPLING}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
        "cameras": {"type": "object"}, "format": {"type": "string", "enum": ["ply", "splat"]},
        "turntable": {"type": "boolean"}, "viewer": {"type": "boolean"}, **_SAMPLING}}}}},
    "responses": {"200": {"description": "the file (binary), or JSON with Accept: application/json",
                          "content": {"application/octet-stream": {}, "application/json": {}}},
                  "400": {"description": "malformed input: {error: {field, message, kind}}"},
                  "401": {"description": "missing or wrong API key"}, "413": {"description": "body too large"},
                  "415": {"description": "unsupported content type"},
                  "503": {"description": "queue full (Retry-After)"}, "504": {"description": "deadline passed"}}}


def _error(e: RequestError, metrics=None) -> JSONResponse:
    if metrics is not None:
        metrics.error(e.kind)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError("content-length", f"not an integer: {declared!r}") from None
        if n > limit:
            raise RequestError("body", f"{n} bytes is over the limit of {limit}", status=413, kind="too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError("body", f"over the limit of {limit} bytes", status=413, kind="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _gif(frames) -> bytes:  # [F, 3, H, W] in [0, 1] -> an animated GIF, 12 frames a second
    from PIL import Image

    from fast3d.io.images import to_uint8

    imgs = [Image.fromarray(a) for a in to_uint8(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=83, loop=0)
    return buf.getvalue()


@serve.deployment(graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(app)
class Fast3dServer:
    """One replica: the model, loaded and warmed up in the constructor, behind the HTTP routes."""

    def __init__(self, options: dict):
        import torch

        from fast3d.serving import localray
        from fast3d.serving.metrics import Metrics
        from fast3d.serving.pipelines import load_pipeline

        localray.loopback_replica_grpc()   # before Serve starts the replica's gRPC server, after this constructor
        ctx = serve.get_replica_context()

        self.opts = ServeOptions(**options).validate()
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.pipe = load_pipeline(self.opts.checkpoint, self.opts.max_batch, self.opts.turntable_frames,
                                  self.opts.device, self.opts.fixed_batch, mv_model=self.opts.mv_model,
                                  views=self.opts.views, dtype=self.opts.dtype, compile=self.opts.compile,
                                  cuda_graphs=self.opts.cuda_graphs)
        self.batched.set_max_batch_size(self.opts.max_batch)
        self.batched.set_batch_wait_timeout_s(self.opts.max_wait_ms / 1e3)
        # Every torch call of the replica (request preparation, batches) runs on this one thread: one
        # OpenMP team, not one per worker thread fighting over the cores.
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fast3d-torch")
        # the replica label: Serve's replica id (unique in the application, on every node)
        self.metrics = Metrics(ctx.replica_id.unique_id, self.pipe.kind)
        self.app_name, self._board = ctx.app_name, None
        self.waiting: set = set()  # requests queued for a batch that has not started
        self.metrics.track_queue(lambda: len(self.waiting))
        self.key = self.opts.api_key.encode() if self.opts.api_key else None
        self._push_once()   # the board exists (its actor started) before this replica takes traffic
        threading.Thread(target=self._push_metrics, daemon=True, name="fast3d-metrics").start()

    def _metrics_board(self):
        from fast3d.serving.metrics import board

        if self._board is None:
            self._board = board(self.app_name)
        return self._board

    def _push_once(self) -> None:
        """This replica's exposition to the application's board (so a scrape of any replica shows it)."""
        import ray

        try:
            ray.get(self._metrics_board().put.remote(self.metrics.labels["replica"], self.metrics.exposition()),
                    timeout=60)
        except Exception as e:  # the board died with the replica that made it: the next push makes another
            logging.getLogger(__name__).warning("fast3d metrics: push to the board failed (%s)", e)
            self._board = None

    def _push_metrics(self) -> None:
        from fast3d.serving.metrics import PUSH_S

        while True:
            time.sleep(PUSH_S)
            self._push_once()

    def _authorize(self, request: Request) -> None:
        if self.key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise RequestError("authorization", "missing or wrong API key (Authorization: Bearer KEY)", status=401,
                               kind="auth")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batched(self, items: list) -> list:
        """[(Prepared, time queued, token)] -> [(Result, ms queued)]: one pipeline run on the torch
        thread (the event loop keeps parsing and queueing requests meanwhile)."""
        start = time.perf_counter()
        for _, _, token in items:
            self.waiting.discard(token)
        self.metrics.observe_batch(len(items))
        results = await asyncio.get_running_loop().run_in_executor(self.torch_thread, self.pipe.run,
                                                                   [p for p, _, _ in items])
        return [(r, (start - t) * 1e3) for r, (_, t, _) in zip(results, items)]

    @app.post("/v1/reconstruct", openapi_extra=_RECONSTRUCT_BODY, summary="images -> 3D Gaussians (PLY or .splat)")
    async def reconstruct(self, request: Request) -> Response:
        t0 = time.perf_counter()
        status = 500
        self.metrics.flight(1)
        try:
            response = await self._reconstruct(request, t0)
            status = response.status_code
            return response
        except RequestError as e:
            status = e.status
            return _error(e, self.metrics)
        except Exception as e:  # a bug or a failed batch: the client gets a JSON 500, the server keeps serving
            self.metrics.error("internal")
            return JSONResponse({"error": {"field": None, "message": f"{type(e).__name__}: {e}", "kind": "internal"}},
                                status_code=500)
        finally:
            self.metrics.flight(-1)
            self.metrics.observe_request(time.perf_counter() - t0, status)

    async def _reconstruct(self, request: Request, t0: float) -> Response:
        from fast3d.serving.request import parse_request

        self._authorize(request)
        deadline_s = self.opts.deadline_s
        asked = request.headers.get("x-deadline-ms")
        if asked is not None:
            try:
                deadline_s = min(deadline_s, float(asked) / 1e3)
            except ValueError:
                raise RequestError("x-deadline-ms", f"must be a number of milliseconds; got {asked!r}") from None
            if not deadline_s > 0:
                raise RequestError("x-deadline-ms", f"must be positive; got {asked!r}")
        deadline = t0 + deadline_s
        body = await _read_body(request, self.opts.max_body_bytes)
        req = await asyncio.get_running_loop().run_in_executor(
            self.torch_thread, parse_request, request.headers.get("content-type"), body, self.opts.max_pixels,
            self.opts.max_body_bytes)
        json_out = "application/json" in request.headers.get("accept", "")
        for flag in ("turntable", "viewer"):
            if getattr(req, flag) and not json_out:
                raise RequestError(flag, f"{'a turntable' if flag == 'turntable' else 'the viewer copy'} comes only "
                                         f"in a JSON response (Accept: application/json)")
        images = req.rgba if self.pipe.takes_rgba else req.images
        prepared = await asyncio.get_running_loop().run_in_executor(self.torch_thread, self.pipe.prepare, images,
                                                                    req.cameras, req.turntable, req.params)
        token = object()
        self.waiting.add(token)
        try:
            result, queued_ms = await asyncio.wait_for(self.batched((prepared, time.perf_counter(), token)),
                                                       timeout=max(deadline - time.perf_counter(), 0))
        except TimeoutError:
            self.waiting.discard(token)
            raise RequestError("deadline", f"not served within the deadline of {deadline_s:g} s",
                               status=504, kind="deadline") from None
        t = time.perf_counter()
        data = self.pipe.encode(result.scene, req.format)
        gif = _gif(result.turntable) if result.turntable is not None else None
        latency = {"decode": req.decode_ms, "queue": queued_ms, **result.latency_ms,
                   "encode": (time.perf_counter() - t) * 1e3}
        latency["total"] = (time.perf_counter() - t0) * 1e3
        for stage, ms in latency.items():
            if stage != "total":
                self.metrics.observe_stage(stage, ms)
        headers = {"Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in latency.items()),
                   "X-Fast3d-Batch-Size": str(result.batch_size), "X-Fast3d-Model": self.pipe.kind}
        if json_out:
            body = {"model": self.pipe.kind, "format": req.format, "bytes": len(data),
                    "data_base64": base64.b64encode(data).decode("ascii"), "batch_size": result.batch_size,
                    "latency_ms": latency}
            if gif is not None:
                body["turntable_gif_base64"] = base64.b64encode(gif).decode("ascii")
            if req.viewer:
                splat = data if req.format == "splat" else self.pipe.encode(result.scene, "splat")
                body["splat_base64"] = base64.b64encode(splat).decode("ascii")
            return JSONResponse(body, headers=headers)
        name = FILENAMES.get((self.pipe.output_kind, req.format), f"{self.pipe.output_kind}.{req.format}")
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(data, media_type=MEDIA[req.format], headers=headers)

    @app.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        return {"ok": True}

    @app.get("/readyz", summary="readiness: the model is loaded and warmed up")
    async def readyz(self) -> dict:
        return {"ready": True, "pid": os.getpid(), "replica": self.metrics.labels["replica"], **self.pipe.describe()}

    @app.get("/metrics", summary="Prometheus metrics of every replica (each series labelled with its replica)")
    async def metrics_route(self, request: Request) -> Response:
        from fast3d.serving.metrics import merge

        try:
            self._authorize(request)
        except RequestError as e:
            return _error(e, self.metrics)
        try:
            texts = await asyncio.wait_for(self._metrics_board().collect.remote(), timeout=10)
        except Exception as e:  # no board now (it died with its replica): this replica's own metrics
            logging.getLogger(__name__).warning("fast3d metrics: the board did not answer (%s)", e)
            self._board, texts = None, {}
        texts[self.metrics.labels["replica"]] = self.metrics.exposition()   # its own, fresh
        return Response(merge(list(texts.values())), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index(self) -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:  # a fixed list: no path from the request reaches the file system
            return JSONResponse({"error": {"field": "name", "message": "no such file", "kind": "invalid"}},
                                status_code=404)
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])


def application(options: ServeOptions, replicas: int = 1, max_ongoing_requests: int | None = None,
                max_queued_requests: int | None = None, retry_after_s: float = 1.0,
                num_cpus: float | None = None, num_gpus: float | None = None):
    """The bound Ray Serve application (``serve.run`` it).

    Args:
        options: the replica's options (validated here).
        replicas: replicas of the model.
        max_ongoing_requests: requests a replica holds at once (default 2 x max_batch: one batch
            running, the next one forming).
        max_queued_requests: requests each proxy queues beyond those (default 8 x max_batch);
            more get 503 with ``Retry-After: retry_after_s``.
        num_cpus, num_gpus: Ray resources of a replica (default: 1 GPU where CUDA is, else 1 CPU).
    """
    from ray.serve.config import BackpressureConfig

    from fast3d import checks

    options.validate()
    replicas = checks.positive_int("replicas", replicas)
    ongoing = checks.positive_int("max_ongoing_requests", max_ongoing_requests or 2 * options.max_batch)
    queued = checks.positive_int("max_queued_requests", max_queued_requests or 8 * options.max_batch)
    if num_gpus is None:
        from fast3d.inference.common import default_device

        num_gpus = 1 if default_device(options.device).type == "cuda" else 0
    actor = {"num_cpus": 1 if num_cpus is None else num_cpus, "num_gpus": num_gpus}
    return Fast3dServer.options(
        num_replicas=replicas, max_ongoing_requests=ongoing, max_queued_requests=queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=retry_after_s),
        graceful_shutdown_timeout_s=options.deadline_s, ray_actor_options=actor,
    ).bind(asdict(options))


def options_json(options: ServeOptions) -> str:
    """The options as JSON, the API key masked (for logs)."""
    d = asdict(options)
    if d["api_key"]:
        d["api_key"] = "***"
    return json.dumps(d)
