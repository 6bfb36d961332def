"""Helpers for server tests: settings on the tiny model, waiting for jobs, decoding images."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from accel_diffusion.server import ServerSettings
from accel_diffusion.server.process import DrainingServer, uvicorn_config
from accel_diffusion.server.settings import LOOPBACK_HOSTS
from fastapi import FastAPI
from PIL import Image


def make_settings(models_file: Path, **overrides: Any) -> ServerSettings:
    """Settings on the tiny model; the hosts served are the loopback names and TestClient's "testserver";
    eager (the server's default compiles its buckets at startup: a test asks for that explicitly)."""
    return ServerSettings(**{"models_file": models_file, "served_models": ["tiny"], "warmup_steps": 1,
                             "engine_acceleration": "none", "allowed_hosts": ["testserver", *LOOPBACK_HOSTS],
                             **overrides})


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def wait_finished(client: Any, job_id: str, timeout: float = 60.0,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise TimeoutError(job_id)


def wait_status(client: Any, job_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.005)
    raise TimeoutError(f"{job_id} never reached {status}")


def sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


@contextmanager
def running_server(app: FastAPI, log_level: str = "warning") -> Iterator[tuple[uvicorn.Server, threading.Thread, str]]:
    settings = app.state.settings.model_copy(update={"host": "127.0.0.1", "port": 0})
    server = DrainingServer(uvicorn_config(app, settings, 60, log_level=log_level), app, 60)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, thread, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(120)


def init_png() -> bytes:
    """A 32x32 PNG: a red square on black, the img2img input of the server and SDK tests."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (220, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
