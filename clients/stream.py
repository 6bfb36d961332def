"""Async client of the server's real-time stream (``WS /v1/stream``), over the ``websockets`` package.

    async with StreamClient("http://127.0.0.1:8000", "a red circle", t_index_list=[32, 45]) as stream:
        await stream.send(frame)              # PIL image, uint8 HxWx3 array, or encoded bytes
        out = await stream.receive()          # StreamFrame: seq, latency_ms, skipped, image (None while warming up)
        await stream.update(prompt="a white cross")
        print(await stream.stats())

A txt2img session (``mode="txt2img"``) takes no input: ``await stream.request()`` asks for the next
output frame instead of ``send``.

The server keeps only the latest waiting frame, so ``send`` never blocks on the model: frames sent
faster than the model runs are dropped (``stats()["dropped"]``), and ``receive`` returns the
results of the frames that ran, in order.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
from accel_diffusion.clients.sdk import (
    API_KEY_ENV,
    AccelError,
    AuthenticationError,
    InvalidRequest,
    ServerError,
    ServiceUnavailable,
)
from PIL import Image


@dataclass
class StreamFrame:
    seq: int
    latency_ms: float
    skipped: bool
    warming_up: bool
    image: Image.Image | None  # None while the session warms up


class StreamError(AccelError):
    """A frame failed (a bad input frame, or a fault while it ran); ``receive`` raises it in the frame's
    place and the session goes on."""


class StreamClient:
    def __init__(self, base_url: str, prompt: str, *, api_key: str | None = None, **options: Any) -> None:
        scheme, _, rest = base_url.rstrip("/").partition("://")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.url = f"{'wss' if scheme in ('https', 'wss') else 'ws'}://{rest}/v1/stream"
        if key:
            self.url += f"?api_key={quote(key)}"
        self.start = {"type": "session.start", "prompt": prompt, **options}
        self.session: dict[str, Any] = {}
        self._socket: Any = None
        # frames (or a frame's error) that arrived while awaiting a control reply, in order
        self._frames: deque[StreamFrame | StreamError] = deque()

    async def __aenter__(self) -> StreamClient:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        try:
            self._socket = await connect(self.url, max_size=None)
            await self._socket.send(json.dumps(self.start))
            reply = await self._control("session.started")
        except InvalidStatus as exc:  # the server refused the upgrade
            status = exc.response.status_code
            if status in (401, 403):  # the server closes before accepting when the API key is refused
                raise AuthenticationError(f"stream refused (HTTP {status}): missing or invalid API key", status,
                                          "authentication_error") from None
            kind = ServerError if status >= 500 else AccelError
            raise kind(f"stream refused (HTTP {status})", status, "http_error") from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code == 1013:
                raise ServiceUnavailable(f"the server is at its stream session cap: {exc.rcvd.reason}", 503,
                                         "stream_sessions_full") from None
            raise
        except BaseException:
            await self.close()
            raise
        self.session = reply["session"]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

    async def send(self, frame: Image.Image | np.ndarray | bytes) -> None:
        """Send one input frame. An image or array is resized to the session's size (the server takes
        frames of exactly that size) and encoded as PNG, off the event loop; bytes are sent as they are."""
        if not isinstance(frame, bytes | bytearray):
            frame = await asyncio.to_thread(_encode_frame, frame, (self.session["width"], self.session["height"]))
        await self._socket.send(bytes(frame))

    async def request(self) -> None:
        """Ask a txt2img session for its next output frame (``receive`` returns it)."""
        await self._socket.send(json.dumps({"type": "frame.request"}))

    async def receive(self) -> StreamFrame:
        """The next processed frame; raises StreamError in place of a frame that failed (the stream goes on)."""
        if not self._frames:
            await self._control("frame")
        item = self._frames.popleft()
        if isinstance(item, StreamError):
            raise item
        return item

    async def update(self, **params: Any) -> list[int]:
        """Change parameters mid-stream; returns the session's ``t_index_list`` now in use. A refused
        value raises InvalidRequest and leaves the session as it was."""
        await self._socket.send(json.dumps({"type": "params.update", **params}))
        return (await self._control("params.updated"))["t_index_list"]

    async def stats(self) -> dict[str, Any]:
        await self._socket.send(json.dumps({"type": "stats"}))
        return await self._control("stats")

    async def _control(self, expected: str) -> dict[str, Any]:
        """Read until a message of type ``expected``; frames (and frames' errors) met on the way are kept
        for ``receive``. A control error answers the control message awaited now (the server answers
        control messages in order, and this client awaits each reply before sending the next)."""
        while True:
            message = await self._socket.recv()
            if isinstance(message, bytes):
                raise AccelError("expected a control message, got a binary frame")
            data = json.loads(message)
            if data.get("type") == "error":
                args = (data.get("message", "stream error"), None, data.get("code"), data.get("param"))
                if data.get("param") == "frame":  # a frame failed: its error takes the frame's place
                    self._frames.append(StreamError(*args))
                    if expected == "frame":
                        return data
                    continue
                raise (ServerError if data.get("code") == "internal_error" else InvalidRequest)(*args)
            if data.get("type") == "frame":
                image = None
                if not data["warming_up"]:
                    image = Image.open(io.BytesIO(await self._socket.recv()))
                    image.load()
                self._frames.append(StreamFrame(data["seq"], data["latency_ms"], data["skipped"],
                                                data["warming_up"], image))
            if data.get("type") == expected:
                return data


def _encode_frame(frame: Image.Image | np.ndarray, size: tuple[int, int]) -> bytes:
    image = (Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame).convert("RGB")
    if image.size != size:
        image = image.resize(size, resample=Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
