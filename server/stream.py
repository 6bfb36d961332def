"""``WS /v1/stream``: real-time img2img (or txt2img) sessions over a WebSocket.

Protocol (JSON text messages, binary frames):

- client → ``{"type": "session.start", "prompt": ..., "model"?, "negative_prompt"?, "t_index_list"?,
  "guidance"?, "guidance_scale"?, "delta"?, "seed"?, "width"?, "height"? (or "size": "WxH"), "mode"?,
  "similarity_threshold"?, "max_skip"?, "strength"? (diffusers' img2img strength; t_index_list then gives only the
  number of steps), "vae"? ("auto" | "full" | "tiny"), "output_format"? ("jpeg" | "webp" | "png"),
  "quality"?}``;
  server → ``{"type": "session.started", "session": {...}}``
- client → binary: one input frame (JPEG / PNG / WebP bytes) of exactly the session's width x height
  (another size is an ``invalid_frame`` error; the SDK resizes for you). Latest frame wins: while one
  frame is on the device, a newer one replaces the waiting one (``dropped`` counts those). At most two
  frames are in flight: while a frame's answer is encoded and sent, the device already runs the waiting one
  (a client that sends its next frame before the previous answer arrives keeps the device busy).
  server → ``{"type": "frame", "seq", "latency_ms", "skipped", "warming_up"}`` then, unless the
  session is still warming up, the output frame as binary.
- txt2img sessions (``"mode": "txt2img"``) take no input: client → ``{"type": "frame.request"}`` asks
  for the next output frame, answered like an input frame (latest request wins too).
- client → ``{"type": "params.update", prompt? / t_index_list? / strength? / seed? / guidance_scale? / delta?}``;
  server → ``{"type": "params.updated", "t_index_list"}`` (the steps now in use)
- client → ``{"type": "stats"}``; server → ``{"type": "stats", received, processed, dropped, skipped, nfe, fps
  (over the session), fps_recent (over the last 2 s), latency_ms (the last frame's)}``
- errors: ``{"type": "error", "code", "message", "param", "request_id"}`` (``param`` is ``"frame"`` for anything a
  frame caused, ``"message"`` for a text message that is not a JSON object: invalid, nested deeper than 32
  levels, over ``max_body_bytes``, or dropped past the rate limit); a bad frame or message leaves the session
  running, a frame over ``max_frame_bytes`` included. A user's mistake gets its message; a failure inside the
  server or the model gets ``internal_error`` (``gpu_oom`` when the device ran out of memory) and a message
  written for the user, the exception going only to the server log, under ``request_id`` (the connection's:
  the upgrade request's ``X-Request-Id`` if it is a plain token, else a new one).
- Session slots: a connection takes one of ``max_stream_sessions`` at a successful ``session.start`` (not when
  it connects; a refused start takes none) and frees it when it ends, after the frame on the device.
- Rate limit: text messages other than ``frame.request`` (which, like frames, is input: latest wins) are
  limited per connection to ``stream_control_rate`` a second in bursts of ``stream_control_burst``; one past it
  is dropped with a ``rate_limited`` error, and ``stream_control_burst`` dropped in a row close the connection
  (1008).
- Close codes: 1009 for a message past twice ``max_frame_bytes`` (at least 16 MiB: the
  WebSocket layer refuses it before it reaches the app), 1013 for a ``session.start`` when the
  server is at its session cap, 1008 for a flood of control messages, 1000 after ``stream_idle_timeout_s``
  without input taken (accepted frames, frame requests, session or parameter messages that succeed: a ``stats``
  poll, a refused message or a refused frame does not keep a connection open).
  A bad or missing API key is refused before the handshake
  (close 1008, which uvicorn sends as an HTTP 403 to the upgrade request). The key goes in an
  ``Authorization: Bearer`` header, or (browsers cannot set headers on a WebSocket) in the subprotocols
  ``["accel-diffusion", "base64url.bearer.<key, base64url-encoded>"]``, of which the server echoes only
  ``accel-diffusion``; ``?api_key=`` still works (the access log redacts it). With API keys, a session's
  MJPEG view answers only the key that started it (another key gets 404, as for jobs).
- Every message is sent under one lock per connection, and a frame's header and its image go
  together, so a ``stats`` or ``error`` reply never lands between them.

Each connection owns its ``StreamSession`` (latents, noise, filter): nothing is shared between
users. The model work runs on the device worker's thread (``DeviceWorker.run_soon``), in its stream lane:
between a running job's steps and before queued jobs while the lane is within ``stream_share`` of the
device time (``FairShare``), never on the event loop. A session is bounded by ``stream_max_width``,
``stream_max_height`` and ``stream_max_steps`` (past them ``session.start`` or ``params.update`` gets a
``stream_limit_exceeded`` error naming the field). When the connection closes, its frame still waiting for
the worker is dropped (a frame already running finishes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

import numpy as np
from accel_diffusion.server.auth import api_key_matches, bearer_key, key_owner
from accel_diffusion.server.jobs import OutputOptions
from accel_diffusion.server.worker import out_of_memory
from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from PIL import Image, UnidentifiedImageError

from accel_diffusion.errors import AccelDiffusionError, InvalidRequestError, UnknownFieldError
from accel_diffusion.imageio import encode_image
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.strategy import RequestLimits
from accel_diffusion.stream import StreamSession
from accel_diffusion.stream.session import DEFAULT_T_INDEX_LIST, FrameStats
from accel_diffusion.text import replace_unencodable
from accel_diffusion.vocabulary import errors_named_as_sent, to_canonical

LOG = logging.getLogger(__name__)
SUBPROTOCOL = "accel-diffusion"  # echoed when offered; offer it with the key's subprotocol (browsers need one back)
BEARER_SUBPROTOCOL = "base64url.bearer."  # + the API key, base64url-encoded without padding
CLOSE_OVERLOADED = 1013
CLOSE_POLICY = 1008
START_FIELDS = {"type", "prompt", "model", "negative_prompt", "t_index_list", "guidance", "guidance_scale", "delta",
                "seed", "width", "height", "size", "mode", "similarity_threshold", "max_skip", "vae", "strength",
                "output_format", "quality"}  # size: "WxH", the alias of width/height (accel_diffusion.vocabulary)
# Frames up to this size (a 256x256 JPEG is ~10 KB) decode on the event loop in well under a
# millisecond; larger ones go to a thread so they cannot stall other sessions' sends.
INLINE_DECODE_BYTES = 32 * 1024
INLINE_ENCODE_PIXELS = 128 * 128  # output frames up to this many pixels encode on the event loop (the same reason)
RECENT_S = 2.0  # the window of the stats' fps_recent
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # an X-Request-Id taken as sent (else one is made: log-safe)
UPDATE_FIELDS = {"type", "prompt", "negative_prompt", "t_index_list", "strength", "seed", "guidance_scale", "delta"}


def stream_router() -> APIRouter:
    router = APIRouter()

    @router.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        state = websocket.app.state.server
        key = _sent_key(websocket)
        if state.api_keys and not api_key_matches(key, state.api_keys):
            await websocket.close(CLOSE_POLICY, "missing or invalid API key")
            return
        # a browser that offered subprotocols fails the connection unless one is echoed: the non-secret one
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in websocket.scope.get("subprotocols", [])
                               else None)
        with contextlib.suppress(WebSocketDisconnect):  # a session slot is taken at session.start, not here
            await _serve(websocket, state, key_owner(key) if state.api_keys else None)

    @router.get("/v1/stream/{session_id}/mjpeg", tags=["stream"], response_class=StreamingResponse,
                responses={200: {"content": {"multipart/x-mixed-replace": {}}}})
    async def mjpeg(session_id: str, request: Request) -> StreamingResponse:
        """The session's output frames as MJPEG, for an ``<img src=...>``; ends with the session. With API
        keys, only the key that started the session sees it (another key's session answers 404)."""
        state = request.app.state.server
        key = _sent_key(request)
        if state.api_keys and not api_key_matches(key, state.api_keys):
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>, or ?api_key=)")
        connection = state.stream_connections.get(session_id)
        if connection is None or (state.api_keys and connection.owner != key_owner(key)):
            raise HTTPException(404, f"no stream session {session_id!r}")
        return StreamingResponse(_mjpeg_parts(connection, request),
                                 media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _mjpeg_parts(connection: _Connection, request: Request) -> AsyncIterator[bytes]:
    flag = asyncio.Event()
    connection.viewers.append(flag)
    try:
        while not connection.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flag.wait(), 1.0)
            if await request.is_disconnected():
                return
            if flag.is_set() and connection.latest_jpeg is not None:
                flag.clear()
                frame = connection.latest_jpeg
                yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                       + str(len(frame)).encode() + b"\r\n\r\n" + frame + b"\r\n")
            flag.clear()
    finally:
        connection.viewers.remove(flag)


def _sent_key(connection: WebSocket | Request) -> str:
    """The API key a stream caller sent ("" if none): an ``Authorization: Bearer`` header; on a WebSocket the
    subprotocol ``base64url.bearer.<key>`` (the key base64url-encoded: what a browser can send); else
    ``?api_key=`` (kept for old clients and ``<img src>``; the access log redacts it)."""
    token = bearer_key(connection.headers.get("authorization"))
    if token is not None:
        return token
    for protocol in connection.scope.get("subprotocols", []):
        if protocol.startswith(BEARER_SUBPROTOCOL):
            encoded = protocol.removeprefix(BEARER_SUBPROTOCOL)
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return ""
    return connection.query_params.get("api_key", "")


class StreamLimitError(InvalidRequestError):
    """A stream session past this server's stream limits (``stream_max_width``, ``stream_max_height``,
    ``stream_max_steps``): the field is named and the setting that bounds it."""

    error_type = "stream_limit_exceeded"


def stream_limits(settings: Any, limits: RequestLimits) -> RequestLimits:
    """The request limits of stream sessions: the server's, narrowed by its stream settings."""
    width = min(limits.max_width, settings.stream_max_width)
    height = min(limits.max_height, settings.stream_max_height)
    return limits.model_copy(update={"max_width": width, "max_height": height,
                                     "max_pixels": min(limits.max_pixels, width * height),
                                     "max_steps": min(limits.max_steps, settings.stream_max_steps)})


def _check_stream_size(options: dict[str, Any], default_size: tuple[int, int], limits: RequestLimits) -> None:
    """Refuse a session larger than the stream limits (the model's default size counts when none is sent)."""
    for name, default, limit in (("width", default_size[0], limits.max_width),
                                 ("height", default_size[1], limits.max_height)):
        value = options.get(name, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            sent = "" if name in options else " (the model's default)"
            raise StreamLimitError(name, f"{value}{sent} is more than stream sessions take here: at most {limit} "
                                   f"(stream_max_{name}); send a smaller {name}")


def _check_stream_steps(t_index_list: Any, limits: RequestLimits) -> None:
    """Refuse more denoising steps a frame than ``stream_max_steps``."""
    if isinstance(t_index_list, list | tuple) and len(t_index_list) > limits.max_steps:
        raise StreamLimitError("t_index_list", f"{len(t_index_list)} steps a frame; stream sessions take at most "
                               f"{limits.max_steps} here (stream_max_steps): send fewer indices")


class _Close(Exception):  # not an error: the handler closes the connection with this code
    """Raised by a message handler: close the connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Connection:
    def __init__(self, websocket: WebSocket, state: Any, owner: str | None) -> None:
        self.websocket = websocket
        self.state = state
        self.owner = owner  # the digest of the key that started it (None without API keys): MJPEG viewers
        self.session: StreamSession | None = None
        self.output = OutputOptions("jpeg", 85)
        self.waiting: tuple[int, float, np.ndarray | None] | None = None  # the latest frame not yet on the device
        self.busy = False
        self.seq = 0
        self.dropped = 0
        self.processed = 0
        self.started = time.monotonic()
        self.id = uuid.uuid4().hex[:16]
        self.latest_jpeg: bytes | None = None  # for MJPEG viewers
        self.viewers: list[asyncio.Event] = []
        self.closed = False
        self.send_lock = asyncio.Lock()
        self.drain_task: asyncio.Task[None] | None = None
        self.frame_future: Future[Any] | None = None  # the frame handed to the worker (cancelled if it waits at close)
        self.recent: deque[float] = deque()  # when frames finished, over the last RECENT_S seconds
        self.latency_ms: float | None = None  # the last frame's, receipt to reply
        self.last_input = time.monotonic()  # for the idle timeout: accepted input or a frame answered, not stats polls
        self.holds_slot = False  # one of max_stream_sessions, from a successful session.start to the end
        sent_id = websocket.headers.get("x-request-id", "")  # as for HTTP: the upgrade's, else a new one
        self.request_id = sent_id if REQUEST_ID.fullmatch(sent_id) else uuid.uuid4().hex
        self.tokens = float(state.settings.stream_control_burst)  # the control-message rate limit's bucket
        self.refilled = time.monotonic()
        self.limited_in_a_row = 0

    async def send(self, message: dict[str, Any], image: bytes | None = None) -> None:
        """A JSON message, and the binary frame that belongs to it, with nothing in between."""
        text = replace_unencodable(json.dumps(message, separators=(",", ":"), ensure_ascii=False))
        async with self.send_lock:  # (an error may quote a field name with a lone surrogate: sent as U+FFFD)
            await self.websocket.send_text(text)
            if image is not None:
                await self.websocket.send_bytes(image)

    async def error(self, code: str, message: str, param: str | None = None) -> None:
        await self.send({"type": "error", "code": code, "message": message, "param": param,
                         "request_id": self.request_id})

    async def failed(self, exc: Exception, what: str, param: str | None = None) -> None:
        """Answer an exception: a user's mistake with its message; anything else with a code and a message
        written for the user, the exception text going only to the log, under the request id."""
        if isinstance(exc, InvalidRequestError):
            await self.error(exc.error_type, str(exc), exc.field)
            return
        if isinstance(exc, AccelDiffusionError):  # raised on purpose, with a message for users (as for jobs)
            await self.error(exc.error_type, str(exc), param)
            return
        oom = out_of_memory(exc)  # (the worker has freed the device memory of the failed work: DeviceWorker.run_soon)
        LOG.error("stream request %s: %s failed", self.request_id, what, exc_info=exc)
        self.state.metrics.errors.labels(type="gpu_oom" if oom else "internal_error").inc()
        await self.error("gpu_oom" if oom else "internal_error",
                         f"{'out of device memory' if oom else 'internal error'} on this {what} (not a fault of "
                         f"your input; the stream goes on); the server log has the details under request_id "
                         f"{self.request_id}", param)

    def take_control_token(self) -> bool:
        """The per-connection token bucket of control messages: stream_control_rate a second, bursts of
        stream_control_burst."""
        settings = self.state.settings
        now = time.monotonic()
        self.tokens = min(float(settings.stream_control_burst),
                          self.tokens + (now - self.refilled) * settings.stream_control_rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.limited_in_a_row = 0
            return True
        self.limited_in_a_row += 1
        return False


async def _serve(websocket: WebSocket, state: Any, owner: str | None) -> None:
    connection = _Connection(websocket, state, owner)
    state.stream_connections[connection.id] = connection
    try:
        await _receive_loop(connection, websocket, state)
    finally:
        connection.closed = True
        connection.waiting = None  # a gone client's waiting frame is not run ...
        if connection.frame_future is not None:
            connection.frame_future.cancel()  # ... nor the one waiting on the worker (a running one finishes)
        del state.stream_connections[connection.id]
        for viewer in connection.viewers:
            viewer.set()
        try:
            if connection.drain_task is not None:  # the frame on the device finishes before the slot is free
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.drain_task)  # a cancelled handler does not cancel the frame
        finally:
            if connection.holds_slot:
                state.stream_sessions -= 1


async def _receive_loop(connection: _Connection, websocket: WebSocket, state: Any) -> None:
    idle = state.settings.stream_idle_timeout_s
    while True:
        remaining = idle - (time.monotonic() - connection.last_input)
        try:
            if remaining <= 0 and not connection.busy:
                raise TimeoutError
            message = await asyncio.wait_for(websocket.receive(), remaining if remaining > 0 else idle)
        except TimeoutError:
            if connection.busy:  # its frame is on the device: the client waits for us, it is not idle
                continue  # (the timer restarts when the frame is answered)
            await websocket.close(1000, f"idle for {idle:g} s")
            return
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                if await _on_frame(connection, message["bytes"]):
                    connection.last_input = time.monotonic()  # only input that was taken keeps the session
            elif message.get("text") is not None:
                await _on_text(connection, message["text"])
        except _Close as close:
            await websocket.close(close.code, close.reason)
            return


async def _on_text(connection: _Connection, text: str) -> None:
    problem = None
    try:  # the server's one bounded JSON parser (size, nesting depth), as for HTTP bodies
        data = parse_json(text, "message", max_bytes=connection.state.settings.max_body_bytes)
    except InvalidRequestError as exc:
        data, problem = None, exc
    kind = data.get("type") if isinstance(data, dict) else None
    if kind != "frame.request" and not connection.take_control_token():  # frame requests are input, like frames
        await _rate_limited(connection)
        return
    if problem is not None:
        await connection.error(problem.error_type, f"control messages are JSON objects; this one {problem.message}",
                               "message")
        return
    if not isinstance(data, dict):
        await connection.error("invalid_request_error", "control messages are JSON objects", "message")
        return
    try:
        if kind == "session.start":
            await _start(connection, data)
        elif kind == "params.update":
            if connection.session is None:
                raise InvalidRequestError("type", "start a session first (session.start)")
            _check_fields(data, UPDATE_FIELDS)
            _check_stream_steps(data.get("t_index_list"), stream_limits(connection.state.settings,
                                                                        connection.state.limits))
            fields = {k: v for k, v in data.items() if k != "type"}
            await _on_worker(connection, lambda: connection.session.update(**fields))  # type: ignore[union-attr]
            await connection.send({"type": "params.updated", "t_index_list": connection.session.t_index_list})
        elif kind == "stats":
            await connection.send(_stats(connection))
        elif kind == "frame.request":
            if connection.session is None or connection.session.mode != "txt2img":
                raise InvalidRequestError("type", "frame.request is for txt2img sessions; img2img sessions are "
                                          "sent binary frames")
            _check_fields(data, {"type"})
            _enqueue(connection, None)
        else:
            raise InvalidRequestError("type", f"unknown message type {kind!r}",
                                      ["session.start", "params.update", "stats", "frame.request"])
    except _Close:
        raise
    except Exception as exc:  # a bug must not end the user's stream: report it, keep the connection
        await connection.failed(exc, f"{kind} message" if isinstance(kind, str) else "message")
        return
    if kind != "stats":  # a session, parameter or frame request that was taken: a stats poll keeps nothing open
        connection.last_input = time.monotonic()


async def _rate_limited(connection: _Connection) -> None:
    settings = connection.state.settings
    rate, burst = settings.stream_control_rate, settings.stream_control_burst
    if connection.limited_in_a_row >= burst:
        raise _Close(CLOSE_POLICY, f"over {rate:g} control messages a second, {burst} dropped in a row")
    wait = (1 - connection.tokens) / rate
    await connection.error("rate_limited", f"over {rate:g} control messages a second (bursts of {burst}); this "
                           f"message was dropped: send the next in {wait:.2f} s or later", "message")


def _check_fields(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UnknownFieldError(unknown[0], allowed - {"type"})


async def _start(connection: _Connection, data: dict[str, Any]) -> None:
    if connection.session is not None:
        raise InvalidRequestError("type", "this connection already has a session; use params.update")
    _check_fields(data, START_FIELDS)
    state = connection.state
    if state.settings.role == "api":  # a session runs on the process holding its connection
        raise _Close(CLOSE_POLICY, "stream sessions need a local model: this replica runs role = 'api'; "
                     "connect to one with role 'all' or 'worker'")
    model_id = data.get("model") or state.default_model
    if model_id not in state.settings.served_models:
        raise InvalidRequestError("model", f"{model_id!r} is not served here", state.settings.served_models)
    output_format = data.get("output_format", "jpeg")
    if output_format not in ("jpeg", "webp", "png"):
        raise InvalidRequestError("output_format", f"unknown format {output_format!r}", ["jpeg", "webp", "png"])
    quality = data.get("quality", 85)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise InvalidRequestError("quality", f"must be an integer in [0, 100], got {quality!r}")
    canonical, sent = to_canonical(data)  # size -> width, height
    options = {k: canonical[k] for k in ("negative_prompt", "t_index_list", "guidance", "guidance_scale", "delta",
                                         "seed", "width", "height", "mode", "similarity_threshold", "max_skip", "vae",
                                         "strength")
               if canonical.get(k) is not None or k in data}
    model = state.registry.get(model_id)
    limits = stream_limits(state.settings, state.limits)
    with errors_named_as_sent(sent):  # refused before it takes a slot; a size past the limits names size
        _check_stream_size(options, model.default_size, limits)
    mode = options.get("mode", "img2img")
    _check_stream_steps(options.get("t_index_list", DEFAULT_T_INDEX_LIST.get(mode) if isinstance(mode, str) else None),
                        limits)
    cap = state.settings.max_stream_sessions
    if state.stream_sessions >= cap:  # checked and taken with no await between: no two starts share a slot
        raise _Close(CLOSE_OVERLOADED, f"at most {cap} stream sessions; try again later")
    quota = state.settings.key_max_stream_sessions  # per key (keyless: one tenant), under max_stream_sessions
    if sum(c.holds_slot and c.owner == connection.owner for c in state.stream_connections.values()) >= quota:
        raise _Close(CLOSE_OVERLOADED, f"at most {quota} stream sessions per API key (key_max_stream_sessions)")
    state.stream_sessions += 1
    connection.holds_slot = True
    try:
        with errors_named_as_sent(sent):  # a bad size names size
            session = await _on_worker(connection, lambda: StreamSession(
                model, data.get("prompt"), limits=limits, acceleration=state.settings.stream_acceleration_used,
                **options))
    except BaseException:  # a refused session.start holds no slot
        state.stream_sessions -= 1
        connection.holds_slot = False
        raise
    connection.session, connection.output = session, OutputOptions(output_format, quality)
    await connection.send({"type": "session.started", "session": {
        "id": connection.id, "mjpeg_url": f"/v1/stream/{connection.id}/mjpeg", "model": model_id,
        "width": session.width, "height": session.height, "mode": session.mode,
        "t_index_list": session.t_index_list, "guidance": session.guidance, "warmup_frames": session.num_slots - 1,
        "vae": session.vae, "acceleration": session.acceleration, "output_format": output_format}})


async def _on_worker(connection: _Connection, task: Any) -> Any:
    return await asyncio.wrap_future(connection.state.worker.run_soon(task))


async def _on_frame(connection: _Connection, data: bytes) -> bool:
    """Take an input frame to the device (True), or answer it with an error (False)."""
    session = connection.session
    if session is None:
        await connection.error("invalid_request_error", "start a session first (session.start)", "type")
        return False
    if session.mode == "txt2img":
        await connection.error("invalid_frame", "a txt2img session takes no input frames; send "
                               '{"type": "frame.request"} for the next output frame', "frame")
        return False
    limit = connection.state.settings.max_frame_bytes
    if len(data) > limit:
        await connection.error("invalid_frame", f"frame of {len(data)} bytes; at most {limit}", "frame")
        return False
    try:
        if len(data) <= INLINE_DECODE_BYTES:
            pixels = _decode_frame(data, session)
        else:  # a large frame takes milliseconds to decode: off the event loop, like the model work
            pixels = await asyncio.to_thread(_decode_frame, data, session)
    except InvalidRequestError as exc:
        await connection.error("invalid_frame", exc.message, "frame")
        return False
    _enqueue(connection, pixels)
    return True


def _decode_frame(data: bytes, session: StreamSession) -> np.ndarray:
    """RGB pixels of an input frame; its size is checked from the header, before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (session.width, session.height):
                raise InvalidRequestError("frame", f"a {image.width}x{image.height} frame; this session takes "
                                          f"{session.width}x{session.height} frames")
            return np.asarray(image.convert("RGB"))
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError("frame", "not a JPEG, PNG or WebP image") from exc
    except Exception as exc:  # e.g. Pillow's DecompressionBombError on a crafted header, a truncated file
        raise InvalidRequestError("frame", "unreadable image (truncated, corrupt, or declaring too many pixels); "
                                  "send a complete JPEG, PNG or WebP of the session's size") from exc


def _enqueue(connection: _Connection, pixels: np.ndarray | None) -> None:
    """Hand a frame (None: a txt2img frame request) to the device; a newer one replaces a waiting one."""
    connection.seq += 1
    if connection.waiting is not None:
        connection.dropped += 1  # latest frame wins
    connection.waiting = (connection.seq, time.monotonic(), pixels)
    if not connection.busy:
        connection.busy = True
        connection.drain_task = asyncio.get_running_loop().create_task(_drain(connection))


async def _drain(connection: _Connection) -> None:
    """Send waiting frames through the session one at a time, with at most two frames in flight: while
    a frame's answer is encoded and sent, the device already runs the next waiting one (a newer frame
    still replaces a waiting one); answers leave in the order the frames ran."""
    session = connection.session
    assert session is not None
    delivery: asyncio.Task[None] | None = None  # the previous frame's answer, still being encoded or sent
    try:
        while connection.waiting is not None and not connection.closed:
            seq, received, pixels = connection.waiting
            connection.waiting = None
            outcome = await _compute(connection, session, pixels)
            if outcome is None:  # dropped at close before it ran: nothing to answer
                break
            if delivery is not None:  # answers in order; the device ran this frame meanwhile
                await delivery
                delivery = None
            if connection.waiting is not None and not connection.closed:
                # a frame waits: the device takes it now, while this answer goes out (two in flight)
                delivery = asyncio.get_running_loop().create_task(_deliver(connection, seq, received, outcome))
            else:
                await _deliver(connection, seq, received, outcome)
        if delivery is not None:
            await delivery
    finally:
        connection.busy = False
        connection.last_input = time.monotonic()  # the idle timer counts from the last answer, not across a frame


async def _compute(connection: _Connection, session: StreamSession,
                   pixels: np.ndarray | None) -> tuple[np.ndarray | None, FrameStats | None] | BaseException | None:
    """Run one frame on the device worker: (output, what the call did), the exception it raised, or None
    when the connection closed before the frame ran."""
    def frame() -> tuple[np.ndarray | None, FrameStats | None]:
        return session(pixels), session.state.last_frame  # read on the worker: the next frame may run before
        # this one is answered

    future = connection.frame_future = connection.state.worker.run_soon(frame)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future.cancelled() and connection.closed:
            return None
        raise
    except Exception as exc:  # answered in the frame's place, in order
        return exc
    finally:
        connection.frame_future = None


async def _deliver(connection: _Connection, seq: int, received: float,
                   outcome: tuple[np.ndarray | None, FrameStats | None] | BaseException) -> None:
    """Answer a frame that ran: its header and image (or its error); never raises (the stream goes on)."""
    try:
        if isinstance(outcome, BaseException):
            raise outcome
        output, stats = outcome
        await _answer(connection, seq, received, output, stats)
    except Exception as exc:  # report it (whatever its field, it answers the frame), go on with the next
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            if isinstance(exc, InvalidRequestError):
                await connection.error(exc.error_type, str(exc), "frame")
            else:
                await connection.failed(exc, f"frame (seq {seq})", "frame")


async def _answer(connection: _Connection, seq: int, received: float, output: np.ndarray | None,
                  stats: FrameStats | None) -> None:
    connection.processed += 1
    encoded = None if output is None else await _encoded(output, connection.output)
    if output is not None and connection.viewers:
        connection.latest_jpeg = (encoded if connection.output.output_format == "jpeg" else
                                  await _encoded(output, OutputOptions("jpeg", 85)))
        for viewer in connection.viewers:
            viewer.set()
    now = time.monotonic()
    connection.latency_ms = round(1e3 * (now - received), 2)
    connection.recent.append(now)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await connection.send({"type": "frame", "seq": seq, "latency_ms": connection.latency_ms,
                               "skipped": bool(stats and stats.skipped), "warming_up": output is None}, encoded)


async def _encoded(output: np.ndarray, options: OutputOptions) -> bytes:
    """The output frame's file bytes: small frames on the event loop (a 64x64 JPEG takes ~0.1 ms, less
    than a hop to a thread and back), larger ones on a thread so that other sessions' sends go on."""
    if output.shape[0] * output.shape[1] <= INLINE_ENCODE_PIXELS:
        return _encode(output, options)
    return await asyncio.to_thread(_encode, output, options)


def _encode(output: np.ndarray, options: OutputOptions) -> bytes:
    return encode_image(output, options.output_format, options.output_compression)


def _stats(connection: _Connection) -> dict[str, Any]:
    session = connection.session
    history = session.stats() if session is not None else {"frames": 0, "skipped": 0, "nfe": 0}
    now = time.monotonic()
    elapsed = now - connection.started
    while connection.recent and now - connection.recent[0] > RECENT_S:
        connection.recent.popleft()
    return {"type": "stats", "received": connection.seq, "processed": connection.processed,
            "dropped": connection.dropped, "skipped": history["skipped"], "nfe": history["nfe"],
            "fps": connection.processed / elapsed if elapsed > 0 else 0.0,  # over the session's life
            "fps_recent": len(connection.recent) / RECENT_S, "latency_ms": connection.latency_ms}
