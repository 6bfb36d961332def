"""The app behind a real uvicorn on 127.0.0.1: generation over TCP, a client that disconnects from a
synchronous call cancels its job, shutdown lets the running job finish, and no API key reaches a log line."""

from __future__ import annotations

import base64
import json
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


def test_no_api_key_reaches_the_log(tiny_models_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """uvicorn writes request URLs in its access log and WebSocket lines: the values of query secrets
    (``?api_key=``, ``token``, ...) are redacted there, whatever the answer, and the SDK, web page and
    subprotocol forms never put the key in a URL."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    key = "sk-live-4f7b9c"
    app = create_app(make_settings(tiny_models_file, api_keys=[key]))
    with running_server(app, log_level="info") as (_, _, base), httpx.Client(base_url=base, timeout=60) as http:
        ws_url = base.replace("http", "ws") + "/v1/stream"
        assert http.get("/v1/stream/nope/mjpeg", params={"api_key": key}).status_code == 404
        assert http.get("/v1/models", params={"token": key, "x": 1, "access_token": key}).status_code == 401
        assert http.get("/web/", params={"api_key": key}).status_code == 200
        with connect(f"{ws_url}?api_key={key}") as ws:  # the old form, kept for compatibility
            ws.send(json.dumps({"type": "stats"}))
            assert json.loads(ws.recv())["type"] == "stats"
        with pytest.raises(InvalidStatus), connect(f"{ws_url}?api_key={key}-wrong"):
            pass
        encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        with connect(ws_url, subprotocols=["accel-diffusion", f"base64url.bearer.{encoded}"]) as ws:
            assert ws.subprotocol == "accel-diffusion"
    log = "".join(capfd.readouterr())
    assert key not in log and encoded not in log, log
    for line in ('"GET /v1/stream/nope/mjpeg?api_key=[redacted] HTTP/1.1" 404',
                 '"GET /v1/models?token=[redacted]&x=1&access_token=[redacted] HTTP/1.1" 401',
                 '"GET /web/?api_key=[redacted] HTTP/1.1" 200', '"WebSocket /v1/stream?api_key=[redacted]" [accepted]',
                 '"WebSocket /v1/stream?api_key=[redacted]" 403', '"WebSocket /v1/stream" [accepted]'):
        assert line in log, (line, log)

