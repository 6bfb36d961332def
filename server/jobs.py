"""Jobs: one generation request, its state machine, its event log (for SSE), and the job store."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
import uuid
from collections import Counter, OrderedDict
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
    # the store keeping this job: told when it finishes or releases its images (its accounting is incremental)
    _store_hook: Callable[[Job], None] | None = field(default=None, repr=False)

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
                    async with asyncio.timeout(timeout):  # no task of its own (wait_for's): one loop step less
                        await watch.next().wait()
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
        if self._store_hook is not None:  # no longer queued
            self._store_hook(self)
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
        if self._store_hook is not None:
            self._store_hook(self)
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
        if self._store_hook is not None:
            self._store_hook(self)

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
        # reentrant: a release the prune makes tells the store (the job's hook) within the prune
        self._lock = threading.RLock()
        # The retention accounting, kept as jobs are added, finish, release images and go (no rescan of the
        # kept jobs per request). Heaps hold (key, add order, job id); an entry whose job has gone or no
        # longer qualifies is skipped when it comes up.
        self._added = 0
        self._order: dict[str, int] = {}  # job id -> add order
        self._held: dict[str, int] = {}  # finished job id -> the image bytes it is counted with
        self._kept: Counter[str | None] = Counter()  # finished jobs kept, per owner
        self._held_by: Counter[str | None] = Counter()  # image bytes held, per owner
        self._by_completion: list[tuple[float, int, str]] = []  # finished jobs, for the TTL
        self._oldest: dict[str | None, list[tuple[int, str]]] = {}  # each owner's finished jobs, oldest added first
        self._images: dict[str | None, list[tuple[float, int, str]]] = {}  # releasable images, oldest first
        self._listeners: Counter[str] = Counter()  # by job id
        self._owner_listeners: Counter[str | None] = Counter()
        self._queued: dict[str | None, set[str]] = {}  # owner -> its kept jobs still queued (``count``)

    def add(self, job: Job) -> None:
        job._store_hook = self._changed
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
            self._order[job.id] = self._added
            self._added += 1
            if job.status is JobStatus.QUEUED:
                self._queued.setdefault(job.owner, set()).add(job.id)
            if job.status.finished:
                self._changed(job)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            self._prune()
            return list(self._jobs.values())

    def count(self, owner: str | None, status: JobStatus) -> int:
        """How many of ``owner``'s jobs have ``status`` (queued: kept as jobs are added and start or finish,
        not a scan of every kept job at every request)."""
        with self._lock:
            if status is JobStatus.QUEUED:
                return len(self._queued.get(owner, ()))
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

    def _changed(self, job: Job) -> None:
        """A kept job started, finished or released images: count it (once finished) with the bytes it holds now."""
        with self._lock:
            queued = self._queued.get(job.owner)
            if queued is not None and job.status is not JobStatus.QUEUED:
                queued.discard(job.id)
                if not queued:
                    del self._queued[job.owner]
            if job.id not in self._jobs or not job.status.finished:
                return
            order, owner = self._order[job.id], job.owner
            if job.id not in self._held:  # its finish
                self._kept[owner] += 1
                heapq.heappush(self._by_completion, (job.completed_at or 0.0, order, job.id))
                heapq.heappush(self._oldest.setdefault(owner, []), (order, job.id))
                if job.image_bytes and not job.delivered_by_caller:
                    heapq.heappush(self._images.setdefault(owner, []), (job.completed_at or 0.0, order, job.id))
            self._held_by[owner] += job.image_bytes - self._held.get(job.id, 0)
            self._held[job.id] = job.image_bytes

    def _drop(self, job: Job) -> None:
        del self._jobs[job.id], self._order[job.id]
        self._held_by[job.owner] -= self._held.pop(job.id)
        self._kept[job.owner] -= 1
        if not self._kept[job.owner]:  # none left: nor any of its entries
            del self._kept[job.owner]
            self._oldest.pop(job.owner, None)
            self._images.pop(job.owner, None)
        if not self._held_by[job.owner]:
            del self._held_by[job.owner]

    def _reindex(self) -> None:
        kept = [self._jobs[job_id] for job_id in self._held]
        self._by_completion = [(j.completed_at or 0.0, self._order[j.id], j.id) for j in kept]
        self._oldest, self._images = {}, {}
        for job in kept:
            self._oldest.setdefault(job.owner, []).append((self._order[job.id], job.id))
            if job.image_bytes and not job.delivered_by_caller:
                self._images.setdefault(job.owner, []).append((job.completed_at or 0.0, self._order[job.id], job.id))
        for heap in [self._by_completion, *self._oldest.values(), *self._images.values()]:
            heapq.heapify(heap)

    def _front(self, heap: list[Any], key: Callable[[Job], bool]) -> Job | None:
        """The job of the heap's first entry that is still kept and ``key``, dropping the entries before it."""
        while heap:
            job = self._jobs.get(heap[0][-1])
            if job is not None and key(job):
                return job
            heapq.heappop(heap)
        return None

    def _prune(self) -> None:
        """Drop the expired and the finished jobs past the caps, release images past the image caps. Only the
        jobs that go or release are visited (the kept ones are counted as they change: ``_changed``)."""
        now = time.time()
        entries = len(self._by_completion) + sum(map(len, self._oldest.values())) + sum(map(len, self._images.values()))
        if entries > 6 * len(self._held) + 64:  # mostly entries of jobs gone (3 at most per kept job): rebuilt
            self._reindex()
        # past the TTL, in finishing order (a job's completed_at is its finish time)
        while (job := self._front(self._by_completion, lambda j: True)) is not None:
            if job.completed_at is not None and now - job.completed_at > self.ttl_s:
                heapq.heappop(self._by_completion)
                self._drop(job)
            else:
                break
        finished = lambda j: j.status.finished  # noqa: E731
        if self.key_max_finished is not None:
            for owner in [o for o, n in self._kept.items() if n > self.key_max_finished]:
                while self._kept.get(owner, 0) > self.key_max_finished:
                    self._drop(self._front(self._oldest[owner], finished))  # type: ignore[arg-type]
        if self._kept.total() > self.max_finished:  # past the global cap: the owner keeping the most gives one up
            # (ties: the owner whose oldest kept job is the oldest, as these owners stood before the loop)
            rank = {o: self._front(self._oldest[o], finished) and self._oldest[o][0][0] for o in self._kept}
            while self._kept.total() > self.max_finished:
                owner = max(self._kept, key=lambda o: (self._kept[o], -rank[o]))
                self._drop(self._front(self._oldest[owner], finished))  # type: ignore[arg-type]
        held = self._held_by
        if not ((self.key_max_image_bytes is not None and any(b > self.key_max_image_bytes for b in held.values()))
                or (self.max_image_bytes is not None and held.total() > self.max_image_bytes)):
            return  # within the image caps (the usual case, at every request)
        releasable = lambda j: j.image_bytes > 0 and not j.delivered_by_caller  # noqa: E731
        holding = [o for o, heap in self._images.items() if self._front(heap, releasable) is not None]
        # each owner's releasable images go oldest finished first; ties between owners: the one whose oldest
        # releasable images are the oldest
        rank = {o: self._images[o][0][:2] for o in holding}

        def release(owner: str | None) -> None:
            self._front(self._images[owner], releasable).release_images()  # type: ignore[union-attr]
            heapq.heappop(self._images[owner])  # (its hook has taken its bytes off ``held``)
            if self._front(self._images[owner], releasable) is None:
                holding.remove(owner)

        if self.key_max_image_bytes is not None:
            for owner in list(holding):
                while owner in holding and held[owner] > self.key_max_image_bytes:
                    release(owner)
        while self.max_image_bytes is not None and holding and held.total() > self.max_image_bytes:
            release(max(holding, key=lambda o: (held[o], tuple(-x for x in rank[o]))))
