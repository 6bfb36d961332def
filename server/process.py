"""Running the app under uvicorn with a graceful drain: on SIGTERM/SIGINT readiness turns 503 and new
jobs are refused while the server keeps answering; once the queue is empty and the worker idle (or
``drain_timeout_s`` has passed) uvicorn shuts down.

Also what uvicorn leaves open: secrets in query strings (``?api_key=``) are redacted from every log line
(the access log, WebSocket lines).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from types import FrameType

import uvicorn
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
                            timeout_graceful_shutdown=int(drain_timeout_s),
                            ws_max_size=websocket_message_limit(settings))
    install_log_redaction()  # after uvicorn.Config, which (re)configures its loggers
    return config


def serve(settings: ServerSettings, drain_timeout_s: float = 600.0) -> None:
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings, drain_timeout_s), app, drain_timeout_s).run()
