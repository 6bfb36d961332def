"""Out of device memory on the worker's two paths (jobs, stream frames): a real ``torch.OutOfMemoryError`` raised
inside a real tiny pipeline's UNet forward is classified (``gpu_oom``, counted), the worker serves the next request,
and the device memory is released after the exception's frames are gone (outside any except block)."""

from __future__ import annotations

import io
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accel_diffusion.server import create_app
from accel_diffusion.server import worker as worker_module
from accel_diffusion.server.jobs import Job, JobStatus
from accel_diffusion.server.metrics import ServerMetrics
from accel_diffusion.server.worker import DeviceWorker
from fastapi.testclient import TestClient
from PIL import Image
from server_clients import make_settings

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"


class Releases:
    """Spies on ``release_device_memory`` (and calls the real one): the exception being handled when it runs,
    and whether the tensor the failed forward made is still alive then."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, bool]] = []
        self.tensors: list[weakref.ref[torch.Tensor]] = []

    def __call__(self) -> None:
        alive = any(ref() is not None for ref in self.tensors)
        self.seen.append((sys.exc_info(), alive))
        real_release()


real_release = getattr(worker_module, "release_device_memory", lambda: None)


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> Iterator[Releases]:
    spy = Releases()
    monkeypatch.setattr(worker_module, "release_device_memory", spy, raising=False)
    yield spy


def oom_when(unet: torch.nn.Module, releases: Releases, fails: Callable[[torch.Tensor], bool]) -> Any:
    """A forward pre-hook raising the CUDA allocator's error (its message included) when ``fails(sample)``;
    the activation it made first lives only in the failing frame."""

    def hook(module: object, args: tuple[torch.Tensor, ...]) -> None:
        if fails(args[0]):
            activation = torch.ones(256, 256)
            releases.tensors.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139.81 GiB total)")

    return unet.register_forward_pre_hook(hook)


def run(worker: DeviceWorker, *jobs: Job) -> None:
    for job in jobs:
        worker.submit(job)
    wait(*jobs)


def wait(*jobs: Job) -> None:
    deadline = time.monotonic() + 60
    while not all(job.status.finished for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.02)


def job(seed: int, steps: int = 2) -> Job:
    return Job(request=GenerationRequest.create(model="tiny", prompt=PROMPT, seed=seed, steps=steps))


def test_a_batch_out_of_memory_frees_its_memory_then_runs_each_job_alone(tiny_models_file: Path,
                                                                          releases: Releases) -> None:
    metrics = ServerMetrics()
    worker = DeviceWorker(Engine(ModelRegistry.from_file(tiny_models_file)), queue_max=4, metrics=metrics,
                          max_batch_size=2, max_batch_wait_ms=5000)
    unet = worker.engine.models.get("tiny").pipeline.unet
    handle = oom_when(unet, releases, lambda sample: sample.shape[0] == 4)  # 2 jobs x (uncond, cond): the batch
    first, second = job(1), job(2)
    for queued in (first, second):  # both queued before the thread starts: one batch
        worker.submit(queued)
    worker.start()
    try:
        wait(first, second)
    finally:
        handle.remove()
        worker.stop(timeout=60)
    assert first.status is JobStatus.SUCCEEDED and second.status is JobStatus.SUCCEEDED
    assert first.result["batch_size_used"] == 1 and second.result["batch_size_used"] == 1  # the retry ran alone
    assert len(releases.tensors) == 1
    assert releases.seen == [((None, None, None), False)]  # after the except block; the activation already freed
    assert metrics.errors.labels(type="gpu_oom")._value.get() == 0  # nothing failed in the end


def test_a_job_out_of_memory_fails_as_gpu_oom_frees_its_memory_and_the_next_job_runs(
        tiny_models_file: Path, releases: Releases) -> None:
    metrics = ServerMetrics()
    worker = DeviceWorker(Engine(ModelRegistry.from_file(tiny_models_file)), queue_max=4, metrics=metrics)
    unet = worker.engine.models.get("tiny").pipeline.unet
    calls = [0]

    def second_call(sample: torch.Tensor) -> bool:
        calls[0] += 1
        return calls[0] == 2  # inside the job, at its second denoising step

    handle = oom_when(unet, releases, second_call)
    failed, after = job(1, steps=3), job(2)
    worker.start()
    try:
        run(worker, failed)
        run(worker, after)
    finally:
        handle.remove()
        worker.stop(timeout=60)
    assert failed.status is JobStatus.FAILED
    assert failed.error == {"type": "gpu_oom", "code": "gpu_oom", "param": None, "message": "out of device memory"}
    assert after.status is JobStatus.SUCCEEDED
    assert releases.seen == [((None, None, None), False)]
    assert metrics.errors.labels(type="gpu_oom")._value.get() == 1


def frame_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_stream_frame_out_of_memory_answers_gpu_oom_frees_its_memory_and_the_stream_goes_on(
        tiny_models_file: Path, releases: Releases) -> None:
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none", "seed": 3}
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json(start)
        assert ws.receive_json()["type"] == "session.started"
        unet = client.app.state.server.registry.get("tiny").pipeline.unet
        calls = [0]

        def first_call(sample: torch.Tensor) -> bool:
            calls[0] += 1
            return calls[0] == 1

        handle = oom_when(unet, releases, first_call)
        try:
            ws.send_bytes(frame_bytes(0))
            error = ws.receive_json()
            ws.send_bytes(frame_bytes(1))
            served = ws.receive_json()
            image = ws.receive_bytes()
        finally:
            handle.remove()
        metrics = client.get("/metrics").text
    assert error["type"] == "error" and error["code"] == "gpu_oom" and error["param"] == "frame"
    assert error["message"].startswith("out of device memory on this frame (seq 1)")
    assert served["type"] == "frame" and served["seq"] == 2 and not served["warming_up"] and image[:2] == b"\xff\xd8"
    assert releases.seen == [((None, None, None), False)]  # on the worker thread, after its except block
    assert 'accel_diffusion_errors_total{type="gpu_oom"} 1.0' in metrics
