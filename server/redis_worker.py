"""The worker role on the Redis queue: claim jobs when the device is idle, run them on the DeviceWorker (which
batches compatible ones as in memory mode), publish their events and results, hold their leases, and stop a
job whose cancel flag is set at its next step."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from accel_diffusion.server.jobs import Job, JobEvent, QueueFullError
from accel_diffusion.server.redis_backend import TERMINAL, ClaimedJob, RedisJobQueue
from accel_diffusion.server.worker import DeviceWorker

log = logging.getLogger("accel_diffusion.server")
TERMINAL_TYPES = frozenset(TERMINAL.values())
TRIM_EVERY_S = 30.0


@dataclass(eq=False)
class RedisJob(Job):
    """A claimed job: a Job for the DeviceWorker whose events also go to Redis, fenced by its attempt (a
    worker whose lease was taken over writes nothing), its end through the queue's one completion script.
    ``outcome``: that script's answer (1 written, 0 an earlier run's result stands, -1 no longer ours)."""

    claim: ClaimedJob | None = None
    queue: RedisJobQueue | None = None
    consumer: str = ""
    outcome: int | None = None
    finished: threading.Event | None = None  # set once its end is written (the runner claims the next job)
    publisher: Publisher | None = None  # sends its progress, preview and start events off the device's thread

    def emit(self, type_: str, data: dict[str, Any] | None = None) -> JobEvent:
        event = super().emit(type_, data)
        if type_ == "job.queued" or self.claim is None or self.queue is None:  # queued: the API published it
            return event
        try:
            if type_ in TERMINAL_TYPES:
                if self.publisher is not None:
                    self.publisher.flush()  # its earlier events first
                self.outcome = self.queue.complete(self.claim, self.consumer, self.status.value, self.result,
                                                   self.error, self.step)
                if self.outcome == 1:  # written once: its images count against the caps once
                    images = (self.result or {}).get("images", [])
                    self.queue.hold_images(self.id, self.owner, sum(len(im.get("b64_json") or "") for im in images))
                    self.queue.retain(self.id)
                if self.finished is not None:
                    self.finished.set()
            elif self.publisher is not None:
                self.publisher.put(lambda pipe: self._publish(pipe, type_, event.data))
            else:
                self._publish(None, type_, event.data)
        except redis.RedisError as exc:  # the lease runs out and another worker runs the job again
            log.warning("job %s: could not publish %s (%s); its lease will expire", self.id, type_, exc)
        return event

    def _publish(self, pipe: redis.client.Pipeline | None, type_: str, data: dict[str, Any]) -> None:
        assert self.claim is not None and self.queue is not None
        if type_ == "job.progress":
            self.queue.emit(self.claim, type_, data, data["step"], data["total"], client=pipe)
        elif type_ == "job.preview":
            self.queue.emit_preview(self.claim, data, client=pipe)
        elif type_ == "job.started":
            self.queue.emit(self.claim, type_, {"attempt": self.claim.attempt}, client=pipe)
        else:
            self.queue.emit(self.claim, type_, data, client=pipe)


class Publisher:
    """A thread that sends running jobs' events to Redis, all those waiting in one pipeline (one round trip),
    so the device never waits on Redis between steps; ``flush`` returns once all put so far are sent. A daemon
    thread: it outlives the runner's stop, for the jobs still finishing on the device."""

    def __init__(self, queue: RedisJobQueue) -> None:
        self.queue = queue
        self._items: list[Callable[[redis.client.Pipeline], None]] = []
        self._cond = threading.Condition()
        self._sending = False
        self._thread = threading.Thread(target=self._run, name="accel-diffusion-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Callable[[redis.client.Pipeline], None]) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._items and not self._sending, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items)
                items, self._items, self._sending = self._items, [], True
            try:
                pipe = self.queue.redis.pipeline(transaction=False)
                for item in items:
                    item(pipe)
                pipe.execute()
            except redis.RedisError as exc:  # lost events; the lease runs out if Redis stays away
                log.warning("could not publish %d job events (%s)", len(items), exc)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()


class RedisJobRunner:
    """Feeds ``worker`` from the Redis queue of ``models`` as consumer ``consumer`` (a stable, unique name:
    the pod's). Two threads: one claims (only when the device is idle, up to ``batch_size`` jobs), one renews
    the leases of the jobs held every third of the lease and polls their cancel flags every ``poll_s``. While
``accepting()`` is false (the server drains) it claims nothing."""

    def __init__(self, queue: RedisJobQueue, worker: DeviceWorker, models: list[str], consumer: str,
                 batch_size: int = 1, poll_s: float = 0.1, accepting: Callable[[], bool] = lambda: True) -> None:
        self.queue = queue
        self.worker = worker
        self.models = models
        self.consumer = consumer
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.accepting = accepting  # False while the server drains: the jobs held finish, no new one is claimed
        self._held: dict[str, RedisJob] = {}  # by queue entry id
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._finished = threading.Event()  # a held job's end was written
        self.publisher = Publisher(queue)
        self._threads = [threading.Thread(target=self._claim_loop, name="accel-diffusion-claim", daemon=True),
                         threading.Thread(target=self._lease_loop, name="accel-diffusion-lease", daemon=True)]

    def start(self) -> None:
        self.publisher.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Claim no more; the jobs held finish on the worker (a job left unfinished is reclaimed elsewhere)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def held(self) -> list[RedisJob]:
        with self._lock:
            return list(self._held.values())

    def _claim_loop(self) -> None:
        soon = 0.0  # until then the device is polled every 0.5 ms (a job just ended: it is idle any moment)
        while not self._stopping.is_set():
            with self._lock:
                for entry_id in [e for e, job in self._held.items() if job.status.finished]:
                    del self._held[entry_id]
            if self.worker.busy or self.worker.queue_depth or not self.accepting():
                if self._finished.is_set():
                    self._finished.clear()
                    soon = time.monotonic() + 0.05
                if time.monotonic() < soon:
                    time.sleep(0.0005)
                else:
                    self._finished.wait(0.01)
                continue
            try:
                claimed = self.queue.claim(self.models, self.consumer, self.batch_size, block_ms=500)
            except redis.RedisError as exc:
                log.warning("cannot claim jobs from redis (%s); retrying in 1 s", exc)
                self._stopping.wait(1.0)
                continue
            for claim in claimed:
                job = RedisJob(request=claim.request, output=claim.output, id=claim.job_id,
                               created_at=claim.created_at, owner=claim.owner, claim=claim, queue=self.queue,
                               consumer=self.consumer, finished=self._finished,
                               publisher=self.publisher)
                try:
                    self.worker.submit(job)
                except QueueFullError:  # the worker is stopping: the job's lease runs out, another worker runs it
                    continue
                with self._lock:
                    self._held[claim.entry_id] = job

    def _lease_loop(self) -> None:
        renew_every = self.queue.lease_ms / 3000
        renewed = trimmed = time.monotonic()
        while not self._stopping.wait(min(self.poll_s, renew_every)):
            jobs = [job for job in self.held if not job.status.finished]
            try:
                if time.monotonic() - renewed >= renew_every:
                    renewed = time.monotonic()
                    self._renew(jobs)
                if time.monotonic() - trimmed >= TRIM_EVERY_S:  # finished jobs' queue entries
                    trimmed = time.monotonic()
                    for model in self.models:
                        self.queue.trim(model)
                for job_id in self.queue.cancel_requested([job.id for job in jobs]):
                    self.worker.cancel(next(job for job in jobs if job.id == job_id))
            except redis.RedisError as exc:
                log.warning("cannot renew leases or read cancel flags (%s)", exc)

    def _renew(self, jobs: list[RedisJob]) -> None:
        by_model: dict[str, list[RedisJob]] = {}
        for job in jobs:
            assert job.claim is not None
            by_model.setdefault(job.claim.model, []).append(job)
        for model, held in by_model.items():
            kept = set(self.queue.renew(model, self.consumer, [job.claim.entry_id for job in held if job.claim]))
            for job in held:
                if job.claim and job.claim.entry_id not in kept:  # reclaimed by another worker: stop running it
                    log.warning("job %s: lease lost to another worker; stopping it here", job.id)
                    self.worker.cancel(job)
