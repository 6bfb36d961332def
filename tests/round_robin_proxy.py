"""A tiny HTTP round-robin proxy for the scale-out tests: each request goes to the next replica in turn (as a
Kubernetes Service spreads them), responses (SSE included) are streamed back as they come."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

HOP_BY_HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade"}


class RoundRobinProxy:
    """ASGI app forwarding request k to ``upstreams[k % len(upstreams)]``; ``sent`` counts requests per upstream."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = upstreams
        self.sent = [0] * len(upstreams)
        self._next = itertools.count()
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._client = httpx.AsyncClient(timeout=None)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http" and self._client is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        index = next(self._next) % len(self.upstreams)
        self.sent[index] += 1
        query = scope.get("query_string", b"").decode("latin-1")
        url = self.upstreams[index] + scope["path"] + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        response = await self._client.send(self._client.build_request(scope["method"], url, headers=headers,
                                                                      content=body), stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


@contextmanager
def running_proxy(upstreams: list[str]) -> Iterator[tuple[RoundRobinProxy, str]]:
    proxy = RoundRobinProxy(upstreams)
    server = uvicorn.Server(uvicorn.Config(proxy, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
