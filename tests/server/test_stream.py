"""WS /v1/stream: a session per connection on the worker thread, latest-frame-wins input, errors, caps."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.server import create_app
from accel_diffusion.server import stream as stream_module
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from server_clients import make_settings
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.stream import StreamSession

PROMPT = "a red circle on a blue background"


def frame_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_a_session_streams_frames_equal_to_the_library_session(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file)
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [32, 45], "guidance": "rcfg_self",
             "seed": 5, "output_format": "png"}
    with TestClient(create_app(settings)) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_json(start)
        started = ws.receive_json()
        assert started["type"] == "session.started" and started["session"]["warmup_frames"] == 1
        outputs = []
        for k in range(3):
            ws.send_bytes(frame_bytes(k))
            info = ws.receive_json()
            assert info["type"] == "frame" and info["seq"] == k + 1 and info["latency_ms"] > 0
            assert info["warming_up"] == (k == 0)
            if not info["warming_up"]:
                outputs.append(np.asarray(Image.open(io.BytesIO(ws.receive_bytes()))))
        ws.send_json({"type": "stats"})
        stats = ws.receive_json()
        assert stats["received"] == 3 and stats["processed"] == 3 and stats["nfe"] == 3 * 2
        assert stats["fps_recent"] > 0 and stats["latency_ms"] > 0  # now, not only over the session's life
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, t_index_list=[32, 45], guidance="rcfg_self", seed=5)
    expected = [library(np.asarray(Image.open(io.BytesIO(frame_bytes(k))))) for k in range(3)][1:]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))


def test_compiled_stream_sessions_build_the_default_graph_at_startup(tiny_models_file: Path) -> None:
    """stream_acceleration = "compile": the default session's UNet graph is compiled while the server
    starts; a session of that shape then compiles nothing and streams the eager session's frames."""
    from torch._dynamo.utils import counters

    start = {"type": "session.start", "prompt": PROMPT, "seed": 5, "output_format": "png"}
    with TestClient(create_app(make_settings(tiny_models_file, stream_acceleration="compile"))) as client:
        # graphs the server's model holds (dynamo's own counter may not move: an earlier test of the process
        # can have compiled the same code and shapes, and dynamo reuses that graph for this model's instance)
        unet = client.app.state.server.registry.get("tiny").compiled_model().unet
        ready, eager_calls = set(unet.ready), unet.stats.eager_calls
        assert ready  # built while the server started
        built = counters["stats"]["unique_graphs"]
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json(start)
            session = ws.receive_json()["session"]
            assert session["acceleration"] == "compile" and session["t_index_list"] == [32, 45]
            outputs = []
            for k in range(3):
                ws.send_bytes(frame_bytes(k))
                if not ws.receive_json()["warming_up"]:
                    outputs.append(np.asarray(Image.open(io.BytesIO(ws.receive_bytes()))).astype(int))
        assert counters["stats"]["unique_graphs"] == built
        assert set(unet.ready) == ready and unet.stats.eager_calls == eager_calls  # the session compiled nothing
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, seed=5)  # eager
    expected = [library(np.asarray(Image.open(io.BytesIO(frame_bytes(k))))) for k in range(3)][1:]
    assert len(outputs) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(outputs, expected, strict=True))


def test_strength_autoencoder_and_a_missing_tiny_one(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file))) as client:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "strength": 0.3})
            session = ws.receive_json()["session"]
            assert session["vae"] == "full"  # the tiny test model has no tiny_vae
            assert session["t_index_list"] == [35]
            ws.send_json({"type": "params.update", "strength": 0.6})
            assert ws.receive_json() == {"type": "params.updated", "t_index_list": [20]}
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_json({"type": "session.start", "prompt": PROMPT, "vae": "tiny"})
            error = ws.receive_json()
            assert error["type"] == "error" and error["param"] == "vae"


def test_bad_messages_and_frames_get_errors_and_the_session_goes_on(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(frame_bytes(0))
        assert ws.receive_json()["param"] == "type"  # no session yet
        ws.send_json({"type": "session.start", "prompt": PROMPT, "guidance": "magic"})
        assert ws.receive_json()["param"] == "guidance"
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "colour": 1})
        assert ws.receive_json()["param"] == "colour"
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["type"] == "session.started"
        ws.send_bytes(b"not an image")
        assert ws.receive_json()["code"] == "invalid_frame"
        big = io.BytesIO()
        Image.new("RGB", (256, 256)).save(big, format="PNG")
        ws.send_bytes(big.getvalue())
        assert ws.receive_json()["code"] == "invalid_frame"
        ws.send_text("{not json")
        assert ws.receive_json()["param"] == "message"
        ws.send_json({"type": "params.update", "t_index_list": [50]})
        assert ws.receive_json()["param"] == "t_index_list"
        ws.send_json({"type": "params.update", "prompt": "a white cross on a green background"})
        assert ws.receive_json()["type"] == "params.updated"
        ws.send_bytes(frame_bytes(1, "JPEG"))
        assert ws.receive_json()["type"] == "frame"
        assert Image.open(io.BytesIO(ws.receive_bytes())).format == "JPEG"


def test_deep_large_and_non_object_messages_get_errors_and_the_session_goes_on(tiny_models_file: Path) -> None:
    """Text messages go through the server's one bounded JSON parser: nesting past 32 levels (30 000 levels
    made json.loads raise RecursionError, which dropped the socket), a message over max_body_bytes, a number
    json.loads refuses, each an error message naming ``message``; the session then streams on."""
    deep = '{"type": "stats", "x": ' + "[" * 30_000 + "]" * 30_000 + "}"
    large = json.dumps({"type": "params.update", "prompt": "x" * 70_000})
    with TestClient(create_app(make_settings(tiny_models_file, max_body_bytes=64 * 1024))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["type"] == "session.started"
        for text, message in [
            (deep, "this one nests arrays and objects 30001 levels deep; at most 32 allowed (send a flatter value)"),
            (large, f"this one is {len(large)} bytes of JSON; at most 65536 allowed"),
            ("1" * 5000, "this one is not valid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
            ("[1, 2]", ""),
        ]:
            ws.send_text(text)
            error = ws.receive_json()
            assert error["type"] == "error" and error["code"] == "invalid_request_error", error
            assert error["param"] == "message", error
            assert error["message"].startswith(f"control messages are JSON objects{'; ' if message else ''}{message}")
        ws.send_bytes(frame_bytes(1))
        assert ws.receive_json()["type"] == "frame"
        assert Image.open(io.BytesIO(ws.receive_bytes())).size == (32, 32)


def test_bad_values_get_errors_on_a_connection_that_stays_open(tiny_models_file: Path) -> None:
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [32, 45], "guidance": "none",
             "output_format": "png"}
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        for field, value in [("guidance_scale", "abc"), ("quality", "abc"), ("quality", 150), ("seed", 1.5),
                             ("similarity_threshold", -0.1), ("width", -64), ("width", 16384), ("mode", "foo"),
                             ("prompt", "")]:
            ws.send_json({**start, field: value})
            error = ws.receive_json()
            assert error["type"] == "error" and error["param"] == field, (field, error)
        ws.send_json(start)
        assert ws.receive_json()["type"] == "session.started"
        outputs = []
        for k in range(3):
            if k == 1:
                for update in ({"t_index_list": [10.0, 20.0, 40.0]}, {"seed": "3"}, {"guidance_scale": [1]},
                               {"prompt": "a white cross", "delta": "x"}):
                    ws.send_json({"type": "params.update", **update})
                    assert ws.receive_json()["type"] == "error"
            ws.send_bytes(frame_bytes(k))
            if not ws.receive_json()["warming_up"]:
                outputs.append(np.asarray(Image.open(io.BytesIO(ws.receive_bytes()))))
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, t_index_list=[32, 45], guidance="none")
    expected = [library(np.asarray(Image.open(io.BytesIO(frame_bytes(k))))) for k in range(3)][1:]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected, strict=True))  # updates changed nothing


def test_session_start_takes_size_and_answers_unknown_fields_with_the_meant_one(tiny_models_file: Path) -> None:
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        for extra, param, fragment in (({"widht": 32}, "widht", "unknown field; did you mean `width`?"),
                                       ({"size": "33x32"}, "size", "size: width and height must be multiples of"),
                                       ({"size": "2048x32"}, "size", "size: width 2048 is more than stream sessions "
                                        "take here: at most 512 (stream_max_width)"),
                                       ({"size": "big"}, "size", "must look like '512x512'"),
                                       ({"size": "32x32", "height": 32}, "size", "not both")):
            ws.send_json({**start, **extra})
            error = ws.receive_json()
            assert error["type"] == "error" and error["param"] == param and fragment in error["message"], error
        ws.send_json({**start, "size": "24x16"})
        session = ws.receive_json()["session"]
        assert (session["width"], session["height"]) == (24, 16)
        ws.send_json({"type": "params.update", "promt": "a cross"})
        error = ws.receive_json()
        assert error["param"] == "promt" and "did you mean `prompt`?" in error["message"]


def test_large_frames_decode_off_the_event_loop_with_the_same_checks(tiny_models_file: Path) -> None:
    padded = io.BytesIO()  # a valid 32x32 frame made larger than the inline-decode size by a text chunk
    metadata = PngInfo()
    metadata.add_text("padding", "x" * (2 * stream_module.INLINE_DECODE_BYTES))
    Image.open(io.BytesIO(frame_bytes(7))).save(padded, format="PNG", pnginfo=metadata)
    assert len(padded.getvalue()) > stream_module.INLINE_DECODE_BYTES
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none",
                      "output_format": "png"})
        assert ws.receive_json()["type"] == "session.started"
        ws.send_bytes(bytes(2 * stream_module.INLINE_DECODE_BYTES))  # large and not an image
        assert ws.receive_json()["code"] == "invalid_frame"
        ws.send_bytes(padded.getvalue())
        assert ws.receive_json()["type"] == "frame"
        from_padded = np.asarray(Image.open(io.BytesIO(ws.receive_bytes())))
    model = ModelRegistry.from_file(tiny_models_file).get("tiny")
    library = StreamSession(model, PROMPT, t_index_list=[45], guidance="none")
    assert np.array_equal(from_padded, library(np.asarray(Image.open(io.BytesIO(frame_bytes(7))))))


def test_api_key_and_idle_timeout(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, api_keys=["secret"], stream_idle_timeout_s=0.3)
    with TestClient(create_app(settings)) as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
        assert refused.value.code == 1008
        with client.websocket_connect("/v1/stream?api_key=secret") as ws, \
                pytest.raises(WebSocketDisconnect) as idle:
            ws.receive_json()
        assert idle.value.code == 1000


def test_a_frame_slower_than_the_idle_timeout_is_answered_not_closed_as_idle(tiny_models_file: Path) -> None:
    """The client waiting for its frame is not idle: the timer stops while the frame is on the device and
    restarts from the answer."""
    with TestClient(create_app(make_settings(tiny_models_file, stream_idle_timeout_s=0.4))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["type"] == "session.started"
        client.app.state.server.worker.run_soon(lambda: time.sleep(1.5))  # the device: busy for 3.75 idle timeouts
        ws.send_bytes(frame_bytes(1))
        info = ws.receive_json()
        assert info["type"] == "frame" and info["seq"] == 1 and info["latency_ms"] >= 1000
        assert ws.receive_bytes()
        with pytest.raises(WebSocketDisconnect) as idle:  # and idle again after the answer
            ws.receive_json()
        assert idle.value.code == 1000


def test_latest_frame_wins_while_the_device_is_busy(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [20, 32, 45], "guidance": "cfg"})
        assert ws.receive_json()["type"] == "session.started"
        for k in range(12):  # faster than the model: waiting frames are replaced, not queued
            ws.send_bytes(frame_bytes(k))
        seen = []
        while not seen or seen[-1] != 12:
            message = ws.receive()
            if message.get("text"):
                seen.append(json.loads(message["text"])["seq"])
        ws.send_json({"type": "stats"})
        stats = ws.receive_json()
    assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == 12
    assert stats["processed"] == len(seen) and stats["processed"] + stats["dropped"] == 12
    assert stats["dropped"] > 0


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb for Pillow past ~179 MP)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_wrong_sized_crafted_and_truncated_frames_get_errors_and_the_session_goes_on(tiny_models_file: Path) -> None:
    small, wide = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, format="PNG")
    Image.new("RGB", (64, 32)).save(wide, format="PNG")
    with TestClient(create_app(make_settings(tiny_models_file))) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["session"]["width"] == 32
        messages = []
        for bad in (small.getvalue(), wide.getvalue(), _png_header_only(20000, 20000), frame_bytes(3)[:200]):
            ws.send_bytes(bad)
            error = ws.receive_json()
            assert error["type"] == "error" and error["code"] == "invalid_frame" and error["param"] == "frame", error
            messages.append(error["message"])
        assert messages[2] == ("unreadable image (truncated, corrupt, or declaring too many pixels); send a complete "
                               "JPEG, PNG or WebP of the session's size")  # not Pillow's exception text
        ws.send_bytes(frame_bytes(3))
        assert ws.receive_json()["type"] == "frame" and ws.receive_bytes()


def test_stats_polls_do_not_keep_an_idle_session_open(tiny_models_file: Path) -> None:
    import time

    with TestClient(create_app(make_settings(tiny_models_file, stream_idle_timeout_s=0.5))) as client, \
            client.websocket_connect("/v1/stream") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.send_json({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"})
        assert ws.receive_json()["type"] == "session.started"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a page that only polls stats, as an abandoned tab does
            ws.send_json({"type": "stats"})
            assert ws.receive_json()["type"] == "stats"
            time.sleep(0.1)
    assert closed.value.code == 1000


def test_a_disconnect_drops_the_waiting_frame_and_frees_the_slot_after_the_one_on_the_device(
        tiny_models_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real server (uvicorn), as a browser tab that closes mid-stream."""
    import threading
    import time

    from server_clients import running_server
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    original, calls, started = StreamSession.__call__, [], threading.Event()

    def slow(self: StreamSession, frame: object = None) -> object:
        calls.append(time.monotonic())
        started.set()
        time.sleep(0.5)
        return original(self, frame)

    monkeypatch.setattr(StreamSession, "__call__", slow)
    with running_server(create_app(make_settings(tiny_models_file, max_stream_sessions=1))) as (_, _, url):
        ws_url = url.replace("http", "ws") + "/v1/stream"
        with connect(ws_url) as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}))
            assert json.loads(ws.recv())["type"] == "session.started"
            ws.send(frame_bytes(0))
            assert started.wait(10)
            ws.send(frame_bytes(1))  # waits behind the one on the device
        closed_at, codes = time.monotonic(), []
        while True:  # the slot frees once the frame on the device is done (1013 until then)
            try:
                with connect(ws_url) as again:
                    again.send(json.dumps({"type": "session.start", "prompt": PROMPT, "t_index_list": [45]}))
                    assert json.loads(again.recv())["type"] == "session.started"
                break
            except ConnectionClosed as exc:
                codes.append(exc.rcvd.code if exc.rcvd else None)
                time.sleep(0.05)
        freed_after = time.monotonic() - closed_at
        time.sleep(1.0)
    assert len(calls) == 1  # the gone client's waiting frame never ran
    assert codes and set(codes) == {1013} and freed_after < 5  # refused while the frame ran, then free


def test_frames_past_uvicorns_default_message_cap_get_an_error_and_the_session_goes_on(
        tiny_models_file: Path) -> None:
    """Over a real uvicorn: its WebSocket message cap follows ``max_frame_bytes`` (twice it, at least 16 MiB),
    so a frame over the frame limit is answered with an error rather than a closed socket (1009)."""
    from accel_diffusion.server.process import UVICORN_WS_MAX_SIZE, websocket_message_limit
    from server_clients import running_server
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    settings = make_settings(tiny_models_file, max_frame_bytes=12 * 1024 * 1024)
    assert websocket_message_limit(settings) == 24 * 1024 * 1024
    assert websocket_message_limit(make_settings(tiny_models_file)) == UVICORN_WS_MAX_SIZE
    with running_server(create_app(settings)) as (_, _, url):
        with connect(url.replace("http", "ws") + "/v1/stream", max_size=None) as ws:
            ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}))
            assert json.loads(ws.recv())["type"] == "session.started"
            ws.send(b"\xff" * (UVICORN_WS_MAX_SIZE + 1))  # over the frame limit, under the message cap
            error = json.loads(ws.recv())
            assert error["code"] == "invalid_frame" and error["param"] == "frame" and "at most" in error["message"]
            ws.send(b"\x00" * (10 * 1024 * 1024))  # under the frame limit: decoded (and refused as no image)
            assert json.loads(ws.recv())["message"] == "not a JPEG, PNG or WebP image"
            ws.send(frame_bytes(0))  # the session goes on
            assert json.loads(ws.recv())["type"] == "frame" and ws.recv()
            ws.send(b"\x00" * (24 * 1024 * 1024 + 1))  # past the message cap: the protocol closes the socket
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_text_that_cannot_be_encoded_gets_an_error_naming_the_field_and_the_connection_goes_on(
        tiny_models_file: Path) -> None:
    """Over a real uvicorn (whose WebSocket layer encodes every text message as UTF-8): lone surrogates in a
    prompt are refused naming it, and an error quoting such text is still sent."""
    from server_clients import running_server
    from websockets.sync.client import connect

    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    with running_server(create_app(make_settings(tiny_models_file))) as (_, _, url), \
            connect(url.replace("http", "ws") + "/v1/stream") as ws:
        for message, param in (({**start, "prompt": "a red \ud800 circle"}, "prompt"),
                               ({**start, "negative_prompt": "\udcff"}, "negative_prompt"),
                               ({**start, "colour\ud800": 1}, "colour\ufffd")):  # an unknown field, quoted back
            ws.send(json.dumps(message))  # ASCII JSON: the surrogates travel as \ud800 escapes
            error = json.loads(ws.recv())
            assert (error["type"], error["param"]) == ("error", param), error
        ws.send(json.dumps(start))
        assert json.loads(ws.recv())["type"] == "session.started"
        ws.send(json.dumps({"type": "params.update", "prompt": "a white \udc80 cross"}))
        assert json.loads(ws.recv())["param"] == "prompt"
        ws.send(frame_bytes(0))
        assert json.loads(ws.recv())["type"] == "frame" and ws.recv()


def test_a_sessions_mjpeg_view_answers_only_the_key_that_started_it(tiny_models_file: Path) -> None:
    """With API keys, stream sessions belong to the key that started them, like jobs: another key's
    MJPEG request is answered as if the session did not exist (404); no key is a 401."""
    import httpx
    from server_clients import running_server
    from websockets.sync.client import connect

    settings = make_settings(tiny_models_file, api_keys=["alice-key", "bob-key"])
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice-key", "bob-key"))
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    with running_server(create_app(settings)) as (_, _, url), httpx.Client(base_url=url, timeout=60) as http, \
            connect(url.replace("http", "ws") + "/v1/stream", additional_headers=alice) as ws:
        ws.send(json.dumps(start))
        session = json.loads(ws.recv())["session"]
        view = session["mjpeg_url"]
        for refused in (http.get(view, headers=bob), http.get(view, params={"api_key": "bob-key"})):
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["message"] == f"no stream session {session['id']!r}"
        assert http.get(view).status_code == 401
        with http.stream("GET", view, headers=alice) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
            for k in range(2):  # the second frame surely finds the viewer registered
                ws.send(frame_bytes(k))
                assert json.loads(ws.recv())["type"] == "frame" and ws.recv()
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if b"\xff\xd9" in body:  # the end of the first JPEG
                    break
    assert body.startswith(b"--frame\r\nContent-Type: image/jpeg\r\n")
    assert Image.open(io.BytesIO(body[body.index(b"\r\n\r\n") + 4:])).size == (32, 32)


def test_the_api_key_in_a_websocket_subprotocol_header_or_query(tiny_models_file: Path) -> None:
    """Browsers cannot set headers on a WebSocket: the key may come as the subprotocol
    ``base64url.bearer.<key>`` next to ``accel-diffusion``, the only one echoed back. A key with characters a
    subprotocol token cannot hold travels base64url-encoded; Authorization and ?api_key= keep working."""
    import base64

    key = "k/+=? 1;x"
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    settings = make_settings(tiny_models_file, api_keys=[key])
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect("/v1/stream", subprotocols=["accel-diffusion", f"base64url.bearer.{encoded}"]
                                      ) as ws:
            assert ws.accepted_subprotocol == "accel-diffusion"
            ws.send_json({"type": "stats"})
            assert ws.receive_json()["type"] == "stats"
        for connect_kwargs in ({"headers": {"Authorization": f"Bearer {key}"}},
                               {"subprotocols": [f"base64url.bearer.{encoded}"]}):  # none to echo: none echoed
            with client.websocket_connect("/v1/stream", **connect_kwargs) as ws:
                assert ws.accepted_subprotocol is None
                ws.send_json({"type": "stats"})
                assert ws.receive_json()["type"] == "stats"
        wrong = base64.urlsafe_b64encode(b"wrong").decode().rstrip("=")
        for protocols in (["accel-diffusion", f"base64url.bearer.{wrong}"], ["accel-diffusion", "base64url.bearer.%%"],
                          ["accel-diffusion"]):
            with pytest.raises(WebSocketDisconnect) as refused, \
                    client.websocket_connect("/v1/stream", subprotocols=protocols) as ws:
                ws.receive_json()
            assert refused.value.code == 1008


def test_a_slot_is_taken_at_a_successful_session_start_and_freed_when_the_connection_ends(
        tiny_models_file: Path) -> None:
    """Over a real uvicorn: open connections hold no slot of ``max_stream_sessions`` until a ``session.start``
    succeeds (a refused one holds none); a start past the cap is closed with 1013; the end frees the slot."""
    from server_clients import running_server

    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    app = create_app(make_settings(tiny_models_file, max_stream_sessions=1))
    with running_server(app) as (_, _, url):
        ws_url = url.replace("http", "ws") + "/v1/stream"
        with connect(ws_url) as first, connect(ws_url) as second, connect(ws_url) as third:
            for ws in (first, second, third):  # three connections open under a cap of 1
                ws.send(json.dumps({"type": "stats"}))
                assert json.loads(ws.recv())["type"] == "stats"
            assert app.state.server.stream_sessions == 0
            first.send(json.dumps({**start, "guidance": "magic"}))
            assert json.loads(first.recv())["param"] == "guidance"
            assert app.state.server.stream_sessions == 0  # a refused start holds no slot
            second.send(json.dumps(start))
            assert json.loads(second.recv())["type"] == "session.started"
            assert app.state.server.stream_sessions == 1
            first.send(json.dumps(start))
            with pytest.raises(ConnectionClosed) as closed:
                first.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert closed.value.rcvd.reason == "at most 1 stream sessions; try again later"
            second.close()
            deadline = time.monotonic() + 10
            while app.state.server.stream_sessions and time.monotonic() < deadline:
                time.sleep(0.01)
            third.send(json.dumps(start))  # the ended session's slot is free again
            assert json.loads(third.recv())["type"] == "session.started"
            assert app.state.server.stream_sessions == 1
        deadline = time.monotonic() + 10
        while app.state.server.stream_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.server.stream_sessions == 0


def test_only_input_the_server_takes_keeps_a_stream_open(tiny_models_file: Path) -> None:
    """Over a real uvicorn: taken frames keep a session open past ``stream_idle_timeout_s``; refused messages
    (invalid JSON, an unknown type, a refused update, a frame that is no image) do not, however often sent."""
    from server_clients import running_server

    settings = make_settings(tiny_models_file, stream_idle_timeout_s=1.0)
    with running_server(create_app(settings)) as (_, _, url), connect(url.replace("http", "ws") + "/v1/stream") as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}))
        assert json.loads(ws.recv())["type"] == "session.started"
        opened = time.monotonic()
        for k in range(6):  # ~1.2 s of frames: past the timeout, and still open
            ws.send(frame_bytes(k))
            last_input = time.monotonic()
            assert json.loads(ws.recv())["type"] == "frame" and ws.recv()
            time.sleep(0.2)
        assert time.monotonic() - opened > 1.0
        refused = ["{nope", json.dumps({"type": "dance"}), json.dumps({"type": "params.update", "seed": -1}),
                   b"not an image"]
        errors = []
        with pytest.raises(ConnectionClosed) as closed:
            for k in range(50):  # 5 s of refused messages, ten a second
                ws.send(refused[k % len(refused)])
                errors.append(json.loads(ws.recv()))
                time.sleep(0.1)
        idle_for = time.monotonic() - last_input
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert closed.value.rcvd.reason == "idle for 1 s"
    assert 1.0 <= idle_for < 2.5, idle_for
    assert errors and {e["type"] for e in errors} == {"error"}
    assert {e["code"] for e in errors} == {"invalid_request_error", "invalid_frame"}


def test_control_messages_past_the_rate_are_dropped_and_a_flood_closes_the_connection(
        tiny_models_file: Path) -> None:
    """Over a real uvicorn, at ``stream_control_rate`` 2 a second in bursts of 3: the fourth message at once is
    dropped with a ``rate_limited`` error; a token comes back in 0.5 s; ``stream_control_burst`` messages
    dropped in a row close the connection with 1008. Frames are not control messages."""
    from server_clients import running_server

    settings = make_settings(tiny_models_file, stream_control_rate=2.0, stream_control_burst=3)
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    with running_server(create_app(settings)) as (_, _, url), connect(url.replace("http", "ws") + "/v1/stream") as ws:
        for _ in range(3):  # the burst
            ws.send(json.dumps({"type": "stats"}))
            assert json.loads(ws.recv())["type"] == "stats"
        ws.send(json.dumps(start))
        error = json.loads(ws.recv())
        assert (error["type"], error["code"], error["param"]) == ("error", "rate_limited", "message"), error
        assert error["message"].startswith("over 2 control messages a second (bursts of 3); this message was "
                                           "dropped: send the next in 0.")
        ws.send(frame_bytes(0))  # frames are not rate-limited, and the dropped session.start never ran
        assert json.loads(ws.recv())["message"] == "start a session first (session.start)"
        time.sleep(0.6)  # one token back
        ws.send(json.dumps(start))
        assert json.loads(ws.recv())["type"] == "session.started"
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                ws.send(json.dumps({"type": "stats"}))
                codes.append(json.loads(ws.recv())["code"])
    assert codes == ["rate_limited", "rate_limited"]  # the third dropped in a row closes
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "over 2 control messages a second, 3 dropped in a row"


def test_internal_errors_send_a_code_and_the_request_id_and_only_the_log_has_the_exception(
        tiny_models_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real uvicorn: a frame or a control message that fails inside the model answers with a code, a
    message for the user and the connection's request id (the upgrade's X-Request-Id, else a new one); the
    exception's text is only in the server log, under that id. Users' mistakes keep their messages; the
    frame after a failed one is served."""
    from server_clients import running_server

    original, calls = StreamSession.__call__, []

    def fails_once(self: StreamSession, frame: object = None) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered at /opt/torch/secret_kernel.cu:42")
        return original(self, frame)

    def update_fails(self: StreamSession, **fields: object) -> None:
        raise KeyError("internal table unet.up_blocks.3")

    monkeypatch.setattr(StreamSession, "__call__", fails_once)
    monkeypatch.setattr(StreamSession, "update", update_fails)
    start = {"type": "session.start", "prompt": PROMPT, "t_index_list": [45], "guidance": "none"}
    logged: list[logging.LogRecord] = []
    capture = logging.Handler(logging.ERROR)
    capture.emit = logged.append  # type: ignore[method-assign]  # (the server's logger does not propagate)
    with running_server(create_app(make_settings(tiny_models_file))) as (_, _, url):
        # (after the server's start: its logging configuration clears its loggers' handlers)
        monkeypatch.setattr(stream_module.LOG, "handlers", [capture])
        ws_url = url.replace("http", "ws") + "/v1/stream"
        with connect(ws_url, additional_headers={"X-Request-Id": "trace-42"}) as ws:
            ws.send(json.dumps(start))
            assert json.loads(ws.recv())["type"] == "session.started"
            ws.send(frame_bytes(0))
            assert json.loads(ws.recv())["type"] == "frame" and ws.recv()
            ws.send(frame_bytes(1))
            frame_error = json.loads(ws.recv())
            ws.send(json.dumps({"type": "params.update", "prompt": "a white cross"}))
            update_error = json.loads(ws.recv())
            ws.send(json.dumps({"type": "params.update", "promt": "a white cross"}))
            user_error = json.loads(ws.recv())
            ws.send(frame_bytes(2))
            assert json.loads(ws.recv())["type"] == "frame" and ws.recv()
        with connect(ws_url, additional_headers={"X-Request-Id": "not a usable id"}) as ws:
            ws.send("{nope")
            made_id = json.loads(ws.recv())["request_id"]
    assert frame_error == {
        "type": "error", "code": "internal_error", "param": "frame", "request_id": "trace-42",
        "message": "internal error on this frame (seq 2) (not a fault of your input; the stream goes on); the "
                   "server log has the details under request_id trace-42"}
    assert update_error == {
        "type": "error", "code": "internal_error", "param": None, "request_id": "trace-42",
        "message": "internal error on this params.update message (not a fault of your input; the stream goes "
                   "on); the server log has the details under request_id trace-42"}
    assert user_error["code"] == "invalid_request_error" and user_error["param"] == "promt"
    assert user_error["request_id"] == "trace-42"
    assert user_error["message"].startswith("promt: unknown field; did you mean `prompt`?")
    assert [r.getMessage() for r in logged] == ["stream request trace-42: frame (seq 2) failed",
                                                "stream request trace-42: params.update message failed"]
    text = "\n".join(logging.Formatter().format(r) for r in logged)
    assert "secret_kernel.cu" in text and "unet.up_blocks.3" in text  # the log has the rest
    assert len(made_id) == 32 and int(made_id, 16) >= 0
