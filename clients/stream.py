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
results of the frames that ran, in order. One reader task owns the socket and routes what arrives:
frames (and frames' errors) to ``receive``, each control reply to its call, so a task may await
``receive`` while another calls ``update`` or ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

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
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}  # a header: never in a URL or a log
        self.start = {"type": "session.start", "prompt": prompt, **options}
        self.session: dict[str, Any] = {}
        self._socket: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._frames: asyncio.Queue[StreamFrame | BaseException] = asyncio.Queue()  # in arrival order
        self._replies: deque[tuple[str, asyncio.Future[dict[str, Any]]]] = deque()  # control calls, in send order
        self._send_lock = asyncio.Lock()
        self._failure: BaseException | None = None  # why the connection ended

    async def __aenter__(self) -> StreamClient:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        try:
            self._socket = await connect(self.url, max_size=None, additional_headers=self._headers)
            self._reader = asyncio.get_running_loop().create_task(self._read())
            reply = await self._call(self.start, "session.started")
        except InvalidStatus as exc:  # the server refused the upgrade
            status = exc.response.status_code
            if status in (401, 403):  # the server closes before accepting when the API key is refused
                raise AuthenticationError(f"stream refused (HTTP {status}): missing or invalid API key", status,
                                          "authentication_error") from None
            kind = ServerError if status >= 500 else AccelError
            raise kind(f"stream refused (HTTP {status})", status, "http_error") from None
        except ConnectionClosed as exc:
            await self.close()
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

    async def send(self, frame: Image.Image | np.ndarray | bytes) -> None:
        """Send one input frame. An image or array is resized to the session's size (the server takes
        frames of exactly that size) and encoded as PNG, off the event loop; bytes are sent as they are."""
        if not isinstance(frame, bytes | bytearray):
            frame = await asyncio.to_thread(_encode_frame, frame, (self.session["width"], self.session["height"]))
        async with self._send_lock:
            await self._socket.send(bytes(frame))

    async def request(self) -> None:
        """Ask a txt2img session for its next output frame (``receive`` returns it)."""
        if self.session.get("mode") != "txt2img":
            raise InvalidRequest("frame requests are for txt2img sessions; img2img sessions are sent frames",
                                 None, "invalid_request_error", "type")
        async with self._send_lock:
            await self._socket.send(json.dumps({"type": "frame.request"}))

    async def receive(self) -> StreamFrame:
        """The next processed frame; raises StreamError in place of a frame that failed (the stream goes
        on), or the connection's error once it has ended."""
        item = await self._frames.get()
        if isinstance(item, BaseException):
            if not isinstance(item, StreamError):
                self._frames.put_nowait(item)  # the connection stays ended for every later call
            raise item
        return item

    async def update(self, **params: Any) -> list[int]:
        """Change parameters mid-stream; returns the session's ``t_index_list`` now in use. A refused
        value raises InvalidRequest and leaves the session as it was."""
        return (await self._call({"type": "params.update", **params}, "params.updated"))["t_index_list"]

    async def stats(self) -> dict[str, Any]:
        return await self._call({"type": "stats"}, "stats")

    async def _call(self, message: dict[str, Any], expected: str) -> dict[str, Any]:
        """Send a control message and await its reply (the server answers control messages in order)."""
        if self._failure is not None:
            raise self._failure
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        async with self._send_lock:  # queued and sent in the same order
            self._replies.append((expected, future))
            try:
                await self._socket.send(json.dumps(message))
            except BaseException:  # not sent: no reply will come for it
                self._replies.remove((expected, future))
                raise
        return await future

    async def _read(self) -> None:
        """The socket's one reader: frames to ``receive``, replies and control errors to their calls."""
        try:
            while True:
                message = await self._socket.recv()
                if isinstance(message, bytes):  # an image without its header: not this protocol's order
                    self._frames.put_nowait(StreamError("a binary message without a frame header", None,
                                                        "protocol_error", "frame"))
                    continue
                data = json.loads(message)
                kind = data.get("type")
                if kind == "error":
                    args = (data.get("message", "stream error"), None, data.get("code"), data.get("param"))
                    if data.get("param") == "frame":  # a frame failed: its error takes the frame's place
                        self._frames.put_nowait(StreamError(*args))
                    else:
                        self._answer(None, (ServerError if data.get("code") == "internal_error"
                                            else InvalidRequest)(*args))
                elif kind == "frame":
                    image = None
                    if not data["warming_up"]:
                        payload = await self._socket.recv()
                        try:
                            image = Image.open(io.BytesIO(payload))
                            image.load()
                        except Exception as exc:  # that frame is lost, the stream goes on
                            self._frames.put_nowait(StreamError(f"an output frame could not be decoded: {exc}",
                                                                None, "invalid_frame", "frame"))
                            continue
                    self._frames.put_nowait(StreamFrame(data["seq"], data["latency_ms"], data["skipped"],
                                                        data["warming_up"], image))
                else:
                    self._answer(kind, data)
        except asyncio.CancelledError:
            self._fail(AccelError("the stream client is closed"))
            raise
        except BaseException as exc:  # the connection ended (or broke): every waiter learns why
            self._fail(exc)

    def _answer(self, kind: str | None, reply: dict[str, Any] | BaseException) -> None:
        """The oldest pending call gets this reply (an error answers whichever call it is)."""
        if not self._replies:  # no control call waits: it answers a frame or a frame request
            if isinstance(reply, BaseException):
                self._frames.put_nowait(reply if isinstance(reply, StreamError) else StreamError(
                    str(reply), None, getattr(reply, "type", None), getattr(reply, "param", None)))
            return
        expected, future = self._replies.popleft()
        if future.done():
            return
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        elif kind == expected:
            future.set_result(reply)
        else:
            future.set_exception(AccelError(f"expected a {expected!r} reply, got {kind!r}"))

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        while self._replies:
            _, future = self._replies.popleft()
            if not future.done():
                future.set_exception(exc)
        self._frames.put_nowait(exc)


def _encode_frame(frame: Image.Image | np.ndarray, size: tuple[int, int]) -> bytes:
    image = (Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame).convert("RGB")
    if image.size != size:
        image = image.resize(size, resample=Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
