"""Running the app under uvicorn with a graceful drain: on SIGTERM/SIGINT readiness turns 503 and new
jobs are refused while the server keeps answering; once the queue is empty and the worker idle (or
``drain_timeout_s`` has passed) uvicorn shuts down."""

from __future__ import annotations

import copy
import threading
import time
from types import FrameType
from typing import Any

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


def log_config(log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration, plus the server's own messages (loading, warming up, ready in N s) on
    the console in uvicorn's format, at ``log_level``."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["accel_diffusion.server"] = {"handlers": ["default"], "level": log_level.upper(),
                                                   "propagate": False}
    return config


def uvicorn_config(app: FastAPI, settings: ServerSettings, drain_timeout_s: float = 600.0,
                   log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          log_config=log_config(log_level), timeout_graceful_shutdown=int(drain_timeout_s),
                          ws_max_size=websocket_message_limit(settings))


def serve(settings: ServerSettings, drain_timeout_s: float = 600.0) -> None:
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings, drain_timeout_s), app, drain_timeout_s).run()
