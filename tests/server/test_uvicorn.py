"""The app behind a real uvicorn on 127.0.0.1: generation over TCP, a client that disconnects from a
synchronous call cancels its job, and shutdown lets the running job finish."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server.jobs import JobStatus
from server_clients import decode, make_settings, running_server


def test_real_server_generates_and_drains(tiny_models_file: Path) -> None:
    app = create_app(make_settings(tiny_models_file))
    with running_server(app) as (server, thread, base), httpx.Client(base_url=base, timeout=60) as http:
        assert http.get("/health/ready").json()["status"] == "ready"
        response = http.post("/v1/images/generations", json={"prompt": "a cross", "seed": 4, "num_inference_steps": 2})
        assert response.status_code == 200 and response.headers["X-Request-Id"]
        assert decode(response.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
        job_id = http.post("/v1/jobs", json={"prompt": "a cross", "n": 4, "seed": 0, "steps": 150}).json()["id"]
        job = app.state.server.jobs.get(job_id)
        while job.status is JobStatus.QUEUED:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does: drain first
        ready = http.get("/health/ready")
        refused = http.post("/v1/jobs", json={"prompt": "late", "steps": 2})
        assert ready.status_code == 503 and refused.status_code == 503 and refused.headers["Retry-After"]
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # still answering while draining
        thread.join(120)
        assert not thread.is_alive()
    assert job.status is JobStatus.SUCCEEDED and job.step == 150  # the running job finished before exit


def test_disconnecting_client_cancels_its_job(tiny_models_file: Path) -> None:
    app = create_app(make_settings(tiny_models_file))
    with running_server(app) as (_, _, base):
        with httpx.Client(base_url=base, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/images/generations", json={"prompt": "a cross", "n": 4, "seed": 0,
                                                      "num_inference_steps": 150})
        store = app.state.server.jobs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(j.status.finished for j in store.all()):
            time.sleep(0.02)
        (job,) = store.all()
        assert job.status is JobStatus.CANCELLED and job.step < 150


def test_a_prompt_that_cannot_be_encoded_is_a_400_and_the_batch_and_connection_go_on(tiny_models_file: Path) -> None:
    """The report of issue #16 over TCP with batching on: a lone surrogate in a prompt is refused at the
    edge, the keep-alive connection stays usable, and the jobs around it complete."""
    app = create_app(make_settings(tiny_models_file, max_batch_size=4, max_batch_wait_ms=300))
    with running_server(app) as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        good = [http.post("/v1/jobs", json={"prompt": "a cross", "seed": seed, "steps": 2}) for seed in (1, 2)]
        bad = http.post("/v1/jobs", content=b'{"prompt": "a \\ud800 cross", "seed": 3, "steps": 2}',
                        headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        listed = http.get("/v1/jobs")  # on the same keep-alive connection
        assert listed.status_code == 200 and len(listed.json()["data"]) == 2
        for response in good:
            job = http.get(f"/v1/jobs/{response.json()['id']}", params={"wait": 30}).json()
            assert job["status"] == "succeeded" and job["result"]["batch_size_used"] == 2
