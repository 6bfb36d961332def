"""Host and Origin checks: the keyless localhost default is closed to DNS rebinding and to other sites' pages.

A DNS-rebinding page reaches the server under its own name (``Host: attacker.example:8000``), so only
the Host check stops it; another site's page sends its own ``Origin``, which must be the server's own
(the Host it was sent to), one of ``allowed_origins`` or one of ``cors_origins``. Requests without an
Origin (curl, SDKs, server-side clients, a browser's page loads) are not browser cross-site requests
and pass. ``/health/*`` answers any Host and Origin: kubelet probes send the pod IP as Host, and the
probes reveal only liveness and the served model ids.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from accel_diffusion.server.metrics import count_error
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from accel_diffusion.server.settings import ServerSettings

OPEN_PATH_PREFIX = "/health/"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str) -> tuple[str, int | None]:
    """``Host`` header value -> (lower-case name without IPv6 brackets, port or None); a bad port is -1."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1] or [::1]:8000
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:  # a name, or a bare IPv6 address
        name, port = value, ""
    if not port:
        return name, None
    return name, int(port) if port.isdecimal() and len(port) <= 5 else -1


def host_matches(name: str, patterns: list[str]) -> bool:
    """``name`` is one of ``patterns`` (names or IPs; ``*.example.com``: its subdomains; ``*``: any)."""
    for pattern in patterns:
        pattern = pattern.lower().strip("[]")
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def is_loopback(host: str) -> bool:
    """The bind address is a loopback one (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, host: str) -> bool:
    """A browser ``Origin`` names the server it was sent to (its Host): same name and port (the scheme's
    default when unstated; the scheme itself may differ, as behind a proxy that ends TLS)."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    name, port = split_host(host)
    default = DEFAULT_PORTS[parts.scheme]
    return parts.hostname == name and (origin_port or default) == (port or default)


def normalized_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class HostAndOriginCheck:
    """Pure ASGI middleware: HTTP requests and WebSocket handshakes with a Host outside ``allowed_hosts``
    get 421, those from a browser page of a foreign origin 403, both in the OpenAI error shape (a
    WebSocket handshake as an HTTP response where the server supports it, else a 1008 close)."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.hosts = settings.served_hosts()
        self.origins = {normalized_origin(o) for o in [*settings.allowed_origins, *settings.cors_origins]}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(OPEN_PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(dict(scope.get("headers") or []))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        count_error(scope.get("app"), refusal["error"]["type"])
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": refusal["error"]["message"][:120]})
            return
        status = 421 if refusal["error"]["type"] == "invalid_host" else 403
        await JSONResponse(refusal, status_code=status)(scope, receive, send)

    def refusal(self, headers: dict[bytes, bytes]) -> dict[str, Any] | None:
        """The error body for a request with these headers, or None when it may go on."""
        host = headers.get(b"host", b"").decode("latin-1")
        name, port = split_host(host)
        if not host_matches(name, self.hosts) or port == -1:
            shown = repr(host) if host else "(none)"
            return _error("invalid_host", "Host", f"Host {shown} is not served here: add its name to "
                          "allowed_hosts (ACCEL_DIFFUSION_ALLOWED_HOSTS, a JSON list; '*' for any), e.g. the "
                          "name clients and the proxy use to reach this server")
        origin = headers.get(b"origin")
        if origin is None:
            return None
        text = origin.decode("latin-1")
        if same_origin(text, host) or normalized_origin(text) in self.origins:
            return None
        return _error("forbidden_origin", "Origin", f"Origin {text!r} may not use this server: a browser page "
                      f"must come from the server's own origin (Host {host!r}) or be listed in allowed_origins "
                      "(ACCEL_DIFFUSION_ALLOWED_ORIGINS) or cors_origins")


def _error(type_: str, param: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": type_, "message": message, "param": param}}
