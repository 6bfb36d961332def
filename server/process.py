"""Running the app under uvicorn with a graceful drain: on SIGTERM/SIGINT readiness turns 503 and new
jobs are refused while the server keeps answering; once the queue is empty and the worker idle (or
``drain_timeout_s`` has passed) uvicorn shuts down.

Also what uvicorn leaves open: secrets in query strings (``?api_key=``) are redacted from every log line
(the access log, WebSocket lines), and a connection must deliver a complete request within
``request_read_timeout_s`` (uvicorn alone waits forever for a half-sent one).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from accel_diffusion.server.access_log import AccessLog
from accel_diffusion.server.app import create_app
from accel_diffusion.server.settings import ServerSettings
from fastapi import FastAPI


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains instead of stopping at once (a second one stops)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.app.state, "server", None)
        if self._draining or state is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        state.draining = True
        threading.Thread(target=self._drain, args=(state,), name="accel-diffusion-drain", daemon=True).start()

    def _drain(self, state: object) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline and not state.idle:  # type: ignore[attr-defined]
            time.sleep(0.05)
        self.should_exit = True


UVICORN_WS_MAX_SIZE = 16 * 1024 * 1024


def websocket_message_limit(settings: ServerSettings) -> int:
    """The largest WebSocket message uvicorn accepts: twice the frame limit (at least uvicorn's 16 MiB).

    A frame over ``max_frame_bytes`` but under this gets an ``invalid_frame`` error and the session goes
    on; only a message past this closes the connection (1009, message too big) — without the margin an
    operator who raised ``max_frame_bytes`` past 16 MiB would see every such frame close the socket.
    """
    return max(UVICORN_WS_MAX_SIZE, 2 * settings.max_frame_bytes)


def log_config(log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration, plus the server's own messages (loading, warming up, ready in N s) on
    the console in uvicorn's format, at ``log_level``."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["accel_diffusion.server"] = {"handlers": ["default"], "level": log_level.upper(),
                                                   "propagate": False}
    return config


class RequestReadDeadline:
    """Mixin over a uvicorn HTTP protocol class: a connection must deliver each request complete (headers and
    body) within ``read_timeout_s`` of opening, or of its previous response. Past it, a connection still
    sending its headers (or sending nothing) is answered 408 and closed, one still sending its body is
    closed (the app sees a disconnect). The app's own time is not counted (a long generation, an SSE stream),
    nor a WebSocket's life after the upgrade. uvicorn's ``timeout_keep_alive`` only covers the idle time
    between two requests; a client that trickles a header line forever would otherwise hold its socket."""

    read_timeout_s: float = 30.0
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    logger: logging.Logger

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_read_deadline()  # the next request's time starts now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        self._read_deadline = (None if self.transport.is_closing() else
                               self.loop.call_later(self.read_timeout_s, self._read_deadline_passed))

    def _read_deadline_passed(self) -> None:
        self._read_deadline = None
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:  # closed, or now a WebSocket
            return
        cycle = self.cycle
        receiving_body = cycle is not None and not cycle.response_complete
        if receiving_body and not cycle.more_body:  # the whole request is in: the app is at work
            return
        client = getattr(self, "client", None)
        self.logger.info("%s - closed: no complete request within %g s (request_read_timeout_s)",
                         f"{client[0]}:{client[1]}" if client else "-", self.read_timeout_s)
        if not receiving_body:
            message = f"request not complete within {self.read_timeout_s:g} s".encode()
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"connection: close\r\ncontent-length: " + str(len(message)).encode() + b"\r\n\r\n"
                            + message)
        transport.close()


class AppWritesAccessLines:
    """Mixin over a uvicorn HTTP protocol class: it writes no access line; the app does, off the request path
    (``server/access_log.py``)."""

    access_log: bool

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self.access_log = False  # read by each request's cycle


def http_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) under a RequestReadDeadline, leaving the
    access lines to the app (AppWritesAccessLines)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type(f"Server{AutoHTTPProtocol.__name__}", (RequestReadDeadline, AppWritesAccessLines,
                                                       AutoHTTPProtocol), {"read_timeout_s": read_timeout_s})


SECRET_QUERY = re.compile(r"([?&](?:api[_-]?key|key|token|access[_-]?token|auth|password|secret)=)[^&\s\"'#]*",
                          re.IGNORECASE)
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "accel_diffusion.server",
                  "accel_diffusion.server.stream")


def redact_query_secrets(text: str) -> str:
    """``text`` with the values of secret-looking query parameters (api_key, key, token, ...) replaced."""
    return SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactQuerySecrets(logging.Filter):
    """Rewrites a record's message and string arguments through :func:`redact_query_secrets` (uvicorn's
    access formatter reads the arguments, so they keep their places)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query_secrets(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query_secrets(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query_secrets(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_redaction(loggers: tuple[str, ...] = SERVER_LOGGERS) -> None:
    """Put a RedactQuerySecrets filter on each logger that writes request URLs (once each)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuerySecrets) for f in logger.filters):
            logger.addFilter(RedactQuerySecrets())


def uvicorn_config(app: FastAPI, settings: ServerSettings, drain_timeout_s: float = 600.0,
                   log_level: str = "info") -> uvicorn.Config:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            log_config=log_config(log_level), timeout_graceful_shutdown=int(drain_timeout_s),
                            ws_max_size=websocket_message_limit(settings),
                            http=http_protocol(settings.request_read_timeout_s))
    app.state.access_log = AccessLog()  # uvicorn's lines, written by the app (AppWritesAccessLines)
    install_log_redaction()  # after uvicorn.Config, which (re)configures its loggers
    return config


def serve(settings: ServerSettings, drain_timeout_s: float = 600.0, ranks: Any = None) -> None:
    """Serve ``settings`` until SIGTERM; under torchrun (WORLD_SIZE > 1) as the multi-rank server
    (``server/ranks.py``: rank 0 serves HTTP, ``ranks`` is its group)."""
    from accel_diffusion.server.ranks import serve_ranks, world_size_from_env

    if ranks is None and world_size_from_env() > 1:
        serve_ranks(settings, drain_timeout_s)
        return
    app = create_app(settings, ranks)
    DrainingServer(uvicorn_config(app, settings, drain_timeout_s), app, drain_timeout_s).run()
