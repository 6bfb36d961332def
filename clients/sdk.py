"""Python SDK for the accel-diffusion server: a sync and an async client over the native jobs API.

``AccelClient`` (httpx.Client) and ``AsyncAccelClient`` (httpx.AsyncClient) have the same methods.
``generate`` and ``edit`` submit a job to ``POST /v1/jobs`` and wait for its result over the job's
server-sent events, so the full result metadata (seeds, nfe, timings, strategy) comes back with the
images. ``submit`` returns a job handle for progress events, cancellation and the result.

Errors are typed (``AccelError`` and subclasses, mirroring the server's OpenAI-shaped error bodies).
429 (queue full) and 503 (draining, out of device memory) are retried with exponential backoff that
honours ``Retry-After``; connection errors are retried for idempotent requests only.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import email.utils
import functools
import inspect
import io
import json
import os
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar

import httpx
from PIL import Image

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "AccelClient",
    "AccelError",
    "AsyncAccelClient",
    "AsyncJob",
    "AuthenticationError",
    "Conflict",
    "GenerationOutput",
    "Health",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobTimeout",
    "NotFound",
    "QueueFull",
    "RequestTooLarge",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "UnknownArgument",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "ACCEL_DIFFUSION_API_KEY"
TERMINAL_EVENTS = frozenset({"job.completed", "job.failed", "job.cancelled"})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 503})

ImageInput = str | os.PathLike[str] | bytes | bytearray | Image.Image | BinaryIO
P = ParamSpec("P")
R = TypeVar("R")


# ---- errors ---------------------------------------------------------------------------------

class AccelError(Exception):
    """Base of every error the SDK raises: the server's error body plus the HTTP status and request id.

    ``type``/``code``/``param``/``message`` come from ``{"error": {...}}``; ``status`` is None for
    errors that did not come from an HTTP response (a job's failure, a client-side check).
    """

    def __init__(self, message: str, status: int | None = None, type: str | None = None, param: str | None = None,
                 request_id: str | None = None, *, code: str | None = None, retry_after: float | None = None,
                 job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code or type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.job_id = job_id

    def __str__(self) -> str:
        details = [f"{name} {value}" for name, value in (("status", self.status), ("type", self.type),
                                                         ("param", self.param), ("job", self.job_id),
                                                         ("request", self.request_id)) if value is not None]
        return f"{self.message} ({', '.join(details)})" if details else self.message


class InvalidRequest(AccelError):
    """400/422: a request field is missing, malformed or out of range; ``param`` names it."""


class UnknownArgument(InvalidRequest, TypeError):
    """A keyword argument a method does not take, answered with the closest one it does ("did you mean
    `steps`?") before anything is sent; also a TypeError, as Python raises for those."""


class AuthenticationError(AccelError):
    """401 (or 403): missing or wrong API key."""


class NotFound(AccelError):
    """404: an unknown job, or a model the server does not serve (type ``model_not_found``)."""


class Conflict(AccelError):
    """409."""


class RequestTooLarge(AccelError):
    """413: the request body is above the server's limit."""


class QueueFull(AccelError):
    """429: the job queue is full; ``retry_after`` is the server's hint in seconds."""


class ServiceUnavailable(AccelError):
    """503: the server is draining, still loading, or ran out of device memory (``gpu_oom``)."""


class ServerError(AccelError):
    """Any other 5xx."""


class APIConnectionError(AccelError):
    """The server could not be reached (or the connection broke) and retries were used up."""


class JobFailed(AccelError):
    """A job ended in ``failed``; ``type``/``param``/``message`` are the job's error."""


class JobCancelled(AccelError):
    """A job ended in ``cancelled``."""


class ImagesReleased(AccelError):
    """A finished job's images are no longer held by the server: a synchronous call returned them, or the
    server's ``max_job_image_bytes`` evicted them (fetch results sooner, or raise that limit)."""


class JobTimeout(AccelError, TimeoutError):
    """Waiting for a job took longer than the given timeout (the job itself may still run)."""


_ERRORS_BY_TYPE: dict[str, type[AccelError]] = {
    "invalid_request_error": InvalidRequest, "model_not_found": NotFound, "not_found": NotFound,
    "unauthorized": AuthenticationError, "conflict": Conflict, "request_too_large": RequestTooLarge,
    "queue_full": QueueFull, "unavailable": ServiceUnavailable, "gpu_oom": ServiceUnavailable,
    "internal_error": ServerError,
}
_ERRORS_BY_STATUS: dict[int, type[AccelError]] = {
    400: InvalidRequest, 422: InvalidRequest, 401: AuthenticationError, 403: AuthenticationError, 404: NotFound,
    409: Conflict, 413: RequestTooLarge, 429: QueueFull, 503: ServiceUnavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response) -> AccelError:
    """The typed error for an error response (its body must have been read)."""
    status = response.status_code
    detail: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            detail = body["error"]
    except ValueError:
        pass
    type_ = detail.get("type")
    cls = _ERRORS_BY_TYPE.get(type_ or "") or _ERRORS_BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else AccelError
    message = detail.get("message") or response.text[:500] or response.reason_phrase or f"HTTP {status}"
    return cls(str(message), status, type_, detail.get("param"), response.headers.get("x-request-id"),
               code=detail.get("code"), retry_after=parse_retry_after(response.headers.get("retry-after")))


def _suggests_arguments(method: Callable[P, R]) -> Callable[P, R]:
    """Check a method's keyword arguments by name first: a mistyped one raises UnknownArgument."""
    accepted = sorted(set(inspect.signature(method).parameters) - {"self"})

    def check(kwargs: dict[str, Any]) -> None:
        for name in kwargs:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise UnknownArgument(f"{name}: unknown argument of {method.__name__}(){hint}", param=name)

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def checked_async(*args: Any, **kwargs: Any) -> Any:
            check(kwargs)
            return await method(*args, **kwargs)  # type: ignore[misc]

        return checked_async  # type: ignore[return-value]

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        check(kwargs)
        return method(*args, **kwargs)

    return checked


def _retryable_transport_error(exc: httpx.TransportError, idempotent: bool) -> bool:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # nothing reached the server: safe for any request
    return idempotent and isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before retrying: ``backoff_s * 2**attempt`` capped at
    ``max_backoff_s``, or the server's ``Retry-After`` (also capped) when it sends one."""

    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_backoff_s)
        return min(self.backoff_s * 2.0 ** min(attempt, 60), self.max_backoff_s)


# ---- values ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of a job; ``id`` increases by one per event, starting at 1."""

    id: int
    type: str
    data: dict[str, Any]

    def preview_images(self) -> list[Image.Image]:
        """The decoded images of a ``job.preview`` event (submit with ``preview_every``); [] for other events
        and for a preview a newer one has superseded (a job keeps its latest preview's images only)."""
        return [_decode_image(b64) for b64 in self.data.get("b64_json", [])] if self.type == "job.preview" else []


@dataclass(frozen=True)
class Health:
    """``GET /health/ready``: truthy when the server takes jobs."""

    ready: bool
    status: str
    models: list[str] = field(default_factory=list)
    detail: str | None = None

    def __bool__(self) -> bool:
        return self.ready


_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass
class GenerationOutput:
    """A finished job: decoded images and the result metadata.

    ``timings`` are the server's engine timings (seconds) plus ``queue`` (time queued on the server)
    and ``wall`` (measured by the client, from submission to the result).
    """

    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    timings: dict[str, float]
    nfe: int
    strategy: dict[str, Any]
    job_id: str
    width: int
    height: int
    steps: int
    raw: dict[str, Any] = field(repr=False)

    def save(self, directory: str | os.PathLike[str], stem: str = "image") -> list[Path]:
        """Write the images as the server encoded them (no re-encoding) to ``directory/stem-<i>.<ext>``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (image, item) in enumerate(zip(self.images, self.raw["images"])):
            path = folder / f"{stem}-{i}.{_EXTENSIONS.get(image.format or '', 'png')}"
            path.write_bytes(base64.b64decode(item["b64_json"]))
            paths.append(path)
        return paths


def _decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _output(job_id: str, result: dict[str, Any], submitted_at: float) -> GenerationOutput:
    if result.get("images_released"):
        raise ImagesReleased("the server no longer holds this job's images (returned by a synchronous call, or "
                             "evicted past its max_job_image_bytes)", job_id=job_id)
    items = result["images"]
    timings = {name: float(value) for name, value in (result.get("timings") or {}).items()}
    timings.setdefault("queue", 0.0)
    timings["wall"] = time.monotonic() - submitted_at
    return GenerationOutput(
        images=[_decode_image(item["b64_json"]) for item in items], seeds=[int(item["seed"]) for item in items],
        prompts=[item.get("prompt", "") for item in items], timings=timings, nfe=int(result["nfe"]),
        strategy=dict(result.get("strategy") or {}), job_id=job_id, width=int(result["width"]),
        height=int(result["height"]), steps=int(result["steps"]), raw=result)


def _terminal_outcome(job_id: str, event: JobEvent, submitted_at: float) -> GenerationOutput:
    """The output of a ``job.completed`` event; raises for ``job.failed`` / ``job.cancelled``."""
    if event.type == "job.completed":
        return _output(job_id, event.data["result"], submitted_at)
    if event.type == "job.failed":
        error = event.data.get("error") or {}
        raise JobFailed(str(error.get("message") or "the job failed"), None, error.get("type", "internal_error"),
                        error.get("param"), code=error.get("code"), job_id=job_id)
    raise JobCancelled(f"job {job_id} was cancelled", None, "cancelled", job_id=job_id)


LONG_POLL_S = 30.0  # one GET /v1/jobs/{id}?wait= call waits at most this long


def _job_outcome(job_id: str, info: dict[str, Any], submitted_at: float) -> GenerationOutput | None:
    """The output of a finished job object (None while it runs); raises for failed / cancelled jobs."""
    status = info.get("status")
    if status == "succeeded":
        return _output(job_id, info["result"], submitted_at)
    if status == "failed":
        return _terminal_outcome(job_id, JobEvent(0, "job.failed", {"error": info.get("error")}), submitted_at)
    if status == "cancelled":
        return _terminal_outcome(job_id, JobEvent(0, "job.cancelled", {}), submitted_at)
    return None


def _poll_wait(job_id: str, deadline: float | None) -> float:
    """Seconds the next long-poll may wait; raises JobTimeout once ``deadline`` has passed."""
    if deadline is None:
        return LONG_POLL_S
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JobTimeout(f"job {job_id} did not finish in time", None, "timeout", job_id=job_id)
    return min(LONG_POLL_S, remaining)


def _encode_image(image: ImageInput) -> str:
    """A path, image bytes, an open binary file or a PIL image -> base64 of the image file's bytes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif hasattr(image, "read"):
        data = image.read()
    else:
        raise TypeError(f"image must be a path, bytes, a binary file or a PIL image, not {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


def _job_body(prompt: str | list[str], *, model: str | None, n: int | None, num_images_per_prompt: int | None,
              size: str | None, width: int | None, height: int | None, seed: int | None,
              negative_prompt: str | None, steps: int | None, num_inference_steps: int | None,
              guidance_scale: float | None, strategy: dict[str, Any] | str | None, output_format: str,
              output_compression: int | None, image: ImageInput | None = None, strength: float | None = None,
              preview_every: int = 0, vae: str | None = None, latency_budget_ms: float | None = None,
              min_quality: float | None = None,
              ar_iterations: int | None = None) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body; unset options are left out so that the server's defaults apply, and
    aliases (``size``, ``num_inference_steps``, ...) are sent as given so that its errors name them."""
    body: dict[str, Any] = {"prompt": prompt, "output_format": output_format}
    optional = {"model": model, "n": n, "num_images_per_prompt": num_images_per_prompt, "size": size,
                "width": width, "height": height, "seed": seed, "negative_prompt": negative_prompt, "steps": steps,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "strategy": strategy,
                "output_compression": output_compression, "strength": strength, "vae": vae,
                "latency_budget_ms": latency_budget_ms, "min_quality": min_quality,
                "ar_iterations": ar_iterations}
    body.update({key: value for key, value in optional.items() if value is not None})
    if image is not None:
        body["init_image"] = _encode_image(image)
    if preview_every:
        body["preview_every"] = preview_every
    return body


def _auth_headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    merged = dict(headers or {})
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key:
        merged["Authorization"] = f"Bearer {key}"
    return merged


# ---- SSE ------------------------------------------------------------------------------------

class SSEDecoder:
    """Incremental ``text/event-stream`` parser: feed lines (without newlines), get events at blank lines."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> JobEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (the server's heartbeat)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id" and re.fullmatch("[0-9]{1,18}", value):
            self._id = int(value)
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> JobEvent | None:
        event_id, kind, data = self._id, self._event, "\n".join(self._data)
        self._id, self._event, self._data = None, None, []
        if event_id is None or (kind is None and not data):
            return None
        payload = json.loads(data) if data else {}
        return JobEvent(event_id, kind or "message", payload if isinstance(payload, dict) else {"value": payload})


class _StreamCursor:
    """Where a job's event stream is, and what to do when it breaks (shared by both clients).

    Reconnects send ``Last-Event-ID`` and drop any event at or below it, so no event repeats. A finished
    job's stream is read from its start (the server sends it whole and closes it at the terminal event),
    since one resumed at or after its terminal event would stay open with nothing to send.
    """

    def __init__(self, job_id: str, last_event_id: int | None, deadline: float | None, retry: RetryPolicy,
                 timeout: float, finished: bool) -> None:
        self.job_id = job_id
        self.last = last_event_id or 0
        self.deadline = deadline
        self.retry = retry
        self.timeout = timeout
        self.finished = finished  # the job had finished before the first connection
        self.attempt = 0
        self.read_timeout = timeout
        self.refresh = False
        self.done = False  # the terminal event went by (new, or at or below ``last`` in a replay)

    @property
    def path(self) -> str:
        return f"/v1/jobs/{self.job_id}/events"

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise JobTimeout(f"job {self.job_id} did not finish in time", None, "timeout", job_id=self.job_id)

    def connect(self) -> tuple[dict[str, str], httpx.Timeout]:
        """Headers and timeouts of the next connection."""
        self.check_deadline()
        self.refresh = False
        read = self.timeout
        remaining = self.remaining()
        if remaining is not None:
            read = min(read, max(remaining, 0.01))
        self.read_timeout = read
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last and not self.finished:
            headers["Last-Event-ID"] = str(self.last)
        return headers, httpx.Timeout(self.timeout, read=read)

    def line(self, line: str, decoder: SSEDecoder) -> JobEvent | None:
        """A new event, or None; sets ``refresh`` when the connection's read timeout would outlast the deadline."""
        self.check_deadline()
        event = decoder.feed(line)
        if event is None:
            remaining = self.remaining()
            if line.startswith(":") and remaining is not None and remaining < self.read_timeout:
                self.refresh = True  # reconnect with a read timeout that ends at the deadline
            return None
        self.done = event.type in TERMINAL_EVENTS
        if event.id <= self.last:
            return None
        self.last = event.id
        self.attempt = 0
        return event

    def after_disconnect(self, exc: Exception | None) -> float:
        """Seconds to wait before reconnecting; raises when out of retries (or past the deadline)."""
        self.check_deadline()
        if self.refresh:
            return 0.0
        if isinstance(exc, httpx.ReadTimeout) and self.read_timeout < self.timeout:
            return 0.0  # the read timeout was cut short for the deadline (which has not passed)
        if isinstance(exc, httpx.TransportError) and not _retryable_transport_error(exc, idempotent=True):
            raise APIConnectionError(f"GET {self.path}: {exc!r}", job_id=self.job_id) from exc
        if self.attempt >= self.retry.max_retries:
            if isinstance(exc, AccelError):
                raise exc
            reason = repr(exc) if exc is not None else "the stream ended before the job finished"
            raise APIConnectionError(f"GET {self.path}: {reason}", job_id=self.job_id) from exc
        delay = self.retry.delay(self.attempt, exc.retry_after if isinstance(exc, AccelError) else None)
        self.attempt += 1
        remaining = self.remaining()
        return delay if remaining is None else min(delay, max(remaining, 0.0))


# ---- sync client ----------------------------------------------------------------------------

class Job:
    """A submitted job of :class:`AccelClient`."""

    def __init__(self, client: AccelClient, job_id: str, info: dict[str, Any] | None = None,
                 submitted_at: float | None = None) -> None:
        self.id = job_id
        self.info = info or {}  # the job object as last seen (at submission)
        self._client = client
        self._submitted_at = time.monotonic() if submitted_at is None else submitted_at
        self._output: GenerationOutput | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The job object (``GET /v1/jobs/{id}``): status, queue position, progress, result, error."""
        self.info = self._client._request("GET", f"/v1/jobs/{self.id}").json()
        return self.info

    def cancel(self) -> dict[str, Any]:
        """Cancel the job (queued: at once; running: at its next step); returns the job object."""
        self.info = self._client._request("POST", f"/v1/jobs/{self.id}/cancel", idempotent=True).json()
        return self.info

    def events(self, last_event_id: int | None = None) -> Iterator[JobEvent]:
        """The job's events after ``last_event_id`` (all when None), up to and including the terminal one."""
        return self._client._events(self.id, last_event_id, None)

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the job; raises JobFailed, JobCancelled, or JobTimeout after ``timeout`` seconds.

        Waits by long-polling ``GET /v1/jobs/{id}?wait=`` (the server answers when the job ends), not
        over the event stream: no per-step traffic wakes either side while the job runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._output is None:
            wait = min(_poll_wait(self.id, deadline), self._client.timeout / 2)  # within httpx's read timeout
            self.info = self._client._request("GET", f"/v1/jobs/{self.id}", params={"wait": round(wait, 3)}).json()
            self._output = _job_outcome(self.id, self.info, self._submitted_at)
        return self._output


class AccelClient:
    """Synchronous client. ``api_key`` falls back to ``$ACCEL_DIFFUSION_API_KEY``; ``timeout`` is httpx's
    (connect/read/write) in seconds; ``transport`` and ``sleep`` are for tests."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *, timeout: float = 600.0,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None, headers: dict[str, str] | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self.timeout = timeout
        self._sleep = sleep or time.sleep
        self._http = httpx.Client(base_url=self.base_url, headers=_auth_headers(api_key, headers), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> AccelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- generation --

    @_suggests_arguments
    def submit(self, prompt: str | list[str], *, model: str | None = None, n: int | None = None,
               num_images_per_prompt: int | None = None, size: str | None = None, width: int | None = None,
               height: int | None = None, seed: int | None = None, negative_prompt: str | None = None,
               steps: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
               strategy: dict[str, Any] | str | None = None, vae: str | None = None, output_format: str = "png",
               output_compression: int | None = None, image: ImageInput | None = None,
               strength: float | None = None, preview_every: int = 0,
               latency_budget_ms: float | None = None, min_quality: float | None = None,
               ar_iterations: int | None = None) -> Job:
        """Queue a job (``POST /v1/jobs``; img2img when ``image`` is given) and return its handle.

        ``num_inference_steps``, ``size`` and ``num_images_per_prompt`` are the diffusers/OpenAI names of
        ``steps``, ``width``/``height`` and ``n`` (give one of each); the server checks every value."""
        body = _job_body(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                         width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         strategy=strategy, vae=vae, output_format=output_format, output_compression=output_compression,
                         image=image, strength=strength, preview_every=preview_every,
                         latency_budget_ms=latency_budget_ms, min_quality=min_quality, ar_iterations=ar_iterations)
        submitted_at = time.monotonic()
        info = self._request("POST", "/v1/jobs", body=body).json()
        return Job(self, info["id"], info, submitted_at)

    @_suggests_arguments
    def generate(self, prompt: str | list[str], *, model: str | None = None, n: int | None = None,
                 num_images_per_prompt: int | None = None, size: str | None = None, width: int | None = None,
                 height: int | None = None, seed: int | None = None, negative_prompt: str | None = None,
                 steps: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 strategy: dict[str, Any] | str | None = None, vae: str | None = None, output_format: str = "png",
                 output_compression: int | None = None, timeout: float | None = None,
                 latency_budget_ms: float | None = None, min_quality: float | None = None,
                 ar_iterations: int | None = None) -> GenerationOutput:
        """Text to image: submit a job and wait for it (a timeout cancels the job). ``strategy="auto"`` with
        ``latency_budget_ms`` (ms per image): the best strategy of the model's Pareto profile that fits."""
        job = self.submit(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                          width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          strategy=strategy, vae=vae, output_format=output_format,
                          output_compression=output_compression, latency_budget_ms=latency_budget_ms,
                          min_quality=min_quality, ar_iterations=ar_iterations)
        return self._wait(job, timeout)

    @_suggests_arguments
    def edit(self, image: ImageInput, prompt: str | list[str], *, strength: float = 0.8, model: str | None = None,
             n: int | None = None, num_images_per_prompt: int | None = None, size: str | None = None,
             width: int | None = None, height: int | None = None, seed: int | None = None,
             negative_prompt: str | None = None, steps: int | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, strategy: dict[str, Any] | str | None = None, vae: str | None = None,
             output_format: str = "png", output_compression: int | None = None,
             timeout: float | None = None) -> GenerationOutput:
        """Image to image from ``image`` (a path, image bytes, a binary file or a PIL image)."""
        job = self.submit(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                          width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          strategy=strategy, vae=vae, output_format=output_format,
                          output_compression=output_compression, image=image, strength=strength)
        return self._wait(job, timeout)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (its ``wall`` timing then counts from now)."""
        return Job(self, job_id)

    def _wait(self, job: Job, timeout: float | None) -> GenerationOutput:
        try:
            return job.result(timeout)
        except (JobTimeout, KeyboardInterrupt):
            try:  # nobody will collect the images: free the device
                job.cancel()
            except AccelError:
                pass
            raise

    # -- server info --

    def models(self) -> list[dict[str, Any]]:
        """The served models (``GET /v1/models``): id, default steps, size and strategy."""
        return self._request("GET", "/v1/models").json()["data"]

    def strategies(self) -> dict[str, list[dict[str, Any]]]:
        """The registered strategy components by kind (sampler, schedule, guidance, ...)."""
        return self._request("GET", "/v1/strategies").json()["components"]

    def health(self) -> Health:
        """Readiness (``GET /health/ready``); an unreachable server is not ready. Never retries."""
        try:
            body = self._request("GET", "/health/ready", retries=False).json()
        except ServiceUnavailable as exc:
            return Health(False, "unavailable", [], exc.message)
        except APIConnectionError as exc:
            return Health(False, "unreachable", [], exc.message)
        return Health(body.get("status") == "ready", body.get("status", "unknown"), list(body.get("models", [])))

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> Health:
        """Poll :meth:`health` until ready; raises ServiceUnavailable after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health.ready:
                return health
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"the server was not ready after {timeout:g} s: {health.detail}",
                                         None, health.status)
            self._sleep(interval)

    def version(self) -> dict[str, Any]:
        """Package versions and GPUs of the server (``GET /version``)."""
        return self._request("GET", "/version").json()

    # -- plumbing --

    def _request(self, method: str, path: str, *, body: dict[str, Any] | None = None, idempotent: bool | None = None,
                 retries: bool = True, params: dict[str, Any] | None = None) -> httpx.Response:
        """One API call with the retry policy; raises the typed error of an error response."""
        idempotent = method == "GET" if idempotent is None else idempotent
        request_id = uuid.uuid4().hex
        attempt = 0
        while True:
            can_retry = retries and attempt < self.retry.max_retries
            try:
                response = self._http.request(method, path, json=body, params=params,
                                              headers={"X-Request-Id": request_id})
            except httpx.TransportError as exc:
                if can_retry and _retryable_transport_error(exc, idempotent):
                    self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise APIConnectionError(f"{method} {path}: {exc!r}", request_id=request_id) from exc
            if response.status_code < 400:
                return response
            error = error_from_response(response)
            if can_retry and response.status_code in RETRY_STATUSES:
                self._sleep(self.retry.delay(attempt, error.retry_after))
                attempt += 1
                continue
            raise error

    def _events(self, job_id: str, last_event_id: int | None, deadline: float | None) -> Iterator[JobEvent]:
        finished = False
        if last_event_id:  # resuming: a finished job's stream is replayed from its start (see _StreamCursor)
            finished = self._request("GET", f"/v1/jobs/{job_id}").json()["status"] in TERMINAL_STATUSES
        cursor = _StreamCursor(job_id, last_event_id, deadline, self.retry, self.timeout, finished)
        while True:
            headers, timeout = cursor.connect()
            problem: Exception | None = None
            try:
                with self._http.stream("GET", cursor.path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        problem = error_from_response(response)
                        if response.status_code not in RETRY_STATUSES:
                            raise problem
                    else:
                        decoder = SSEDecoder()
                        for line in response.iter_lines():
                            event = cursor.line(line, decoder)
                            if event is not None:
                                yield event
                            if cursor.done:
                                return
                            if cursor.refresh:
                                break
            except httpx.TransportError as exc:
                problem = exc
            delay = cursor.after_disconnect(problem)
            if delay > 0:
                self._sleep(delay)


# ---- async client ---------------------------------------------------------------------------

class AsyncJob:
    """A submitted job of :class:`AsyncAccelClient`."""

    def __init__(self, client: AsyncAccelClient, job_id: str, info: dict[str, Any] | None = None,
                 submitted_at: float | None = None) -> None:
        self.id = job_id
        self.info = info or {}
        self._client = client
        self._submitted_at = time.monotonic() if submitted_at is None else submitted_at
        self._output: GenerationOutput | None = None

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> dict[str, Any]:
        """The job object (``GET /v1/jobs/{id}``)."""
        self.info = (await self._client._request("GET", f"/v1/jobs/{self.id}")).json()
        return self.info

    async def cancel(self) -> dict[str, Any]:
        """Cancel the job; returns the job object."""
        self.info = (await self._client._request("POST", f"/v1/jobs/{self.id}/cancel", idempotent=True)).json()
        return self.info

    def events(self, last_event_id: int | None = None) -> AsyncIterator[JobEvent]:
        """The job's events after ``last_event_id``, up to and including the terminal one (``async for``)."""
        return self._client._events(self.id, last_event_id, None)

    async def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the job (long-polling, as :meth:`Job.result`); raises JobFailed, JobCancelled, or
        JobTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._output is None:
            wait = min(_poll_wait(self.id, deadline), self._client.timeout / 2)  # within httpx's read timeout
            response = await self._client._request("GET", f"/v1/jobs/{self.id}", params={"wait": round(wait, 3)})
            self.info = response.json()
            self._output = _job_outcome(self.id, self.info, self._submitted_at)
        return self._output


class AsyncAccelClient:
    """Asyncio client with the methods of :class:`AccelClient` (awaitable, events as an async iterator)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, *, timeout: float = 600.0,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, headers: dict[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self.timeout = timeout
        self._sleep = sleep or asyncio.sleep
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_auth_headers(api_key, headers),
                                       timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncAccelClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -- generation --

    @_suggests_arguments
    async def submit(self, prompt: str | list[str], *, model: str | None = None, n: int | None = None,
                     num_images_per_prompt: int | None = None, size: str | None = None, width: int | None = None,
                     height: int | None = None, seed: int | None = None, negative_prompt: str | None = None,
                     steps: int | None = None, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, strategy: dict[str, Any] | str | None = None,
                     vae: str | None = None,
                     output_format: str = "png", output_compression: int | None = None,
                     image: ImageInput | None = None, strength: float | None = None,
                     preview_every: int = 0, latency_budget_ms: float | None = None,
                     min_quality: float | None = None,
                     ar_iterations: int | None = None) -> AsyncJob:
        """Queue a job (``POST /v1/jobs``; img2img when ``image`` is given) and return its handle."""
        body = _job_body(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                         width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         strategy=strategy, vae=vae, output_format=output_format, output_compression=output_compression,
                         image=image, strength=strength, preview_every=preview_every,
                         latency_budget_ms=latency_budget_ms, min_quality=min_quality, ar_iterations=ar_iterations)
        submitted_at = time.monotonic()
        info = (await self._request("POST", "/v1/jobs", body=body)).json()
        return AsyncJob(self, info["id"], info, submitted_at)

    @_suggests_arguments
    async def generate(self, prompt: str | list[str], *, model: str | None = None, n: int | None = None,
                       num_images_per_prompt: int | None = None, size: str | None = None, width: int | None = None,
                       height: int | None = None, seed: int | None = None, negative_prompt: str | None = None,
                       steps: int | None = None, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, strategy: dict[str, Any] | str | None = None,
                       vae: str | None = None,
                       output_format: str = "png", output_compression: int | None = None,
                       timeout: float | None = None, latency_budget_ms: float | None = None,
                       min_quality: float | None = None,
                       ar_iterations: int | None = None) -> GenerationOutput:
        """Text to image: submit a job and wait for it (a timeout or task cancellation cancels the job).
        ``strategy="auto"`` with ``latency_budget_ms``: the best strategy of the model's profile that fits."""
        job = await self.submit(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                                width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                strategy=strategy, vae=vae, output_format=output_format,
                                output_compression=output_compression, latency_budget_ms=latency_budget_ms,
                                min_quality=min_quality, ar_iterations=ar_iterations)
        return await self._wait(job, timeout)

    @_suggests_arguments
    async def edit(self, image: ImageInput, prompt: str | list[str], *, strength: float = 0.8,
                   model: str | None = None, n: int | None = None, num_images_per_prompt: int | None = None,
                   size: str | None = None, width: int | None = None, height: int | None = None,
                   seed: int | None = None, negative_prompt: str | None = None, steps: int | None = None,
                   num_inference_steps: int | None = None, guidance_scale: float | None = None,
                   strategy: dict[str, Any] | str | None = None, vae: str | None = None, output_format: str = "png",
                   output_compression: int | None = None, timeout: float | None = None) -> GenerationOutput:
        """Image to image from ``image`` (a path, image bytes, a binary file or a PIL image)."""
        job = await self.submit(prompt, model=model, n=n, num_images_per_prompt=num_images_per_prompt, size=size,
                                width=width, height=height, seed=seed, negative_prompt=negative_prompt, steps=steps,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                strategy=strategy, vae=vae, output_format=output_format,
                                output_compression=output_compression, image=image, strength=strength)
        return await self._wait(job, timeout)

    def job(self, job_id: str) -> AsyncJob:
        """A handle on an existing job (its ``wall`` timing then counts from now)."""
        return AsyncJob(self, job_id)

    async def _wait(self, job: AsyncJob, timeout: float | None) -> GenerationOutput:
        try:
            return await job.result(timeout)
        except (JobTimeout, asyncio.CancelledError):
            try:  # nobody will collect the images: free the device
                await asyncio.shield(job.cancel())
            except (AccelError, asyncio.CancelledError):
                pass
            raise

    # -- server info --

    async def models(self) -> list[dict[str, Any]]:
        """The served models (``GET /v1/models``)."""
        return (await self._request("GET", "/v1/models")).json()["data"]

    async def strategies(self) -> dict[str, list[dict[str, Any]]]:
        """The registered strategy components by kind."""
        return (await self._request("GET", "/v1/strategies")).json()["components"]

    async def health(self) -> Health:
        """Readiness (``GET /health/ready``); an unreachable server is not ready. Never retries."""
        try:
            body = (await self._request("GET", "/health/ready", retries=False)).json()
        except ServiceUnavailable as exc:
            return Health(False, "unavailable", [], exc.message)
        except APIConnectionError as exc:
            return Health(False, "unreachable", [], exc.message)
        return Health(body.get("status") == "ready", body.get("status", "unknown"), list(body.get("models", [])))

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> Health:
        """Poll :meth:`health` until ready; raises ServiceUnavailable after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            health = await self.health()
            if health.ready:
                return health
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"the server was not ready after {timeout:g} s: {health.detail}",
                                         None, health.status)
            await self._sleep(interval)

    async def version(self) -> dict[str, Any]:
        """Package versions and GPUs of the server (``GET /version``)."""
        return (await self._request("GET", "/version")).json()

    # -- plumbing --

    async def _request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                       idempotent: bool | None = None, retries: bool = True,
                       params: dict[str, Any] | None = None) -> httpx.Response:
        idempotent = method == "GET" if idempotent is None else idempotent
        request_id = uuid.uuid4().hex
        attempt = 0
        while True:
            can_retry = retries and attempt < self.retry.max_retries
            try:
                response = await self._http.request(method, path, json=body, params=params,
                                                    headers={"X-Request-Id": request_id})
            except httpx.TransportError as exc:
                if can_retry and _retryable_transport_error(exc, idempotent):
                    await self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise APIConnectionError(f"{method} {path}: {exc!r}", request_id=request_id) from exc
            if response.status_code < 400:
                return response
            error = error_from_response(response)
            if can_retry and response.status_code in RETRY_STATUSES:
                await self._sleep(self.retry.delay(attempt, error.retry_after))
                attempt += 1
                continue
            raise error

    async def _events(self, job_id: str, last_event_id: int | None,
                      deadline: float | None) -> AsyncGenerator[JobEvent, None]:
        finished = False
        if last_event_id:  # resuming: a finished job's stream is replayed from its start (see _StreamCursor)
            finished = (await self._request("GET", f"/v1/jobs/{job_id}")).json()["status"] in TERMINAL_STATUSES
        cursor = _StreamCursor(job_id, last_event_id, deadline, self.retry, self.timeout, finished)
        while True:
            headers, timeout = cursor.connect()
            problem: Exception | None = None
            try:
                async with self._http.stream("GET", cursor.path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        problem = error_from_response(response)
                        if response.status_code not in RETRY_STATUSES:
                            raise problem
                    else:
                        decoder = SSEDecoder()
                        async for line in response.aiter_lines():
                            event = cursor.line(line, decoder)
                            if event is not None:
                                yield event
                            if cursor.done:
                                return
                            if cursor.refresh:
                                break
            except httpx.TransportError as exc:
                problem = exc
            delay = cursor.after_disconnect(problem)
            if delay > 0:
                await self._sleep(delay)
