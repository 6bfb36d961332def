"""Jobs: one generation request, its state machine, its event log (for SSE), and the job store."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from accel_diffusion.strategy import GenerationRequest


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event: ``id`` increases by one per event of a job, starting at 1."""

    id: int
    type: str
    data: dict[str, Any]


@dataclass
class OutputOptions:
    """How finished images are encoded."""

    output_format: str = "png"
    output_compression: int = 100


class _LoopSignals:
    """A job's wake-ups on one event loop, shared by all its listeners there: ``changed`` is set (and
    replaced by a fresh one) at every event, ``finished`` once the job has finished."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()
        self.listeners = 0  # watching every event
        self.finish_listeners = 0  # watching for the end only

    def wake(self, finished: bool) -> None:  # on the loop's thread
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        if finished:
            self.finished.set()


@dataclass(frozen=True)
class JobWatch:
    """One listener's hold on a job's wake-ups (see ``Job.watch``)."""

    loop: asyncio.AbstractEventLoop
    signals: _LoopSignals
    finish_only: bool

    def next(self) -> asyncio.Event:
        """The event the job's next event sets (take it before reading the job's events, then wait)."""
        return self.signals.finished if self.finish_only else self.signals.changed


@dataclass(eq=False)  # identity: queue lookups must not compare requests (and their images) field by field
class Job:
    """A generation request and everything the API reports about it. Thread-safe. Once finished, a job
    does not change: a late start or progress (a cancelled job in a batch that runs on) is ignored."""

    request: GenerationRequest
    output: OutputOptions = field(default_factory=OutputOptions)
    id: str = field(default_factory=lambda: "job_" + uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    status: JobStatus = JobStatus.QUEUED
    step: int = 0
    total_steps: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    owner: str | None = None  # a digest of the API key that submitted it (None without keys)
    # a synchronous call returns the images itself, then releases them: the store never evicts them first
    delivered_by_caller: bool = False
    image_bytes: int = 0  # base64 characters of the result's images held by this job
    cancel_event: threading.Event = field(default_factory=threading.Event)
    events: list[JobEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _signals: dict[asyncio.AbstractEventLoop, _LoopSignals] = field(default_factory=dict, repr=False)

    def emit(self, type_: str, data: dict[str, Any] | None = None) -> JobEvent:
        """Append an event and wake its listeners: one call per event loop that has listeners (one,
        in the server), whatever their number, so that listeners cost the worker thread nothing."""
        with self._lock:
            event = JobEvent(len(self.events) + 1, type_, data or {})
            if type_ == "job.preview":  # keep the latest preview's images only (a replay shows the newest)
                self.events = _without_preview_images(self.events)
            self.events.append(event)
            finished = self.status.finished
            wake = [(loop, signals) for loop, signals in self._signals.items()
                    if signals.listeners or (finished and signals.finish_listeners)]
        for loop, signals in wake:  # the loop wakes its listeners (one shared asyncio.Event each)
            loop.call_soon_threadsafe(signals.wake, finished)
        return event

    def watch(self, finish_only: bool = False) -> JobWatch:
        """A watch of this job on the running event loop; ``watch.next()`` is an asyncio.Event set at the
        job's next event, or with ``finish_only`` once the job has finished; ``unwatch`` when done.

        A synchronous call watches finish-only: waking the event loop at every step made the worker's
        steps slower (the loop thread takes a core and the GIL from the worker's OpenMP team).
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            signals = self._signals.setdefault(loop, _LoopSignals())
            if finish_only:
                signals.finish_listeners += 1
            else:
                signals.listeners += 1
        return JobWatch(loop, signals, finish_only)

    async def wait_finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to finish (woken once, at the end, not at every
        step); returns whether it has."""
        watch = self.watch(finish_only=True)
        try:
            if not self.status.finished:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.next().wait(), timeout)
        finally:
            self.unwatch(watch)
        return self.status.finished

    def unwatch(self, watch: JobWatch) -> None:
        with self._lock:
            if watch.finish_only:
                watch.signals.finish_listeners -= 1
            else:
                watch.signals.listeners -= 1
            if not (watch.signals.listeners or watch.signals.finish_listeners):
                self._signals.pop(watch.loop, None)

    def events_after(self, last_id: int) -> list[JobEvent]:
        with self._lock:
            return self.events[last_id:]

    def start(self) -> None:
        with self._lock:
            if self.status.finished:
                return
            self.status = JobStatus.RUNNING
            self.started_at = time.time()
        self.emit("job.started")

    def progress(self, step: int, total: int) -> None:
        with self._lock:
            if self.status.finished:
                return
            self.step, self.total_steps = step, total
        self.emit("job.progress", {"step": step, "total": total, "fraction": step / total})

    def finish(self, status: JobStatus, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """Finish the job; False (and nothing changes) if it had already finished."""
        with self._lock:
            if self.status.finished:
                return False
            self.status, self.result, self.error = status, result, error
            self.completed_at = time.time()
            if status is JobStatus.SUCCEEDED:  # the result supersedes the previews (a cancelled job keeps its last)
                self.events = _without_preview_images(self.events)
            self.image_bytes = _image_bytes(result) + sum(len(b64 or "") for e in self.events if e.type == "job.preview"
                                                          for b64 in e.data.get("b64_json") or [])
        if status is JobStatus.SUCCEEDED:
            self.emit("job.completed", {"result": result})
        elif status is JobStatus.FAILED:
            self.emit("job.failed", {"error": error})
        else:
            self.emit("job.cancelled", {"step": self.step})
        return True

    def release_images(self) -> None:
        """Forget the result's base64 images: once a synchronous call has returned them, or when the job
        store evicts them (``max_image_bytes``). The job stays for ``job_ttl_s`` with its metadata and
        seeds, marked ``images_released``."""
        with self._lock:
            self.image_bytes = 0
            self.events = _without_preview_images(self.events)
            if self.result is not None and "images" in self.result:
                self.result = {**self.result, "images": [{**im, "b64_json": None} for im in self.result["images"]],
                               "images_released": True}
                self.events = [JobEvent(e.id, e.type, {"result": self.result}) if e.type == "job.completed" else e
                               for e in self.events]

    def public(self, queue_position: int | None = None, include_result: bool = True) -> dict[str, Any]:
        """The job object of the API."""
        with self._lock:
            total = self.total_steps
            return {
                "id": self.id,
                "object": "job",
                "status": self.status.value,
                "queue_position": queue_position,
                "created_at": self.created_at,
                "started_at": self.started_at,
                "completed_at": self.completed_at,
                "progress": {"step": self.step, "total": total,
                             "fraction": (self.step / total) if total else 0.0},
                "request": request_echo(self.request, self.output),
                "result": self.result if include_result else None,
                "error": self.error,
            }


def _image_bytes(result: dict[str, Any] | None) -> int:
    return sum(len(im.get("b64_json") or "") for im in (result or {}).get("images", []))


def _without_preview_images(events: list[JobEvent]) -> list[JobEvent]:
    """The events with every preview's images dropped (each keeps its step, marked superseded)."""
    return [JobEvent(e.id, e.type, {"step": e.data.get("step"), "superseded": True}) if e.type == "job.preview" else e
            for e in events]


def request_echo(request: GenerationRequest, output: OutputOptions) -> dict[str, Any]:
    echo = request.model_dump(mode="json", exclude={"init_image"}, exclude_none=True)
    echo["img2img"] = request.init_image is not None
    echo["output_format"] = output.output_format
    return echo


class QueueFullError(Exception):
    """The job queue is at its limit; the client should retry later."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"the job queue is full ({limit} jobs); retry in {retry_after_s} s")


class DrainingError(Exception):
    """The server is shutting down: it finishes what it has and takes no new jobs."""


class QuotaExceededError(Exception):
    """A key (or, without API keys, the server's one tenant) is at one of its quotas, or the server at a
    global cap; ``quota`` is the setting that sets it."""

    def __init__(self, quota: str, limit: int, what: str, retry_after_s: int = 5) -> None:
        self.quota = quota
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"{what}: at most {limit} ({quota}); retry in {retry_after_s} s, once one has ended")


class JobStore:
    """All jobs by id; finished ones are dropped after ``ttl_s`` or beyond ``max_finished``, and the
    images they hold are capped at ``max_image_bytes`` base64 characters in all: past it the oldest
    finished jobs' images are released (the jobs stay, marked ``images_released``). A job whose caller
    delivers the images itself (a synchronous call) is not evicted: the caller releases it.

    Retention is per owner (API key): an owner past ``key_max_finished`` jobs or ``key_max_image_bytes``
    loses its own oldest; past a global cap, the owner holding the most loses its oldest, so one key's
    churn never evicts another key's results. The store also counts SSE listeners (``open_listener``)
    per job, per owner and in all."""

    def __init__(self, ttl_s: float, max_finished: int, max_image_bytes: int | None = None, *,
                 key_max_finished: int | None = None, key_max_image_bytes: int | None = None,
                 max_listeners: int | None = None, key_max_listeners: int | None = None,
                 job_max_listeners: int | None = None) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_image_bytes = max_image_bytes
        self.key_max_finished = key_max_finished
        self.key_max_image_bytes = key_max_image_bytes
        self.max_listeners = max_listeners
        self.key_max_listeners = key_max_listeners
        self.job_max_listeners = job_max_listeners
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._listeners: Counter[str] = Counter()  # by job id
        self._owner_listeners: Counter[str | None] = Counter()

    def add(self, job: Job) -> None:
        with self._lock:
            self._prune()
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            self._prune()
            return list(self._jobs.values())

    def count(self, owner: str | None, status: JobStatus) -> int:
        """How many of ``owner``'s jobs have ``status``."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.owner == owner and j.status is status)

    def open_listener(self, job: Job, owner: str | None) -> Callable[[], None]:
        """Count one SSE listener of ``job`` for ``owner``; returns its release (idempotent). Raises
        QuotaExceededError past ``job_max_listeners``, ``key_max_listeners`` or ``max_listeners``."""
        with self._lock:
            if self.job_max_listeners is not None and self._listeners[job.id] >= self.job_max_listeners:
                raise QuotaExceededError("max_sse_listeners_per_job", self.job_max_listeners,
                                         f"event streams open on job {job.id}")
            if self.key_max_listeners is not None and self._owner_listeners[owner] >= self.key_max_listeners:
                raise QuotaExceededError("key_max_sse_listeners", self.key_max_listeners,
                                         "event streams open for this API key")
            if self.max_listeners is not None and self._listeners.total() >= self.max_listeners:
                raise QuotaExceededError("max_sse_listeners", self.max_listeners, "event streams open on this server")
            self._listeners[job.id] += 1
            self._owner_listeners[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                for counts, key in ((self._listeners, job.id), (self._owner_listeners, owner)):
                    counts[key] -= 1
                    if not counts[key]:  # no zeros kept for jobs and keys no longer listened to
                        del counts[key]

        return release

    def _prune(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.status.finished]
        expired = {j.id for j in finished if j.completed_at is not None and now - j.completed_at > self.ttl_s}
        kept: dict[str | None, deque[Job]] = {}  # each owner's finished jobs, oldest first
        for job in finished:
            if job.id not in expired:
                kept.setdefault(job.owner, deque()).append(job)
        for jobs in kept.values():
            while self.key_max_finished is not None and len(jobs) > self.key_max_finished:
                expired.add(jobs.popleft().id)
        overflow = sum(len(jobs) for jobs in kept.values()) - self.max_finished
        for _ in range(max(0, overflow)):  # past the global cap: the owner keeping the most gives one up
            expired.add(max(kept.values(), key=len).popleft().id)
        for job_id in expired:
            del self._jobs[job_id]
        held: Counter[str | None] = Counter()
        for job in self._jobs.values():
            if job.image_bytes:
                held[job.owner] += job.image_bytes
        if not ((self.key_max_image_bytes is not None and any(b > self.key_max_image_bytes for b in held.values()))
                or (self.max_image_bytes is not None and held.total() > self.max_image_bytes)):
            return  # within the image caps (the usual case, at every request): no oldest-first order needed
        holding: dict[str | None, deque[Job]] = {}  # each owner's releasable images, oldest first
        for job in sorted(self._jobs.values(), key=lambda j: j.completed_at or 0.0):
            if job.image_bytes and not job.delivered_by_caller:
                holding.setdefault(job.owner, deque()).append(job)

        def release(owner: str | None) -> None:
            job = holding[owner].popleft()
            held[owner] -= job.image_bytes
            job.release_images()
            if not holding[owner]:
                del holding[owner]

        if self.key_max_image_bytes is not None:
            for owner in list(holding):
                while owner in holding and held[owner] > self.key_max_image_bytes:
                    release(owner)
        while self.max_image_bytes is not None and holding and held.total() > self.max_image_bytes:
            release(max(holding, key=lambda owner: held[owner]))  # the owner holding the most gives some up
