"""The device worker: one thread that owns the engine (and so the pipelines) of one device and runs
queued jobs one after another; the event loop never runs model code."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from accel_diffusion.server.fair_share import FairShare
from accel_diffusion.server.jobs import Job, JobStatus, OutputOptions, QueueFullError
from accel_diffusion.server.metrics import ServerMetrics

from accel_diffusion.engine import Engine, GenerationHooks, batch_invariance
from accel_diffusion.engine.engine import image_seeds
from accel_diffusion.engine.hooks import StepEvent
from accel_diffusion.errors import AccelDiffusionError, GenerationCancelled, InvalidRequestError
from accel_diffusion.imageio import encode_image as encode_image_bytes
from accel_diffusion.strategy import GenerationRequest

log = logging.getLogger("accel_diffusion.server")


def encode_image(image: np.ndarray, output: OutputOptions) -> str:
    """uint8 HWC image -> base64 PNG / JPEG / WebP."""
    return base64.b64encode(encode_image_bytes(image, output.output_format, output.output_compression)).decode("ascii")


class DeviceWorker:
    """A bounded FIFO of jobs, a lane of stream tasks, and the thread that runs them on ``engine``,
    sharing its time between the two by measured cost (``FairShare``: the stream lane gets
    ``stream_share`` of it while both have work)."""

    def __init__(self, engine: Engine, queue_max: int, metrics: ServerMetrics, max_batch_size: int = 1,
                 max_batch_wait_ms: float = 0.0, batch_invariant: bool = True,
                 key_max_running: int | None = None, stream_share: float = 0.5) -> None:
        self.engine = engine
        self.queue_max = queue_max
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.batch_invariant = batch_invariant
        self.key_max_running = key_max_running  # one owner's jobs in a batch
        self._queue: deque[Job] = deque()
        self._urgent: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._batch: list[Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="accel-diffusion-worker", daemon=True)
        self._prepare: Callable[[], None] | None = None
        self._prepared = threading.Event()
        self._prepare_error: BaseException | None = None
        self.last_job_seconds = 1.0
        self.fair_share = FairShare(stream_share)  # touched on the worker thread only
        self.stream_tasks_dropped = 0  # cancelled before they ran (a closed session's frame): never run

    def start(self, prepare: Callable[[], None] | None = None) -> None:
        """Start the thread; it first runs ``prepare`` (load and warm the models) and then jobs.

        All model work happens on this one thread: torch work on a second thread (a warm-up in an
        executor, say) leaves that thread's OpenMP team spinning, which made every later step 2.6x
        slower on a 2-core CPU.
        """
        self._prepare = prepare
        self._thread.start()

    async def wait_prepared(self) -> None:
        """Await the end of ``prepare``; re-raises what it raised."""
        while not self._prepared.is_set():
            await asyncio.sleep(0.05)
        if self._prepare_error is not None:
            raise self._prepare_error

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, cancel the queued ones, end the thread."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            urgent = [future for _, future in self._urgent]
            self._urgent.clear()
        for future in urgent:
            future.cancel()
        with self._cond:
            self._cond.notify_all()
        for job in queued:
            job.finish(JobStatus.CANCELLED)
        self._thread.join(timeout)

    def run_soon(self, task: Callable[[], Any]) -> Future[Any]:
        """Run a short model task (a stream frame, a stream session's set-up) on the worker thread, in
        the stream lane: between the denoising steps of a running job and before queued jobs while the
        lane is within its share of the device time; its Future resolves with the result, or with the
        exception it raised (cancel it to drop the task if it has not started); after an out-of-memory
        one, the task's frames are cleared and the device's cache emptied before the next task. Model
        work stays on this one thread (see ``start``)."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise QueueFullError(self.queue_max, 5)
            self._urgent.append((task, future))
            self._cond.notify_all()
        return future

    def _stream_turns(self, job_running: bool) -> None:
        """Run stream tasks while the fair share gives the stream lane the next turn (all of them while
        no job runs or waits), one by one: the share is decided again after each."""
        while True:
            with self._cond:
                jobs_waiting = job_running or bool(self._queue)
                while self._urgent and self._urgent[0][1].cancelled():  # dropped: never run, never charged
                    self._urgent.popleft()
                    self.stream_tasks_dropped += 1
                if self.fair_share.next(bool(self._urgent), jobs_waiting) != "stream":
                    return
                task, future = self._urgent.popleft()
            if not future.set_running_or_notify_cancel():
                self.stream_tasks_dropped += 1
                continue
            begin = time.perf_counter()
            oom = False
            try:
                with batch_invariance.suspended():  # called between a job's steps, inside its mode
                    result = task()
                future.set_result(result)
            except BaseException as exc:  # handed to the awaiting request (which classifies it: gpu_oom, ...)
                oom = out_of_memory(exc)
                if oom:
                    drop_traceback_locals(exc)  # the future keeps the exception: not the frame's tensors
                future.set_exception(exc)
            finally:
                self._charge("stream", time.perf_counter() - begin)
            if oom:  # out of the except block: nothing holds the failed frame's tensors any more
                release_device_memory()

    def _charge(self, lane: str, seconds: float) -> None:
        self.fair_share.charge(lane, seconds)  # type: ignore[arg-type]
        self.metrics.device_seconds.labels(lane=lane).inc(max(0.0, seconds))

    @property
    def stream_depth(self) -> int:
        """Stream tasks waiting for the worker (not the one running)."""
        with self._cond:
            return len(self._urgent)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its position (0 = next). Raises QueueFullError."""
        with self._cond:
            if self._stopping:
                raise QueueFullError(self.queue_max, 5)
            if len(self._queue) >= self.queue_max:
                retry = max(1, round(self.last_job_seconds * max(1, len(self._queue)) / 2))
                raise QueueFullError(self.queue_max, retry)
            self._queue.append(job)
            position = len(self._queue) - 1
            job.emit("job.queued", {"position": position})  # before the worker can see it: events stay ordered
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return position

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now, or a running one at its next step."""
        job.cancel_event.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth.set(len(self._queue))
                queued = True
            else:
                queued = False
        if queued or (job in self._batch and not all(j.cancel_event.is_set() for j in self._batch)):
            # queued: done now; in a batch that runs on for the others: done now, its images dropped
            self._cancelled(job)

    def _cancelled(self, job: Job) -> None:
        if job.finish(JobStatus.CANCELLED):  # counted once, by whoever finishes it
            self.metrics.cancellations.inc()

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def _run(self) -> None:
        try:
            if self._prepare is not None:
                self._prepare()
        except BaseException as exc:  # reported to the lifespan, which fails start-up
            self._prepare_error = exc
            self._prepared.set()
            return
        self._prepared.set()
        while True:
            self._stream_turns(job_running=False)  # the stream lane's turns before the next job (all, without one)
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._urgent or self._stopping)
                if self._stopping and not self._queue:
                    return
                if self._urgent and self.fair_share.next(True, bool(self._queue)) == "stream":
                    continue
                batch = self._take_batch()
                self.metrics.queue_depth.set(len(self._queue))
                self._running, self._batch = batch[0], batch
            try:
                self._execute(batch)
            finally:
                self._running, self._batch = None, []

    def _take_batch(self) -> list[Job]:
        """The next job, plus queued compatible ones (same batch key) while the batch has room;
        waits up to ``max_batch_wait_ms`` for more. At most ``key_max_running`` jobs of one owner join a
        batch (the others wait for a later one). Called with the lock held."""
        batch = [self._queue.popleft()]
        key = batch_key(batch[0])
        if key is None or self.max_batch_size <= 1:
            return batch
        images = batch[0].request.num_images
        deadline = time.monotonic() + self.max_batch_wait_s
        while images < self.max_batch_size:
            for job in list(self._queue):
                running = sum(j.owner == job.owner for j in batch)
                if self.key_max_running is not None and running >= self.key_max_running:
                    continue
                if batch_key(job) == key and images + job.request.num_images <= self.max_batch_size:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.request.num_images
            remaining = deadline - time.monotonic()
            # stream frames waiting: start with the batch as it is (they run between its steps)
            if images >= self.max_batch_size or remaining <= 0 or self._stopping or self._urgent:
                break
            self._cond.wait(remaining)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        jobs = [job for job in batch if not job.cancel_event.is_set()]
        for job in batch:
            if job.cancel_event.is_set():
                self._cancelled(job)
        if not jobs:
            return
        for job in jobs:
            job.start()
        self.metrics.in_flight.inc(len(jobs))
        begin = time.perf_counter()
        oom = retry = False
        try:
            try:
                self._generate(jobs)
            except GenerationCancelled:
                for job in jobs:
                    self._cancelled(job)
            except Exception as exc:  # one batch's failure must not take the worker down
                if len(jobs) == 1:
                    oom = self._fail(jobs[0], exc)
                else:  # one bad request must not fail the others: each runs alone, so only it fails
                    log.warning("a batch of %d jobs failed (%s: %s); running each alone", len(jobs),
                                type(exc).__name__, exc)
                    oom, retry = out_of_memory(exc), True
                    drop_traceback_locals(exc)
            # out of the except block (its traceback kept the failed batch's activations alive): free them
            # before the next job, or before the smaller runs of the retry
            if oom:
                release_device_memory()
            if retry:
                self._one_by_one(jobs)
        finally:
            self.last_job_seconds = time.perf_counter() - begin
            self.metrics.in_flight.dec(len(jobs))
            for job in jobs:  # one observation per job that ran, not per batch
                if job.started_at is not None:
                    self.metrics.job_seconds.observe(max(0.0, (job.completed_at or time.time()) - job.started_at))

    def _one_by_one(self, jobs: list[Job]) -> None:
        """Run the jobs of a failed batch alone (the same images as in the batch: every image has its
        own seed), so that only the job that fails alone fails."""
        for index, job in enumerate(jobs):
            self._running, self._batch = job, jobs[index:]  # a cancel of a later job finishes it at once
            if job.status.finished:  # finished before the batch failed (cancelled, say)
                continue
            if job.cancel_event.is_set():
                self._cancelled(job)
                continue
            oom = False
            try:
                self._generate([job])
            except GenerationCancelled:
                self._cancelled(job)
            except Exception as exc:
                oom = self._fail(job, exc)
            if oom:
                release_device_memory()

    def _generate(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one engine batch and finish each with its images; raises what the engine raised."""
        last_step = [time.perf_counter()]

        def on_step(event: StepEvent) -> None:
            seconds = time.perf_counter() - last_step[0]
            self.metrics.step_seconds.observe(seconds)
            self._charge("jobs", seconds)  # the batch's step (the first: with its prompt encoding)
            self._stream_turns(job_running=True)  # the stream lane's turns, as its share allows
            last_step[0] = time.perf_counter()
            for job in jobs:
                job.progress(event.step, event.total)

        def on_preview(step: int, images: np.ndarray) -> None:  # single jobs only (previews are not batched)
            u8 = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
            jobs[0].emit("job.preview", {"step": step, "output_format": jobs[0].output.output_format,
                                         "b64_json": [encode_image(im, jobs[0].output) for im in u8]})

        def all_cancelled() -> bool:
            return all(job.cancel_event.is_set() for job in jobs)

        request, seeds = merged_request(jobs)
        try:
            result = self.engine.generate(request, GenerationHooks(on_step=on_step, on_preview=on_preview,
                                                                   cancel=all_cancelled), seeds=seeds,
                                          batch_invariant=self.batch_invariant)
        finally:
            self._charge("jobs", time.perf_counter() - last_step[0])  # the decode after the last step
        pixels = result.to_uint8()
        offset = 0
        for job in jobs:
            count = job.request.num_images
            if job.cancel_event.is_set():  # cancelled while its batch went on for the others
                job.finish(JobStatus.CANCELLED)
                offset += count
                continue
            images = [{"b64_json": encode_image(pixels[offset + i], job.output), "seed": result.seeds[offset + i],
                       "prompt": result.prompts[offset + i]} for i in range(count)]
            offset += count
            job.finish(JobStatus.SUCCEEDED, result={
                "images": images, "width": result.width, "height": result.height, "steps": result.steps,
                "nfe": result.nfe, "strategy": result.strategy.model_dump(exclude_none=True),
                "timings": {**result.timings, "queue": (job.started_at or job.created_at) - job.created_at},
                "attention_backend": result.attention_backend, "batch_size_used": len(jobs),
                **({"communication": result.extra["communication"]} if "communication" in result.extra else {}),
                **({"ar": result.extra["ar"]} if "ar" in result.extra else {}),  # an AR model's head steps
            })
            self.metrics.images.inc(count)
            self.metrics.nfe.inc(result.nfe * count)
        self.metrics.batch_size.observe(len(jobs))

    def _fail(self, job: Job, exc: Exception) -> bool:
        """Finish ``job`` as failed with a typed error (no internals leak); counted once. Returns whether the
        device ran out of memory: the caller then calls ``release_device_memory`` after its except block."""
        oom = False
        if isinstance(exc, InvalidRequestError):
            error = error_body(exc)
        elif isinstance(exc, AccelDiffusionError):
            error = {"type": exc.error_type, "code": exc.error_type, "message": str(exc), "param": None}
        else:
            oom = out_of_memory(exc)
            kind = "gpu_oom" if oom else "internal_error"
            log.error("job %s failed", job.id, exc_info=exc)
            drop_traceback_locals(exc)  # (a log handler that keeps the record keeps code and line numbers only)
            error = {"type": kind, "code": kind, "param": None,
                     "message": "out of device memory" if oom else "internal error"}
        if job.finish(JobStatus.FAILED, error=error):
            self.metrics.errors.labels(type=error["type"]).inc()
        return oom


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (jobs and stream frames classify it the same)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def drop_traceback_locals(exc: BaseException) -> None:
    """Clear the local variables of the finished frames ``exc``'s traceback holds: the failed call's inputs and
    activations. Whoever keeps the exception (a Future, a log record) keeps its code and line numbers only."""
    traceback.clear_frames(exc.__traceback__)


def release_device_memory() -> None:
    """Give the CUDA caching allocator's free blocks back after an out-of-memory failure, so that the next job
    or frame starts from an empty cache. Call it outside any except block, after ``drop_traceback_locals``: while
    an exception is handled, its traceback keeps the failed call's tensors alive, and emptying the cache then
    frees nothing of theirs."""
    gc.collect()  # tensors kept only by reference cycles among the failed call's objects
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_key(job: Job) -> tuple[Any, ...] | None:
    """Jobs with equal keys can run as one engine batch (None: never batched)."""
    request = job.request
    if request.init_image is not None or request.preview_every:
        return None
    return (request.model, request.width, request.height, request.steps, request.negative_prompt, request.vae,
            request.strategy.model_dump_json(), request.ar_iterations)


def merged_request(jobs: list[Job]) -> tuple[GenerationRequest, list[int]]:
    """One engine request for a batch: every job's prompts x n, and every image's own seed."""
    if len(jobs) == 1:
        request = jobs[0].request
        return request, image_seeds(request.seed, request.num_images)
    prompts: list[str] = []
    seeds: list[int] = []
    for job in jobs:
        request = job.request
        prompts += [p for p in request.prompts for _ in range(request.n)]
        seeds += image_seeds(request.seed, request.num_images)
    return jobs[0].request.model_copy(update={"prompt": prompts, "n": 1, "seed": None}), seeds


def error_body(exc: InvalidRequestError) -> dict[str, Any]:
    """OpenAI-shaped error object naming the field."""
    message = exc.message + (f" (allowed: {exc.allowed})" if exc.allowed else "")
    return {"type": exc.error_type, "code": exc.error_type, "message": f"{exc.field}: {message}", "param": exc.field}
