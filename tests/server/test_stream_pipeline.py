"""WS /v1/stream with two frames in flight: the device runs the waiting frame while the previous answer is
encoded and sent; answers leave in order, a newer frame still replaces a waiting one, and the bytes sent are
the library session's frames encoded as ``encode_image`` encodes them."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server import stream as stream_module
from accel_diffusion.server.jobs import OutputOptions
from fastapi.testclient import TestClient
from PIL import Image
from server_clients import make_settings

from accel_diffusion.imageio import encode_image
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.stream import StreamSession

PROMPT = "a red circle on a blue background"


def frame_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_device_runs_the_next_frame_while_an_answer_is_sent_in_order_and_latest_wins(
        tiny_models_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original_send = stream_module._Connection.send

    async def held_send(self: Any, message: dict[str, Any], image: bytes | None = None) -> None:
        if message.get("type") == "frame" and message["seq"] == 1:  # frame 1's answer waits on the wire
            while not release.is_set():
                await asyncio.sleep(0.005)
        await original_send(self, message, image)

    monkeypatch.setattr(stream_module._Connection, "send", held_send)
    gate = threading.Event()
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none",
                      "seed": 3, "output_format": "png"})
        assert ws.receive_json()["type"] == "session.started"
        state = client.app.state.server
        connection = next(iter(state.stream_connections.values()))
        session = connection.session
        occupied = state.worker.run_soon(lambda: gate.wait(60))  # the device is busy: frame 1 queues behind it
        ws.send_bytes(frame_bytes(0))
        ws.send_bytes(frame_bytes(1))
        wait_until(lambda: connection.seq == 2)
        gate.set()
        occupied.result(60)
        # frame 1 ran with frame 2 waiting: frame 2 runs while frame 1's answer is held, nothing sent yet
        wait_until(lambda: session.state.frames == 2)
        assert connection.waiting is None and connection.busy
        ws.send_bytes(frame_bytes(2))  # waits (two frames in flight), then is replaced: latest frame wins
        ws.send_bytes(frame_bytes(3))
        wait_until(lambda: connection.seq == 4)
        assert connection.dropped == 1 and session.state.frames == 2
        release.set()
        answers = []
        for _ in range(3):
            header = ws.receive_json()
            assert header["type"] == "frame" and not header["warming_up"]
            answers.append((header["seq"], ws.receive_bytes()))
        ws.send_json({"type": "stats"})
        stats = ws.receive_json()
    assert [seq for seq, _ in answers] == [1, 2, 4]
    assert stats["received"] == 4 and stats["processed"] == 3 and stats["dropped"] == 1
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, t_index_list=[45], guidance="none", seed=3)
    for (_, sent), k in zip(answers, (0, 1, 3), strict=True):
        expected = library(np.asarray(Image.open(io.BytesIO(frame_bytes(k)))))
        assert sent == encode_image(expected, "png", 85)  # the very bytes of the library's frame


@pytest.mark.parametrize("side", [32, 256])  # on the event loop (up to 128x128) and on a thread
@pytest.mark.parametrize("options", [OutputOptions("jpeg", 85), OutputOptions("png", 85), OutputOptions("webp", 70)])
def test_output_frames_encode_to_the_same_bytes_on_the_loop_and_on_a_thread(side: int, options: OutputOptions) -> None:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    encoded = asyncio.run(stream_module._encoded(pixels, options))
    assert encoded == encode_image(pixels, options.output_format, options.output_compression)
    assert (side * side <= stream_module.INLINE_ENCODE_PIXELS) == (side == 32)


def test_a_one_frame_client_gets_each_answer_before_sending_the_next(tiny_models_file: Path) -> None:
    """One frame in flight (the web page, the benchmark's first row): every frame runs, none is dropped."""
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["type"] == "session.started"
        for k in range(4):
            ws.send_bytes(frame_bytes(k))
            assert json.loads(ws.receive_text())["seq"] == k + 1
            ws.receive_bytes()
        ws.send_json({"type": "stats"})
        stats = ws.receive_json()
    assert stats["processed"] == 4 and stats["dropped"] == 0
