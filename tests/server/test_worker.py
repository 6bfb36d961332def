"""DeviceWorker: short model tasks (stream frames) run between a running job's steps, outside its mode."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from accel_diffusion.server.jobs import Job, JobStatus
from accel_diffusion.server.metrics import ServerMetrics
from accel_diffusion.server.worker import DeviceWorker

from accel_diffusion.engine import Engine, batch_invariance
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest


def test_a_task_queued_during_a_job_runs_between_its_steps_without_the_batch_invariant_mode(
        tiny_models_file: Path) -> None:
    worker = DeviceWorker(Engine(ModelRegistry.from_file(tiny_models_file)), queue_max=4, metrics=ServerMetrics(),
                          batch_invariant=True)
    seen: dict[str, Any] = {}
    done = threading.Event()

    def probe() -> None:
        seen["mode"] = batch_invariance.active()
        seen["step"] = job.progress_step
        seen["running"] = worker._running is job

    class ProbingJob(Job):
        progress_step = 0

        def progress(self, step: int, total: int) -> None:
            super().progress(step, total)
            self.progress_step = step
            if step == 2:
                seen["mode in job"] = batch_invariance.active()
                worker.run_soon(probe).add_done_callback(lambda _: done.set())

    job = ProbingJob(request=GenerationRequest.create(model="tiny", prompt="a", steps=6, n=2))
    worker.start()
    try:
        worker.submit(job)
        assert done.wait(60)
    finally:
        worker.stop(timeout=60)
    assert job.status is JobStatus.SUCCEEDED
    assert seen["mode in job"] is not None  # the job's steps run batch-invariantly ...
    assert seen["mode"] is None  # ... the task between them does not
    assert seen["running"] and 2 <= seen["step"] < 6


def test_streams_that_keep_the_device_busy_do_not_starve_queued_jobs(tiny_models_file: Path) -> None:
    """Two streams whose frames arrive back to back keep the urgent queue non-empty: a job still runs."""
    import time

    worker = DeviceWorker(Engine(ModelRegistry.from_file(tiny_models_file)), queue_max=4, metrics=ServerMetrics())
    stop = threading.Event()

    def frame() -> None:
        time.sleep(0.002)

    def stream() -> None:  # one frame in flight, the next sent as soon as it is done (as the server does)
        while not stop.is_set():
            worker.run_soon(frame).result()

    job = Job(request=GenerationRequest.create(model="tiny", prompt="a", steps=2))
    worker.start()
    streams = [threading.Thread(target=stream) for _ in range(2)]
    try:
        for thread in streams:
            thread.start()
        time.sleep(0.2)
        worker.submit(job)
        deadline = time.monotonic() + 20
        while not job.status.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_while_streaming = job.status.finished
    finally:
        stop.set()
        for thread in streams:
            thread.join()
        worker.stop(timeout=60)
    assert job.status is JobStatus.SUCCEEDED
    assert finished_while_streaming
