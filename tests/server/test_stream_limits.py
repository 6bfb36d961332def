"""WS /v1/stream: stream sessions have their own size limits, and a closed session's frames are dropped."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server.settings import ServerSettings
from fastapi.testclient import TestClient
from PIL import Image
from server_clients import make_settings

PROMPT = "a red circle on a blue background"


def frame_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_stream_limits_default_to_real_time_sizes() -> None:
    settings = ServerSettings()
    assert (settings.stream_max_width, settings.stream_max_height, settings.stream_max_steps) == (512, 512, 4)
    assert settings.stream_share == 0.5
    assert settings.max_width == 1024  # jobs keep theirs


@pytest.mark.parametrize(("start", "param", "says"), [
    ({"width": 64}, "width", "at most 32 (stream_max_width)"),
    ({"size": "32x64"}, "size", "at most 32 (stream_max_height)"),
    ({"t_index_list": [10, 20, 30]}, "t_index_list", "3 steps a frame; stream sessions take at most 2"),
    ({"mode": "txt2img", "guidance": "none"}, "t_index_list", "4 steps a frame"),  # the txt2img default: 4 steps
])
def test_a_session_past_the_stream_limits_is_refused_naming_the_field(
        tiny_models_file: Path, start: dict[str, object], param: str, says: str) -> None:
    settings = make_settings(tiny_models_file, stream_max_width=32, stream_max_height=32, stream_max_steps=2)
    app = create_app(settings)
    with TestClient(app) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, **start})
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "stream_limit_exceeded" and error["param"] == param
        assert says in error["message"]
        assert app.state.server.stream_sessions == 0  # a refused start holds no slot
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [20, 40]})  # within the limits
        assert ws.receive_json()["session"]["width"] == 32
        ws.send_json({"type": "params.update", "t_index_list": [5, 25, 45]})
        error = ws.receive_json()
        assert (error["code"], error["param"]) == ("stream_limit_exceeded", "t_index_list")
        ws.send_json({"type": "params.update", "t_index_list": [25, 45]})
        assert ws.receive_json() == {"type": "params.updated", "t_index_list": [25, 45]}


def test_a_model_whose_default_size_is_past_the_stream_limits_says_so(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file, stream_max_width=16))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT})
        error = ws.receive_json()
        assert (error["code"], error["param"]) == ("stream_limit_exceeded", "width")
        assert "32 (the model's default) is more than stream sessions take here: at most 16" in error["message"]


def test_a_closed_sessions_frame_waiting_on_the_worker_is_dropped(tiny_models_file: Path) -> None:
    """The worker is held by another task while a session's frame waits behind it; the client closes:
    the frame never runs (the old server ran it, for nobody)."""
    app = create_app(make_settings(tiny_models_file))
    gate = threading.Event()
    with TestClient(app) as client:
        state = app.state.server
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
            session_id = ws.receive_json()["session"]["id"]
            session = state.stream_connections[session_id].session
            ws.send_bytes(frame_bytes(0))
            assert ws.receive_json()["seq"] == 1 and session.stats()["frames"] == 1
            held = state.worker.run_soon(lambda: gate.wait(60))  # the worker is busy ...
            ws.send_bytes(frame_bytes(1))  # ... and this frame waits for it
            deadline = time.monotonic() + 30
            while state.worker.stream_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state.worker.stream_depth == 1

            def release_when_closed() -> None:  # the close waits for a frame on the device: release after it
                while session_id in state.stream_connections and time.monotonic() < deadline:
                    time.sleep(0.01)
                gate.set()

            releaser = threading.Thread(target=release_when_closed)
            releaser.start()
        releaser.join()
        held.result(30)
        state.worker.run_soon(lambda: None).result(60)  # the stream lane is FIFO: the frame's turn has passed
        deadline = time.monotonic() + 30
        while state.stream_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.stream_sessions == 0
        assert session.stats()["frames"] == 1  # the frame sent before the close never ran
        assert state.worker.stream_tasks_dropped == 1
        assert state.worker.stream_depth == 0
