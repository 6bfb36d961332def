"""``POST /v1/images/generations`` without FastAPI's routing and dependency solving: a pure ASGI middleware.

The synchronous OpenAI route is the server's hot path, and on a 2-core CPU the framework's share of it was
measurable (``benchmarks/server_hops.py``: ~1 ms of the ~4 ms between the socket and the queued job, then the
response, was FastAPI's routing, its dependency solving and the exception middleware's wrapping). This
middleware answers the route's common case itself, with the route's own parts, in the same order: the API key
(``require_api_key``'s check), the bounded JSON parser, ``ImageGenerationRequest`` validation, the request's
conversion, then the route's ``run_images`` (submit, wait, answer or cancel on disconnect). Errors raised on
the way are answered by the app's own exception handlers, looked up as Starlette's exception middleware does.

Everything else goes down the regular route, which stays the one the OpenAPI schema and ``/docs`` describe:
another path or method, a body that is not ``application/json`` (FastAPI's content-type rules apply there), a
missing or wrong API key (401), a body that is not valid JSON, too large (413) or fails validation (422). For
those the body already read is replayed to the route, so their answers are the route's, byte for byte. The
host and origin checks, the request id, the body-size limit and the metrics run around it as before (they are
the outer middleware); ``scope["route"]`` is set to the route, as the router would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from accel_diffusion.server.auth import api_key_matches, bearer_key, key_owner
from accel_diffusion.server.schemas import ImageGenerationRequest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.jsonbody import parse_json

PATH = "/v1/images/generations"

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RunImages = Callable[..., Awaitable[Any]]


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    """The first value of a header (Starlette's ``request.headers.get``: the first one wins)."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def is_json_content_type(value: bytes | None) -> bool:
    """``application/json``, with parameters or not (a charset): the bodies this path takes."""
    return value is not None and value.split(b";", 1)[0].strip().lower() == b"application/json"


class ImagesFastPath:
    """Answers ``POST /v1/images/generations`` with a JSON body; ``run_images(generation, output, request,
    state)`` is the route's own submit-wait-answer coroutine."""

    def __init__(self, app: Any, run_images: RunImages) -> None:
        self.app = app
        self.run_images = run_images
        self._route: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST"
                or not is_json_content_type(_header(scope, b"content-type"))):
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        state = app.state.server
        owner = None
        if state.api_keys:
            token = bearer_key((_header(scope, b"authorization") or b"").decode("latin-1"))
            if token is None or not api_key_matches(token, state.api_keys):
                await self.app(scope, receive, send)  # the route answers the 401
                return
            owner = key_owner(token)
        messages: list[Message] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except Exception as exc:  # the body limit's 413: the route raises it again, and answers it
            await self.app(scope, _replay(messages, receive, exc), send)
            return
        if messages[-1]["type"] != "http.request":  # the client left while sending
            await self.app(scope, _replay(messages, receive), send)
            return
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            data = parse_json(body, "body", max_bytes=app.state.settings.max_body_bytes)
            request_body = ImageGenerationRequest.model_validate(data)
        except (InvalidRequestError, ValidationError):  # the route's 400 / 422, in its own words
            await self.app(scope, _replay(messages, receive), send)
            return
        scope["route"] = self._route or self._find_route(app)
        request = Request(scope, receive)
        if owner is not None:
            request.state.job_owner = owner
        try:
            generation = request_body.to_generation_request(state.default_model, state.limits)
            response = await self.run_images(generation, request_body.output_options(), request, state)
        except Exception as exc:
            handler = _exception_handler(app.exception_handlers, exc)
            if handler is None:
                raise  # as from the route: the server-error middleware answers 500 and logs it
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _find_route(self, app: Any) -> Any:
        self._route = find_route(app.routes)
        return self._route


def find_route(routes: list[Any]) -> Any:
    """The ``POST PATH`` route among ``routes``, looking into included routers (FastAPI keeps an included
    router whole, as one entry holding the router's own routes)."""
    for route in routes:
        if getattr(route, "path", None) == PATH and "POST" in (getattr(route, "methods", None) or ()):
            return route
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        found = find_route(inner) if inner else None
        if found is not None:
            return found
    return None


def _replay(messages: list[Message], receive: Receive, error: Exception | None = None) -> Receive:
    """A ``receive`` that gives ``messages`` again (then raises ``error``, if any), then reads on."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replayed


def _exception_handler(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The handler Starlette's exception middleware would call: by status code for an HTTPException, then by
    class along the MRO; none for the catch-all ``Exception`` (the server-error middleware's)."""
    if isinstance(exc, StarletteHTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
