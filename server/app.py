"""The FastAPI application: thin routes over the job store and the device worker.

``create_app(settings)`` builds the app; its lifespan loads and warms the configured models,
starts the worker, and on shutdown stops taking jobs, lets the running one finish and cancels the
queued ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import platform
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import diffusers
import torch
from accel_diffusion.server.auth import api_key_matches, bearer_key, key_owner
from accel_diffusion.server.hosts import HostAndOriginCheck
from accel_diffusion.server.images_fast_path import ImagesFastPath
from accel_diffusion.server.jobs import (
    DrainingError,
    Job,
    JobStatus,
    JobStore,
    OutputOptions,
    QueueFullError,
    QuotaExceededError,
)
from accel_diffusion.server.metrics import ServerMetrics, count_error, server_state
from accel_diffusion.server.schemas import (
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    JobCreateRequest,
)
from accel_diffusion.server.settings import ServerSettings
from accel_diffusion.server.stream import stream_router
from accel_diffusion.server.worker import DeviceWorker, error_body
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from accel_diffusion import __version__
from accel_diffusion.engine import Engine, compiled
from accel_diffusion.engine.engine import PreparedStrategy, check_limits, check_request
from accel_diffusion.errors import InvalidRequestError, UnknownModelError
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.models.registry import ModelRegistry, ModelSpec
from accel_diffusion.pareto.auto import front_summary, resolve_auto
from accel_diffusion.pareto.profile import use_profiles_dir
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.searched import list_artifacts, use_schedules_dir
from accel_diffusion.strategy import GenerationRequest
from accel_diffusion.stream import StreamSession
from accel_diffusion.text import replace_unencodable

log = logging.getLogger("accel_diffusion.server")
TERMINAL_EVENTS = ("job.completed", "job.failed", "job.cancelled")
DISCONNECT_CHECK_S = 0.5  # a waiting request is woken when its job ends, and checks its client this often
# by error type; else 500
ERROR_STATUS = {"invalid_request_error": 400, "model_not_found": 404, "gpu_oom": 503, "rank_lost": 503}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 500, 503)
}


class StrategyChecks:
    """``check_request``'s verdicts, kept: a server accepting a request with the same model, strategy, steps
    and mode (txt2img or img2img) as one it accepted before does not build and check its components again.

    A strategy's check builds every component (each parameter validated) and looks at the model directory:
    on a 2-core CPU the largest part of accepting a request (``benchmarks/server_hops.py``: 0.29 -> 0.15 ms
    from the validated request to the queued job). The verdict depends on the request's model, strategy,
    steps, mode and ``ar_iterations`` and on files read once (the model directory, a searched schedule's
    artifact: the engine prepares the strategy again when it runs the job), except a ``runtime`` component's
    (a patch-parallel group can change): those are checked every time. Refusals are not kept (they raise).
    At most ``max_entries`` are kept, the oldest dropped first."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._prepared: dict[tuple[Any, ...], PreparedStrategy] = {}
        self._lock = threading.Lock()

    def prepared(self, spec: ModelSpec, request: GenerationRequest) -> PreparedStrategy:
        """``check_request(spec, request)``, or what it returned for an equal request before."""
        if request.strategy.runtime is not None:
            return check_request(spec, request)
        key = (spec.id, request.strategy.model_dump_json(), request.steps, request.init_image is None,
               request.ar_iterations)
        with self._lock:
            prepared = self._prepared.get(key)
        if prepared is None:
            prepared = check_request(spec, request)  # raises a refusal
            with self._lock:
                if len(self._prepared) >= self.max_entries:
                    del self._prepared[next(iter(self._prepared))]
                self._prepared[key] = prepared
        return prepared


class ServerState:
    """What the routes share, held on ``app.state.server`` (no module globals)."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry, ranks: Any = None) -> None:
        # engine_acceleration unset: compile where it measured faster (the served models' devices), not
        # under a patch-parallel group (its requests run eagerly: engine/engine.py generate)
        settings = settings.resolve_acceleration([] if ranks is not None else served_device_types(registry, settings))
        self.settings = settings
        self.registry = registry
        self.limits = settings.request_limits()
        self.metrics = ServerMetrics()
        self.jobs = JobStore(settings.job_ttl_s, settings.max_finished_jobs, settings.max_job_image_bytes,
                             key_max_finished=settings.key_max_finished_jobs,
                             key_max_image_bytes=settings.key_max_job_image_bytes,
                             max_listeners=settings.max_sse_listeners, key_max_listeners=settings.key_max_sse_listeners,
                             job_max_listeners=settings.max_sse_listeners_per_job)
        # limits=None: requests are checked against this server's limits when they are submitted
        engine: Any = Engine(registry, limits=None, acceleration=settings.engine_acceleration,
                             buckets=settings.compile_buckets)
        self.ranks = ranks  # rank 0 of a multi-rank server: its RankGroup (server/ranks.py), else None
        if ranks is not None:
            from accel_diffusion.server.ranks import LeaderEngine
            engine = LeaderEngine(engine, ranks)
        self.worker = DeviceWorker(engine, settings.queue_max, self.metrics,
                                   settings.max_batch_size, settings.max_batch_wait_ms, settings.batch_invariant,
                                   key_max_running=settings.key_max_running_jobs, stream_share=settings.stream_share)
        self.api_keys = [k.encode() for k in settings.all_api_keys()]
        self.strategy_checks = StrategyChecks()
        self.ready = False
        self.draining = False
        self.stream_sessions = 0
        self.stream_connections: dict[str, Any] = {}  # session id -> its WebSocket connection (MJPEG viewers)
        self.redis: Any = None  # queue_backend = "redis": its RedisServing (server/redis_api.py), made in lifespan

    @property
    def idle(self) -> bool:
        return self.worker.queue_depth == 0 and not self.worker.busy

    @property
    def default_model(self) -> str:
        return self.settings.served_models[0]

    def check_model(self, request: GenerationRequest) -> None:
        """The model is served here, the request's strategy can run on it, and the request with the
        model's defaults filled in (steps, size) is within the limits (a 400 now, not a failed job)."""
        if request.model not in self.settings.served_models:
            raise UnknownModelError("model", f"{request.model!r} is not served here", self.settings.served_models)
        prepared = self.strategy_checks.prepared(self.registry.spec(request.model), request)
        check_limits(self.registry.get(request.model), request, self.limits, prepared)  # served models are loaded

    def resolve_auto(self, request: GenerationRequest) -> GenerationRequest:
        """``"strategy": "auto"`` resolved on this server's device among its served models (a 400 when nothing
        fits); the job keeps the concrete request, so batching, events and the result see what runs."""
        if not request.strategy.is_auto:
            return request
        if request.model not in self.settings.served_models:
            raise UnknownModelError("model", f"{request.model!r} is not served here", self.settings.served_models)
        key = self.settings.profile_device
        if self.settings.role == "api":  # an API-only replica loads no model: the workers' device is a setting
            if key is None:
                raise InvalidRequestError("strategy", "'auto' on an API-only replica needs the setting profile_device "
                                          "(the workers' device key, e.g. cuda-nvidia-h200); set it, or send an "
                                          "explicit strategy")
            return resolve_auto(request, "cpu", models=self.settings.served_models, key=key,
                                acceleration=self.settings.engine_acceleration or "none")
        model = self.registry.get(request.model)
        return resolve_auto(request, model.device, models=self.settings.served_models, default_size=model.default_size,
                            key=key, acceleration=self.settings.engine_acceleration or "none")

    def submit(self, request: GenerationRequest, output: OutputOptions, owner: str | None = None,
               delivered_by_caller: bool = False) -> tuple[Job, int]:
        if self.draining:
            raise DrainingError("the server is shutting down; retry on another replica")
        if self.ranks is not None and self.ranks.lost is not None:
            raise DrainingError(f"the patch-parallel group is lost: {self.ranks.lost}")
        request = self.resolve_auto(request)
        self.check_model(request)
        if self.jobs.count(owner, JobStatus.QUEUED) >= self.settings.key_max_queued_jobs:
            raise QuotaExceededError("key_max_queued_jobs", self.settings.key_max_queued_jobs,
                                     "jobs queued for this API key", max(1, round(self.worker.last_job_seconds)))
        job = Job(request=request, output=output, owner=owner, delivered_by_caller=delivered_by_caller)
        position = self.worker.submit(job)
        self.jobs.add(job)
        return job, position


def served_registry(settings: ServerSettings) -> ModelRegistry:
    registry = ModelRegistry.from_file(settings.models_file)
    missing = [m for m in settings.served_models if m not in registry.ids()]
    if missing:
        raise ValueError(f"models {missing} are not in the model registry (known: {registry.ids()})")
    specs = [registry.spec(m) for m in settings.served_models]
    if settings.device != "auto":
        specs = [s.model_copy(update={"device": settings.device}) for s in specs]
    return ModelRegistry(specs)


def served_device_types(registry: ModelRegistry, settings: ServerSettings) -> list[str]:
    """The device type ("cpu", "cuda", "mps") each served model loads on ("auto": CUDA when present)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return [auto if registry.spec(m).device == "auto" else torch.device(registry.spec(m).device).type
            for m in settings.served_models]


def warm_up(state: ServerState) -> None:
    """Load every served model and run one short generation on it (so the first request is not slow).

    With ``engine_acceleration = "compile"`` first build every compile bucket's graph of each SD model's
    UNet and decode at its default size (``compiled.warm``; logged per graph with its time), so that
    compilation fails at startup, if it fails, and no request waits for it. With
    ``stream_acceleration = "compile"``, then the default stream session's graphs (img2img, two steps,
    RCFG self: 2 UNet rows; its autoencoder's decode). The warm-up generation comes last and runs the
    built graphs. Other shapes run eagerly while their graph is built in the background."""
    for model_id in state.settings.served_models:
        log.info("loading %s…", model_id)
        model = state.registry.get(model_id)
        log.info("loaded %s in %.1f s (%s, %s)", model_id, model.load_seconds, model.device,
                 str(model.dtype).removeprefix("torch."))
        if state.settings.engine_acceleration == "compile" and model.family in ("sd", "sdxl"):
            buckets = state.settings.compile_buckets
            log.info("compiling %s: UNet and decode graphs for row buckets %s at %dx%d…", model_id, buckets,
                     *model.default_size)
            begin = time.perf_counter()
            model.compiled_model(tuple(buckets))
            for graph in compiled.warm(model):
                log.info("compiled %s %s graph of %d rows in %.1f s", model_id, graph["call"], graph["rows"],
                         graph["seconds"])
            log.info("compiled %s's %d buckets in %.1f s", model_id, len(buckets), time.perf_counter() - begin)
        student = model.spec.default_strategy.student is not None
        # the default stream session (img2img, two steps, RCFG) is not one a student runs: its sessions build
        # their graphs when opened
        if state.settings.stream_acceleration_used != "none" and model.family == "sd" and not student:
            log.info("compiling %s's graphs for stream sessions (stream_acceleration = %r)…", model_id,
                     state.settings.stream_acceleration_used)
            begin = time.perf_counter()
            session = StreamSession(model, "warm-up", acceleration="compile", limits=state.limits)
            session.wait_for_graphs()
            log.info("compiled %s's stream session graphs in %.1f s", model_id, time.perf_counter() - begin)
        # after the graphs: a warm-up generation before them would ask the builder for the very graphs
        # compiled.warm then builds, and run eagerly beside that compile
        if state.settings.warmup_steps and model.family in ("sd", "sdxl"):
            # a student runs only the step counts it was trained for: warm it up at its default
            steps = model.spec.default_steps if student else state.settings.warmup_steps
            log.info("warming up %s (%d steps)…", model_id, steps)
            state.worker.engine.generate(GenerationRequest.create(
                model=model_id, prompt="warm-up", seed=0, steps=steps),
                batch_invariant=state.settings.batch_invariant)


def create_app(settings: ServerSettings | None = None, ranks: Any = None) -> FastAPI:
    """The app; ``ranks``: rank 0's RankGroup when it serves a multi-rank group (server/ranks.py)."""
    settings = settings or ServerSettings()
    use_schedules_dir(settings.schedules_dir)
    use_profiles_dir(settings.profiles_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        begin = time.perf_counter()
        compiled.set_cache_dir(settings.inductor_cache_dir)
        state = ServerState(settings, served_registry(settings), ranks)
        app.state.server = state
        if settings.engine_acceleration is None and settings.role != "api":
            log.info("engine_acceleration = %r: the default on this server's devices (set engine_acceleration = "
                     "'none' to run eagerly)", state.settings.engine_acceleration)
        if settings.role != "api":  # an API-only replica (Redis backend) loads no model
            state.worker.start(prepare=lambda: warm_up(state))  # on the worker thread: all model work stays there
            await state.worker.wait_prepared()
        if settings.queue_backend == "redis":
            from accel_diffusion.server.redis_api import RedisServing
            state.redis = RedisServing(state)
            state.redis.start()
        state.ready = True
        log.info("ready in %.1f s: serving %s", time.perf_counter() - begin, ", ".join(settings.served_models))
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            if state.redis is not None:
                await asyncio.to_thread(state.redis.stop)
                await state.redis.aclose()
            if settings.role != "api":
                await asyncio.to_thread(state.worker.stop, 600)
            if getattr(app.state, "access_log", None) is not None:
                app.state.access_log.flush()  # the last requests' lines

    # /docs (Swagger UI) and /redoc with their scripts served from /docs/static (fastapi-offline ships them):
    # FastAPI's own pages load them from a CDN, and are blank on a machine offline
    app = FastAPIOffline(title="accel-diffusion", version=__version__, lifespan=lifespan, static_url="/docs/static",
                         default_response_class=EncodableJSONResponse,
                         description="Diffusion generation with interchangeable acceleration strategies: an "
                                     "OpenAI-compatible images API and a native jobs API with progress events.")
    app.state.settings = settings  # for whoever runs the app (uvicorn's limits follow it: process.py)
    if settings.queue_backend != "redis":  # innermost: inside CORS, the host check, the request id and limits
        app.add_middleware(ImagesFastPath, run_images=_run_images)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"])
    app.add_middleware(HostAndOriginCheck, settings=settings)  # outside CORS: a refused Origin gets no CORS answer
    app.add_middleware(RequestIdAndLimits, max_body_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    app.include_router(_open_routes())
    api_routes = _api_routes()
    if settings.queue_backend == "redis":  # the jobs and images routes on the shared queue
        from accel_diffusion.server.redis_api import redis_api_routes
        api_routes = redis_api_routes(api_routes)
    app.include_router(api_routes, dependencies=[Depends(require_api_key)])
    app.include_router(stream_router())  # checks API keys itself (browsers cannot set WebSocket headers)
    web = resources.files("accel_diffusion.clients") / "web"
    if web.is_dir():  # the live img2img page (clients/web): static, its API calls carry the key
        app.mount("/web", StaticFiles(directory=str(web), html=True), name="web")

        @app.get("/", include_in_schema=False)
        async def home() -> RedirectResponse:
            return RedirectResponse("/web/")
    return app


# ---- plumbing -------------------------------------------------------------------------------

# The dependencies are coroutines although they never wait: FastAPI runs a plain ``def`` dependency in its
# thread pool, and those hand-offs (loop -> pool thread -> loop, and the GIL each way) were most of a
# synchronous request's time outside the engine (benchmarks/server_hops.py).

async def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


async def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    keys = request.app.state.server.api_keys
    if not keys:
        return
    token = bearer_key(authorization)
    if token is None or not api_key_matches(token, keys):
        raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)")
    request.state.job_owner = key_owner(token)


def get_owner(request: Request) -> str | None:
    """The caller's jobs owner; None without API keys (then every caller sees every job)."""
    return getattr(request.state, "job_owner", None)


async def _owner(request: Request) -> str | None:
    return get_owner(request)


Owner = Annotated[str | None, Depends(_owner)]


class EncodableJSONResponse(JSONResponse):
    """JSON that always encodes: a lone UTF-16 surrogate that got past validation (a job kept from before
    it, a field name quoted in an error) is written as U+FFFD, instead of failing the response with a
    500 (for every caller of ``GET /v1/jobs`` while such a job is kept)."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return replace_unencodable(text).encode("utf-8")


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return EncodableJSONResponse({"error": {"type": type_, "code": type_, "message": message, "param": param}},
                                 status_code=status, headers=headers)


class BodyTooLarge(HTTPException):
    """Raised by the body reader once a (chunked) body passes ``max_body_bytes``; FastAPI lets an
    HTTPException out of its body parsing as it is, so it answers 413."""


class InvalidJsonBody(HTTPException):
    """A JSON body the bounded parser refused. An HTTPException, so that FastAPI's body reading lets it
    out as it is (it turns any other exception into a bare 400); answered as the error it carries."""

    def __init__(self, error: InvalidRequestError) -> None:
        super().__init__(400, str(error))
        self.error = error


class BoundedJsonRequest(Request):
    """A request whose JSON body goes through ``parse_json`` (bounded size and nesting depth), like every
    other JSON the server reads, instead of Starlette's plain ``json.loads``."""

    async def json(self) -> Any:
        if not hasattr(self, "_bounded_json"):
            try:
                self._bounded_json = parse_json(await self.body(), "body",
                                                max_bytes=self.app.state.settings.max_body_bytes)
            except InvalidRequestError as exc:
                raise InvalidJsonBody(exc) from None
        return self._bounded_json


class BoundedJsonRoute(APIRoute):
    """The route class of every router with bodies: its handler (FastAPI's body parsing included) sees a
    BoundedJsonRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded


class RequestIdAndLimits:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the
    routes): echo or create X-Request-Id, refuse bodies above the limit, time every request, and record each
    response for ``app.state.access_log`` when the server has one (``server/access_log.py``); an exception that
    leaves no response is recorded as the 500 the server answers it with."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        begin = time.perf_counter()
        access_log = getattr(scope["app"].state, "access_log", None)
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
                if access_log is not None:
                    access_log.record(scope, message["status"])
            await send(message)

        length = headers.get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.max_body_bytes):
            count_error(scope.get("app"), "request_too_large")
            response = error_response(413, "request_too_large",
                                      f"body is {length.decode()} bytes; at most {self.max_body_bytes}")
            await response(scope, receive, send_with_id)
            return
        received = 0

        async def counted_receive() -> dict[str, Any]:  # a chunked body has no Content-Length to check
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(413, f"body is over {self.max_body_bytes} bytes")
            return message

        try:
            await self.app(scope, counted_receive, send_with_id)
        except Exception:
            if access_log is not None and not started:  # the server-error middleware answers it
                access_log.record(scope, 500)
            raise
        finally:
            state = server_state(scope.get("app"))
            route = scope.get("route")
            if state is not None:
                state.metrics.request_seconds.labels(route=getattr(route, "path", "other")).observe(
                    time.perf_counter() - begin)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequestError)
    async def invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        count_error(request.app, exc.error_type)
        body = error_body(exc)
        return error_response(ERROR_STATUS.get(body["type"], 400), body["type"], body["message"], body["param"])

    @app.exception_handler(InvalidJsonBody)
    async def invalid_json_body(request: Request, exc: InvalidJsonBody) -> JSONResponse:
        return await invalid_request(request, exc.error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        count_error(request.app, "invalid_request_error")
        return error_response(400, "invalid_request_error", f"{param or 'body'}: {first.get('msg')}", param)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        count_error(request.app, "queue_full")
        return error_response(429, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(QuotaExceededError)
    async def quota_exceeded(request: Request, exc: QuotaExceededError) -> JSONResponse:
        count_error(request.app, "quota_exceeded")
        return error_response(429, "quota_exceeded", str(exc), exc.quota,
                              headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(DrainingError)
    async def draining(request: Request, exc: DrainingError) -> JSONResponse:
        count_error(request.app, "unavailable")
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (unknown route, 405)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                 413: "request_too_large", 503: "unavailable"}
        kind = kinds.get(exc.status_code, "http_error")
        count_error(request.app, kind)
        return error_response(exc.status_code, kind, str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.headers.get("x-request-id", "")
        log.exception("unhandled error (request %s)", request_id)
        count_error(request.app, "internal_error")
        return error_response(500, "internal_error", "internal error; see the server log")


# ---- routes ---------------------------------------------------------------------------------

def _open_routes() -> APIRouter:
    router = APIRouter(route_class=BoundedJsonRoute)

    @router.get("/health/live", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def live(request: Request) -> Any:
        ranks = getattr(getattr(request.app.state, "server", None), "ranks", None)
        if ranks is not None and ranks.lost is not None:  # a multi-rank server is not repaired in place: restart
            return error_response(503, "unavailable", f"the patch-parallel group is lost: {ranks.lost}")
        return {"status": "alive"}

    @router.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready(state: State) -> Any:
        if state.ranks is not None and state.ranks.lost is not None:  # a multi-rank server lost a rank
            return error_response(503, "unavailable", f"the patch-parallel group is lost: {state.ranks.lost}")
        if state.ready and not state.draining and state.redis is not None:  # ready while Redis answers
            with contextlib.suppress(Exception):
                if await asyncio.to_thread(state.redis.queue.ping):
                    return {"status": "ready", "models": state.settings.served_models}
            return error_response(503, "unavailable", "the job store (Redis) is unreachable",
                                  headers={"Retry-After": "2"})
        if state.ready and not state.draining:
            return {"status": "ready", "models": state.settings.served_models}
        return error_response(503, "unavailable", "draining" if state.draining else "loading models")

    @router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics(state: State) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/version", tags=["health"])
    async def version() -> dict[str, Any]:
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"accel_diffusion": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "python": platform.python_version(), "cuda": torch.version.cuda, "gpus": gpus}

    return router


def _api_routes() -> APIRouter:
    router = APIRouter(responses=ERROR_RESPONSES, route_class=BoundedJsonRoute)

    @router.get("/v1/models", tags=["models"])
    async def models(state: State) -> dict[str, Any]:
        data = []
        for model_id in state.settings.served_models:
            spec, model = state.registry.spec(model_id), state.registry.get(model_id)  # loaded at start-up
            size = "{}x{}".format(*model.default_size) if model.family in ("sd", "sdxl") else None  # as the engine
            data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "accel-diffusion",
                         "default_steps": spec.default_steps, "default_size": size,
                         "default_strategy": spec.default_strategy.model_dump(exclude_none=True),
                         "pareto_front": front_summary(model_id, model.device, state.settings.profile_device,
                                                       state.settings.engine_acceleration or "none")})
        return {"object": "list", "data": data}

    @router.get("/v1/strategies", tags=["models"])
    async def strategies() -> dict[str, Any]:
        components: dict[str, list[dict[str, Any]]] = {}
        for info in get_registry().all():
            components.setdefault(info.kind.value, []).append(
                {"name": info.name, "description": info.summary, "config_schema": info.json_schema()})
        return {"object": "list", "components": components}

    @router.get("/v1/schedules", tags=["models"])
    async def schedules() -> dict[str, Any]:
        """Searched schedules a strategy may name: {"schedule": {"name": "searched", "id": ...}}."""
        return {"object": "list", "data": [a.summary() for a in await asyncio.to_thread(list_artifacts)]}

    @router.post("/v1/images/generations", tags=["images"], response_model=ImagesResponse)
    async def images_generations(body: ImageGenerationRequest, request: Request) -> Any:
        state: ServerState = request.app.state.server  # not a dependency: one less for FastAPI to solve per request
        generation = body.to_generation_request(state.default_model, state.limits)
        return await _run_images(generation, body.output_options(), request, state)

    @router.post("/v1/images/edits", tags=["images"], response_model=ImagesResponse, openapi_extra={
        "requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": {
                "image": {"type": "string", "format": "binary"}, "prompt": {"type": "string"}}}},
            "application/json": {"schema": ImageEditRequest.model_json_schema()}}, "required": True}})
    async def images_edits(request: Request, state: State) -> Any:
        body = await _edit_request(request)
        generation = await asyncio.to_thread(body.to_generation_request, state.default_model, state.limits)
        return await _run_images(generation, body.output_options(), request, state)

    @router.post("/v1/jobs", tags=["jobs"], status_code=202)
    async def create_job(body: JobCreateRequest, state: State, owner: Owner, response: Response) -> dict[str, Any]:
        generation = await asyncio.to_thread(body.to_generation_request, state.default_model, state.limits)
        job, position = state.submit(generation, body.output_options(), owner)
        response.headers["X-Queue-Position"] = str(position)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job.public(state.worker.position(job))

    @router.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(state: State, owner: Owner, status: JobStatus | None = None) -> dict[str, Any]:
        """The caller's jobs (with API keys, each key sees the jobs it submitted)."""
        jobs = [j for j in state.jobs.all() if (status is None or j.status is status) and _visible(j, owner)]
        return {"object": "list", "data": [j.public(state.worker.position(j), include_result=False) for j in jobs]}

    @router.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, state: State, owner: Owner,
                      wait: Annotated[float, Query(ge=0, le=60, description="long-poll: answer once the job has "
                                                   "finished, or after this many seconds")] = 0) -> dict[str, Any]:
        job = _job(state, job_id, owner)
        if wait > 0:
            await job.wait_finished(wait)
        return job.public(state.worker.position(job))

    @router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str, state: State, owner: Owner) -> dict[str, Any]:
        job = _job(state, job_id, owner)
        if not job.status.finished:
            state.worker.cancel(job)
        return job.public(state.worker.position(job))

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str, request: Request, state: State, owner: Owner,
                         last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None
                         ) -> StreamingResponse:
        job = _job(state, job_id, owner)
        start = int(last_event_id) if last_event_id and last_event_id.isdecimal() and len(last_event_id) < 19 else 0
        release = state.jobs.open_listener(job, owner)  # 429 past the listener caps
        events = _sse(job, start, request, release)
        weakref.finalize(events, release)  # a stream never started (the client left first) is released too
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _run_images(generation: GenerationRequest, output: OutputOptions, request: Request,
                      state: ServerState) -> Any:
    """Submit, wait (a disconnect cancels), answer in the OpenAI images shape or with an error."""
    job, _ = state.submit(generation, output, get_owner(request), delivered_by_caller=True)
    try:
        await _wait_or_cancel(job, request, state)
        if job.status is JobStatus.SUCCEEDED:
            assert job.result is not None
            images = job.result["images"]
            # built to the ImagesResponse schema and returned as is: re-validating megabytes of base64
            # through the response model on the event loop would only add latency
            return JSONResponse({"created": int(job.created_at), "id": job.id,
                                 "data": [{"b64_json": im["b64_json"], "revised_prompt": None, "seed": im["seed"]}
                                          for im in images],
                                 "seeds": [im["seed"] for im in images],
                                 "usage": {"images": len(images), "nfe_per_image": job.result["nfe"],
                                           "compute_s": round(job.result["timings"]["total"], 4)},
                                 "strategy": job.result.get("strategy")})
        if job.status is JobStatus.CANCELLED:
            return error_response(409, "cancelled", f"job {job.id} was cancelled")
        error = job.error or {}
        return error_response(ERROR_STATUS.get(error.get("type"), 500), error.get("type", "internal_error"),
                              error.get("message", "failed"),
                              error.get("param"))
    finally:  # delivered, refused, or the caller went away: the job store keeps the metadata only
        job.release_images()


async def _edit_request(request: Request) -> ImageEditRequest:
    """The edit request from a multipart form (OpenAI) or a JSON body."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                key = key.removesuffix("[]")
                if key in data:
                    raise InvalidRequestError(key, "give one value (one image per request)")
                data[key] = (base64.b64encode(await value.read()).decode("ascii")
                             if hasattr(value, "read") else value)
            if isinstance(data.get("strategy"), str):
                data["strategy"] = parse_json(data["strategy"], "strategy",
                                              max_bytes=request.app.state.settings.max_body_bytes)
        else:
            data = await request.json()  # a BoundedJsonRequest's
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("body", f"not a valid form or JSON body ({exc.__class__.__name__})") from None
    try:
        return ImageEditRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _visible(job: Job, owner: str | None) -> bool:
    return owner is None or job.owner == owner


def _job(state: ServerState, job_id: str, owner: str | None) -> Job:
    """The job, if the caller may see it: another key's job is answered like a missing one."""
    job = state.jobs.get(job_id)
    if job is None or not _visible(job, owner):
        raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for {state.settings.job_ttl_s:g} s)")
    return job


async def _wait_or_cancel(job: Job, request: Request, state: ServerState) -> None:
    """Wait for a synchronous call's job; a client that disconnects cancels it."""
    while not await job.wait_finished(DISCONNECT_CHECK_S):
        if await request.is_disconnected():
            state.worker.cancel(job)
            return


async def _sse(job: Job, last_id: int, request: Request, release: Callable[[], None],
               heartbeat_s: float = 15.0) -> AsyncIterator[str]:
    watch = job.watch()
    last_beat = checked = time.monotonic()
    try:
        while True:
            changed = watch.next()  # before reading the events: set by any event after them
            finished = job.status.finished  # read before the events: a terminal event is then in the list
            events = job.events_after(last_id)
            for event in events:
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data)}\n\n"
                last_id = event.id
                if event.type in TERMINAL_EVENTS:
                    return
            if finished and not events:  # resumed at or past the terminal event: nothing more will come
                return
            if time.monotonic() - last_beat > heartbeat_s:
                yield ": heartbeat\n\n"
                last_beat = time.monotonic()
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), DISCONNECT_CHECK_S)
    finally:
        job.unwatch(watch)
        release()
