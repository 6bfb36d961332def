"""Jobs: one generation request, its state machine, its event log (for SSE), and the job store."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import OrderedDict
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
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = field(default_factory=list, repr=False)

    def emit(self, type_: str, data: dict[str, Any] | None = None) -> JobEvent:
        with self._lock:
            event = JobEvent(len(self.events) + 1, type_, data or {})
            if type_ == "job.preview":  # keep the latest preview's images only (a replay shows the newest)
                self.events = _without_preview_images(self.events)
            self.events.append(event)
            finished = self.status.finished
            waiters = [(loop, flag) for loop, flag, finish_only in self._waiters if finished or not finish_only]
        for loop, flag in waiters:  # wake the requests waiting on this job, on their event loops
            loop.call_soon_threadsafe(flag.set)
        return event

    def watch(self, finish_only: bool = False) -> asyncio.Event:
        """An asyncio.Event (of the running loop) set after every new event, or with ``finish_only``
        only once the job has finished; ``unwatch`` when done.

        A synchronous call watches finish-only: waking the event loop at every step made the worker's
        steps slower (the loop thread takes a core and the GIL from the worker's OpenMP team).
        """
        flag = asyncio.Event()
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), flag, finish_only))
        return flag

    async def wait_finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job to finish (woken once, at the end, not at every
        step); returns whether it has."""
        flag = self.watch(finish_only=True)
        try:
            if not self.status.finished:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flag.wait(), timeout)
        finally:
            self.unwatch(flag)
        return self.status.finished

    def unwatch(self, flag: asyncio.Event) -> None:
        with self._lock:
            self._waiters = [waiter for waiter in self._waiters if waiter[1] is not flag]

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


class JobStore:
    """All jobs by id; finished ones are dropped after ``ttl_s`` or beyond ``max_finished``, and the
    images they hold are capped at ``max_image_bytes`` base64 characters in all: past it the oldest
    finished jobs' images are released (the jobs stay, marked ``images_released``). A job whose caller
    delivers the images itself (a synchronous call) is not evicted: the caller releases it."""

    def __init__(self, ttl_s: float, max_finished: int, max_image_bytes: int | None = None) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_image_bytes = max_image_bytes
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

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

    def _prune(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.status.finished]
        expired = {j.id for j in finished if j.completed_at is not None and now - j.completed_at > self.ttl_s}
        overflow = len(finished) - len(expired) - self.max_finished
        if overflow > 0:
            expired |= {j.id for j in [j for j in finished if j.id not in expired][:overflow]}
        for job_id in expired:
            del self._jobs[job_id]
        if self.max_image_bytes is None:
            return
        holding = sorted((j for j in self._jobs.values() if j.image_bytes and not j.delivered_by_caller),
                         key=lambda j: j.completed_at or 0.0)
        held = sum(j.image_bytes for j in self._jobs.values() if j.image_bytes)
        for job in holding:
            if held <= self.max_image_bytes:
                break
            held -= job.image_bytes
            job.release_images()
