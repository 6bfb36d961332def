"""The server on the Redis backend (``queue_backend = "redis"``): the jobs and images routes over the shared queue
(any replica answers any job), the per-model queue metrics every API replica exports from Redis, and, in the
worker roles, the runner that feeds the DeviceWorker from the queue.

The routes keep the memory mode's shapes, status codes, SSE ids (1, 2, ... per job: ``Last-Event-ID`` resumes on
any replica) and per-key ownership (another key's job is 404 on every replica); ``queue_position`` is null.
While Redis is unreachable a route answers 503 with Retry-After, readiness fails, and both recover when it is
back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import redis
import redis.asyncio
from accel_diffusion.server.app import (
    DISCONNECT_CHECK_S,
    ERROR_RESPONSES,
    ERROR_STATUS,
    TERMINAL_EVENTS,
    BoundedJsonRoute,
    EncodableJSONResponse,
    Owner,
    ServerState,
    State,
    _edit_request,
    error_response,
    get_owner,
)
from accel_diffusion.server.jobs import DrainingError, JobStatus, OutputOptions
from accel_diffusion.server.redis_backend import RedisJobQueue
from accel_diffusion.server.redis_events import EventHub
from accel_diffusion.server.redis_worker import RedisJobRunner
from accel_diffusion.server.schemas import ImageGenerationRequest, ImagesResponse, JobCreateRequest
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client.core import GaugeMetricFamily
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from starlette.background import BackgroundTask

from accel_diffusion.engine.engine import check_request
from accel_diffusion.errors import UnknownModelError
from accel_diffusion.strategy import GenerationRequest

T = TypeVar("T")
log = logging.getLogger("accel_diffusion.server")
FINISHED = ("succeeded", "failed", "cancelled")
RETRY_AFTER_S = 2


class RedisServing:
    """What the app holds on the Redis backend (``state.redis``): the queue client of the routes and metrics,
    and with role worker or all the runner feeding this process's DeviceWorker."""

    def __init__(self, state: ServerState) -> None:
        settings = state.settings
        assert settings.redis_url is not None  # settings check it

        def queue() -> RedisJobQueue:
            return RedisJobQueue(settings.redis_url or "", settings.redis_prefix, settings.lease_s, settings.job_ttl_s,
                                 settings.request_limits(), settings.max_job_image_bytes,
                                 settings.key_max_job_image_bytes, settings.max_deliveries,
                                 settings.max_finished_jobs, settings.key_max_finished_jobs)

        self.queue = queue()
        # waits for a job's next event (XREAD BLOCK) on the event loop: no thread held while a request waits
        retry = AsyncRetry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 3)
        self.waiter = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10,
                                                   socket_connect_timeout=2, max_connections=4096, retry=retry)
        self.events = EventHub(self.waiter, f"{settings.redis_prefix}:wake:{uuid.uuid4().hex}")
        self.runner = None
        if settings.role != "api":
            name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
            self.runner = RedisJobRunner(queue(), state.worker, settings.served_models, name, settings.max_batch_size,
                                         accepting=lambda: not state.draining)
        state.metrics.registry.register(QueueCollector(self.queue, settings.served_models))

    def start(self) -> None:
        if self.runner is not None:
            self.runner.start()

    async def aclose(self) -> None:
        await self.waiter.aclose()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop(10)
            self.runner.queue.close()
        self.queue.close()


class QueueCollector:
    """Per-model queue gauges read from Redis at each scrape: the same values on every replica (an HPA or KEDA
    trigger can read any of them). Nothing is exported while Redis is unreachable."""

    def __init__(self, queue: RedisJobQueue, models: list[str]) -> None:
        self.queue = queue
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("accel_diffusion_shared_queue_depth", "jobs queued or running in the shared "
                                  "(Redis) queue, per model", labels=["model"])
        waiting = GaugeMetricFamily("accel_diffusion_shared_queue_waiting", "jobs no worker has claimed yet, per "
                                    "model", labels=["model"])
        oldest = GaugeMetricFamily("accel_diffusion_shared_queue_oldest_age_seconds", "age of the oldest job no "
                                   "worker has claimed yet (0: none), per model", labels=["model"])
        try:
            for model in self.models:
                stats = self.queue.stats(model)
                depth.add_metric([model], stats.depth)
                waiting.add_metric([model], stats.waiting)
                oldest.add_metric([model], stats.oldest_age_s)
        except redis.RedisError:
            return
        yield from (depth, waiting, oldest)


@dataclass(frozen=True)
class ListenedJob:
    """The job an SSE listener is counted on (the store's listener caps only need its id)."""

    id: str


def unavailable(exc: Exception) -> HTTPException:
    return HTTPException(503, f"the job store (Redis) is unreachable ({type(exc).__name__}); retry in "
                         f"{RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})


async def call(function: Callable[..., T], *args: Any) -> T:
    """A Redis call off the event loop; Redis unreachable -> 503 with Retry-After."""
    try:
        return await asyncio.to_thread(function, *args)
    except redis.RedisError as exc:
        raise unavailable(exc) from None


def serving(state: ServerState) -> RedisServing:
    return state.redis


def check_model(state: ServerState, request: GenerationRequest) -> None:
    """As ``ServerState.check_model``; an API-only replica has no model loaded, so it checks what the registry
    entry tells (served, the strategy runs on it), and the worker checks the resolved limits when it runs."""
    if state.settings.role != "api":
        state.check_model(request)
        return
    if request.model not in state.settings.served_models:
        raise UnknownModelError("model", f"{request.model!r} is not served here", state.settings.served_models)
    check_request(state.registry.spec(request.model), request)


async def submit(state: ServerState, request: GenerationRequest, output: OutputOptions,
                 owner: str | None) -> dict[str, str]:
    """Check, admit (the key's queued quota and the queue's cap) and queue the job in one Redis round trip; its
    record as written."""
    if state.draining:
        raise DrainingError("the server is shutting down; retry on another replica")
    request = state.resolve_auto(request)  # the queue holds the concrete strategy: every worker runs the same
    check_model(state, request)
    record, _ = await call(serving(state).queue.admit, "job_" + uuid.uuid4().hex, request, output, owner,
                           state.settings.key_max_queued_jobs, state.settings.queue_max, RETRY_AFTER_S)
    return record


async def visible_record(state: ServerState, job_id: str, owner: str | None) -> dict[str, str]:
    """The job's record if the caller may see it: another key's job is answered like a missing one."""
    queue = serving(state).queue
    record = await call(queue.get, job_id)
    if record is None or (owner is not None and queue.owner(record) != owner):
        raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for {state.settings.job_ttl_s:g} s)")
    return record


async def public(state: ServerState, job_id: str, include_result: bool = True) -> dict[str, Any]:
    """The job object, its record and result read in one round trip on the event loop (no thread)."""
    redis_serving = serving(state)
    try:
        async with redis_serving.waiter.pipeline(transaction=False) as pipe:
            pipe.hgetall(redis_serving.queue.job_key(job_id))
            pipe.get(redis_serving.queue.result_key(job_id))
            record, terminal = await pipe.execute()
    except redis.RedisError as exc:
        raise unavailable(exc) from None
    if not record:
        raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for {state.settings.job_ttl_s:g} s)")
    return redis_serving.queue.public(record, include_result, terminal=terminal or "")


async def wait_event(state: ServerState, job_id: str, after: int, timeout_s: float) -> None:
    """Return once the job has an event after number ``after``, or after ``timeout_s``."""
    redis_serving = serving(state)
    try:
        await redis_serving.events.wait(redis_serving.queue.events_key(job_id), after, timeout_s)
    except redis.RedisError as exc:
        raise unavailable(exc) from None


async def wait_finished(state: ServerState, job_id: str, timeout: float, request: Request | None = None,
                        after: int | None = None) -> dict[str, Any]:
    """The job once finished, or after ``timeout``; with ``request``, a client that leaves cancels the job.
    ``after``: the number of the job's events already known not to be terminal (a job just queued: 1). Waits on
    the job's event stream alone (the process's one event reader, EventHub): no status read per event."""
    redis_serving = serving(state)
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    if after is None:
        status, after = await call(redis_serving.queue.progress_mark, job_id)
        if status in FINISHED or status is None:
            return await public(state, job_id)
    key = redis_serving.queue.events_key(job_id)
    while time.monotonic() < deadline:
        if request is not None and time.monotonic() - checked >= DISCONNECT_CHECK_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                await call(redis_serving.queue.cancel, job_id)
                break
        block = min(DISCONNECT_CHECK_S, max(0.001, deadline - time.monotonic()))
        try:
            entries = await redis_serving.events.wait(key, after, block)
        except redis.RedisError as exc:
            raise unavailable(exc) from None
        if entries:
            after = int(entries[-1][0].split("-")[1])
            if any(fields["type"] in TERMINAL_EVENTS for _, fields in entries):
                break
        elif not await redis_serving.waiter.exists(key):  # expired (or dropped) while waited on
            break
    return await public(state, job_id)


def redis_api_routes(memory_routes: APIRouter) -> APIRouter:
    """The API router on the Redis backend: these routes, then ``memory_routes``' others (strategies...)."""
    router = APIRouter(responses=ERROR_RESPONSES, route_class=BoundedJsonRoute)

    @router.get("/v1/models", tags=["models"])
    async def models(state: State) -> dict[str, Any]:
        data = []
        for model_id in state.settings.served_models:  # from the registry: an API replica loads no model
            spec = state.registry.spec(model_id)
            size = f"{spec.default_width}x{spec.default_height}" if spec.default_width and spec.default_height else None
            data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "accel-diffusion",
                         "default_steps": spec.default_steps, "default_size": size,
                         "default_strategy": spec.default_strategy.model_dump(exclude_none=True)})
        return {"object": "list", "data": data}

    @router.post("/v1/images/generations", tags=["images"], response_model=ImagesResponse)
    async def images_generations(body: ImageGenerationRequest, request: Request, state: State) -> Any:
        generation = body.to_generation_request(state.default_model, state.limits)
        return await _run_images(generation, body.output_options(), request, state)

    @router.post("/v1/images/edits", tags=["images"], response_model=ImagesResponse)
    async def images_edits(request: Request, state: State) -> Any:
        body = await _edit_request(request)
        generation = await asyncio.to_thread(body.to_generation_request, state.default_model, state.limits)
        return await _run_images(generation, body.output_options(), request, state)

    @router.post("/v1/jobs", tags=["jobs"], status_code=202)
    async def create_job(body: JobCreateRequest, state: State, owner: Owner, response: Response) -> dict[str, Any]:
        generation = await asyncio.to_thread(body.to_generation_request, state.default_model, state.limits)
        record = await submit(state, generation, body.output_options(), owner)
        response.headers["Location"] = f"/v1/jobs/{record['id']}"
        return serving(state).queue.public(record, terminal="")  # the record just written: no read back

    @router.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(state: State, owner: Owner, status: JobStatus | None = None) -> dict[str, Any]:
        """The caller's jobs (with API keys, each key sees the jobs it submitted)."""
        queue = serving(state).queue
        records = await call(queue.jobs_of, owner)
        data = [queue.public(r, include_result=False) for r in records if status is None or r["status"] == status]
        return {"object": "list", "data": data}

    @router.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, state: State, owner: Owner,
                      wait: Annotated[float, Query(ge=0, le=60, description="long-poll: answer once the job has "
                                                   "finished, or after this many seconds")] = 0) -> dict[str, Any]:
        await visible_record(state, job_id, owner)
        return await wait_finished(state, job_id, wait)

    @router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str, state: State, owner: Owner) -> dict[str, Any]:
        await visible_record(state, job_id, owner)
        await call(serving(state).queue.cancel, job_id)  # queued: now; running: its worker, at its next step
        return await public(state, job_id)

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str, request: Request, state: State, owner: Owner,
                         last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None
                         ) -> StreamingResponse:
        await visible_record(state, job_id, owner)
        start = int(last_event_id) if last_event_id and last_event_id.isdecimal() and len(last_event_id) < 19 else 0
        release = state.jobs.open_listener(ListenedJob(job_id), owner)  # type: ignore[arg-type]  # 429 past caps
        events = _sse(state, job_id, start, request, release)
        weakref.finalize(events, release)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    overridden = {(route.path, frozenset(route.methods)) for route in router.routes if isinstance(route, APIRoute)}
    for route in memory_routes.routes:
        if not (isinstance(route, APIRoute) and (route.path, frozenset(route.methods)) in overridden):
            router.routes.append(route)
    return router


async def _run_images(generation: GenerationRequest, output: OutputOptions, request: Request,
                      state: ServerState) -> Any:
    job_id = (await submit(state, generation, output, get_owner(request)))["id"]
    job = await wait_finished(state, job_id, float("inf"), request, after=1)
    # returned once: the job record keeps the seeds, not the images, released once the answer is sent
    release = BackgroundTask(release_images, state, job_id) if job["status"] in FINISHED else None
    if job["status"] == "succeeded":
        result = job["result"]
        images = result["images"]
        return EncodableJSONResponse({"created": int(job["created_at"]), "id": job_id,
                                      "data": [{"b64_json": im["b64_json"], "revised_prompt": None, "seed": im["seed"]}
                                               for im in images],
                                      "seeds": [im["seed"] for im in images],
                                      "usage": {"images": len(images), "nfe_per_image": result["nfe"],
                                                "compute_s": round(result["timings"]["total"], 4)}},
                                     background=release)
    if job["status"] == "cancelled":
        return error_response(409, "cancelled", f"job {job_id} was cancelled")
    error = job["error"] or {}
    return error_response(ERROR_STATUS.get(error.get("type"), 500), error.get("type", "internal_error"),
                          error.get("message", "failed"), error.get("param"))


async def release_images(state: ServerState, job_id: str) -> None:
    """Release the job's images (a synchronous call has answered with them)."""
    try:
        await asyncio.to_thread(serving(state).queue.release_images, job_id)
    except redis.RedisError as exc:  # kept until a cap or the TTL drops them
        log.warning("job %s: could not release its images (%s)", job_id, exc)


async def _sse(state: ServerState, job_id: str, last_id: int, request: Request, release: Callable[[], None],
               heartbeat_s: float = 15.0) -> AsyncIterator[str]:
    queue = serving(state).queue
    last_beat = checked = time.monotonic()
    try:
        while True:
            status = await call(queue.status, job_id)  # before the events: a finished job's last event is then read
            events = await call(queue.events_after, job_id, last_id, 100)
            for event in events:
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data)}\n\n"
                last_id = event.id
                if event.type in TERMINAL_EVENTS:
                    return
            if events:
                continue
            if status is None or status in FINISHED:  # resumed at or past the terminal event, or expired
                return
            if time.monotonic() - last_beat > heartbeat_s:
                yield ": heartbeat\n\n"
                last_beat = time.monotonic()
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            await wait_event(state, job_id, last_id, DISCONNECT_CHECK_S)
    except HTTPException:  # Redis went away mid-stream: the client reconnects with Last-Event-ID
        return
    finally:
        release()

