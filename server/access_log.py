"""uvicorn's access lines, written off the request path.

uvicorn writes a request's access line when the response starts, before the response goes out: on the 2-core
VM this project is measured on that line cost a synchronous request 0.12–0.16 ms of its overhead (a log record,
the query-secret filter, uvicorn's formatter and a write, all on an event loop whose caches went cold while the
engine ran; 21 us when warm). Served by ``accel-diffusion serve``, the server turns uvicorn's own line off
(``server/process.py``) and ``RequestIdAndLimits`` records each response's status here instead; the event loop
writes the recorded lines ``delay_s`` later, in one batch, in the order the responses started: the same
words, to the same ``uvicorn.access`` logger (its handlers, level and filters apply), at most ``delay_s`` late.
The app's shutdown writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

ACCESS_LOGGER = logging.getLogger("uvicorn.access")


class AccessLog:
    """Responses recorded on the event loop, written as uvicorn's access lines ``delay_s`` later."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self._pending: list[tuple[dict[str, Any], int]] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def record(self, scope: dict[str, Any], status: int) -> None:
        """Note a response's start (on the event loop): its line is written within ``delay_s``."""
        if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        self._pending.append((scope, status))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self.delay_s, self.flush)

    def flush(self) -> None:
        """Write the recorded lines now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        for scope, status in pending:
            ACCESS_LOGGER.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"],  # type: ignore[arg-type]
                               get_path_with_query_string(scope), scope["http_version"], status)  # type: ignore[arg-type]
