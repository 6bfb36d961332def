"""Prometheus metrics of one server instance (its own registry, so several apps can coexist)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("accel_diffusion_queue_depth", "jobs waiting in the queue", registry=r)
        self.in_flight = Gauge("accel_diffusion_jobs_in_flight", "jobs running on a worker", registry=r)
        self.job_seconds = Histogram("accel_diffusion_job_seconds", "job run time (s)", registry=r,
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.request_seconds = Histogram("accel_diffusion_request_seconds", "HTTP request latency (s)",
                                         ["route"], registry=r,
                                         buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.step_seconds = Histogram("accel_diffusion_step_seconds", "denoising step time (s)", registry=r,
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.images = Counter("accel_diffusion_images", "images generated", registry=r)
        self.nfe = Counter("accel_diffusion_nfe", "model evaluations (per image)", registry=r)
        self.batch_size = Histogram("accel_diffusion_batch_size", "jobs per worker batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.cancellations = Counter("accel_diffusion_cancellations", "cancelled jobs", registry=r)
        self.errors = Counter("accel_diffusion_errors", "failed jobs and rejected requests", ["type"], registry=r)
        self.device_seconds = Counter("accel_diffusion_device_seconds", "worker time by lane (stream frames, "
                                      "job steps), as the fair share measured it (s)", ["lane"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def server_state(app: Any) -> Any:
    """The app's ServerState (``app.state.server``), or None before its lifespan made it or for a scope
    without an app."""
    return getattr(app.state, "server", None) if app is not None else None


def count_error(app: Any, type_: str) -> None:
    """Count one error response in ``errors_total`` (a failed job is counted by the worker instead)."""
    state = server_state(app)
    if state is not None:
        state.metrics.errors.labels(type=type_).inc()
